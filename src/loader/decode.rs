//! Decoding the chunks cubeload writes straight from their stored bytes. Their codec chain is fixed
//! (little-endian bytes → zstd → CRC32C, in shards whose index is 16 bytes per chunk and a CRC32C, as the
//! Zarr v3 sharding codec lays it out): the loader reads a shard's index once, each chunk's byte range,
//! checks both checksums and lets zstd decompress into the chunk's final buffer, a block at a time where the
//! batch is assembled as it goes ([`Progressive`]), with decompression contexts made once per thread. zarrs'
//! pipeline would zero a buffer, copy the decoded chunk into it and make a context per chunk, which together
//! cost as much as zstd itself (making a context runs `cpuid`, which in a virtual machine traps to the
//! hypervisor), and zarrs 0.23's `retrieve_encoded_subchunk`, which would give the encoded bytes, overflows
//! on chunks a shard does not store. Any other chain or data type, and anything that does not fit, is read by
//! zarrs.

use std::cell::RefCell;
use std::ptr::NonNull;

use zarrs::array::Array;
use zarrs::storage::byte_range::ByteRange;
use zarrs::storage::{Bytes, ReadableStorageTraits};

/// A zstd decompression context, freed when dropped.
struct Context(NonNull<zstd_sys::ZSTD_DCtx>);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: made by `ZSTD_createDCtx`, freed once.
        unsafe { zstd_sys::ZSTD_freeDCtx(self.0.as_ptr()) };
    }
}

thread_local! {
    /// This thread's idle decompression contexts: one per chunk being decoded at once, made once and reused.
    static CONTEXTS: RefCell<Vec<Context>> = const { RefCell::new(Vec::new()) };
}

/// Whether the chunks of `array` can be decoded by [`Progressive`]: float32 with a NaN fill value or one of
/// the integer types cubeload stores categories in with the variable's declared fill value `fill` (a chunk
/// not stored, all fill, is then all missing), and exactly the codecs cubeload writes (bytes little-endian,
/// zstd, crc32c), inside `sharding_indexed` or not.
pub(crate) fn is_direct(array: &Array<dyn ReadableStorageTraits>, fill: Option<f64>) -> bool {
    let Ok(meta) = serde_json::to_value(array.metadata()) else { return false };
    let integer = ["uint8", "uint16", "int16", "uint32", "int32"].iter().any(|t| meta["data_type"] == *t)
        && fill.is_some()
        && meta["fill_value"].as_f64() == fill;
    let float_nan = meta["data_type"] == "float32" && meta["fill_value"] == "NaN";
    let chain = chunk_codecs(&meta);
    let names: Vec<&str> = chain.as_array().map_or(Vec::new(), |c| c.iter().filter_map(codec_name).collect());
    let little = chain[0]["configuration"]["endian"] == "little";
    (float_nan || integer) && little && cfg!(target_endian = "little") && names == ["bytes", "zstd", "crc32c"]
}

/// Whether the stored chunks of `array` end with a CRC32C of their bytes: its (inner) codec chain ends with
/// `crc32c`.
pub(crate) fn ends_with_crc32c(array: &Array<dyn ReadableStorageTraits>) -> bool {
    let Ok(meta) = serde_json::to_value(array.metadata()) else { return false };
    chunk_codecs(&meta).as_array().and_then(|c| c.last()).and_then(codec_name) == Some("crc32c")
}

/// The codecs of a stored chunk in array metadata `meta`: the inner chain of a sharded array, else the
/// array's own.
fn chunk_codecs(meta: &serde_json::Value) -> &serde_json::Value {
    let codecs = &meta["codecs"];
    match codecs.as_array().map(Vec::as_slice) {
        Some([sharding]) if sharding["name"] == "sharding_indexed" => &sharding["configuration"]["codecs"],
        _ => codecs,
    }
}

/// The name of a codec in array metadata: `{"name": …, "configuration": …}`, or the name alone for a codec
/// without configuration (zarrs writes `"crc32c"` so).
pub(crate) fn codec_name(codec: &serde_json::Value) -> Option<&str> {
    codec.get("name").and_then(serde_json::Value::as_str).or_else(|| codec.as_str())
}

/// Whether a shard index as stored (16 bytes per inner chunk, then, if present, the CRC32C of those) is
/// made of whole entries and matches its checksum (its caller knows the length it must have).
pub(crate) fn index_is_intact(index: &[u8]) -> bool {
    match index.len() % 16 {
        0 => true,
        4 => index
            .split_last_chunk::<4>()
            .is_some_and(|(body, sum)| crc32c::crc32c(body) == u32::from_le_bytes(*sum)),
        _ => false,
    }
}

/// An inner chunk as a shard's index gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InShard {
    /// Its bytes in the shard.
    Stored(ByteRange),
    /// Not stored: all fill values.
    Empty,
}

/// The inner chunk at row-major `position` of a shard, from the shard's index (`None` outside it).
pub(crate) fn chunk_in_shard(index: &[u8], position: u64) -> Option<InShard> {
    let at = usize::try_from(position).ok()?.checked_mul(16)?;
    let entry = index.get(at..at.checked_add(16)?)?;
    let offset = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
    let length = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
    Some(if (offset, length) == (u64::MAX, u64::MAX) {
        InShard::Empty
    } else {
        InShard::Stored(ByteRange::FromStart(offset, Some(length)))
    })
}

/// Where the chunks of a shard end: the largest end of the ranges its (intact) index gives, 0 when every
/// chunk is empty; `None` when a range overflows.
pub(crate) fn shard_data_end(index: &[u8]) -> Option<u64> {
    let entries = &index[..index.len() / 16 * 16];
    entries.chunks_exact(16).try_fold(0u64, |end, entry| {
        let offset = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        let length = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
        if (offset, length) == (u64::MAX, u64::MAX) {
            Some(end)
        } else {
            Some(end.max(offset.checked_add(length)?))
        }
    })
}

/// An encoded chunk decompressed into its final buffer one zstd block (at most 128 KiB) at a time, as
/// asked (zstd's buffer-less API), or whole. A pixel-series batch is assembled from what was just decoded,
/// while it is in the core's cache: decoded whole first, a batch's chunks (1.4 MB on the default cube) are
/// more than a core's cache holds, and go to memory and back, with two readers on two cores racing for it.
pub(crate) struct Progressive {
    /// The compressed bytes, their checksum off.
    encoded: Bytes,
    /// Compressed bytes consumed.
    read: usize,
    /// The decoded bytes so far; its capacity is the chunk's length.
    out: Vec<u8>,
    /// `None` once every frame is decoded.
    context: Option<Context>,
}

impl Progressive {
    /// Checks the CRC32C that ends an encoded chunk and gets ready to decompress it into `len` bytes.
    pub(crate) fn new(mut encoded: Bytes, len: usize) -> Result<Self, String> {
        let Some((body, checksum)) = encoded.split_last_chunk::<4>() else {
            return Err(fail(&format!("{} bytes are too few for a CRC32C checksum", encoded.len())));
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(*checksum) {
            return Err(fail("CRC32C checksum mismatch"));
        }
        encoded.truncate(encoded.len() - 4);
        let context = CONTEXTS.with_borrow_mut(Vec::pop).unwrap_or_else(|| {
            // SAFETY: no precondition; a null result is an allocation failure.
            Context(NonNull::new(unsafe { zstd_sys::ZSTD_createDCtx() }).expect("a zstd context"))
        });
        // SAFETY: a valid context; beginning a frame resets whatever it decoded before.
        check(unsafe { zstd_sys::ZSTD_decompressBegin(context.0.as_ptr()) })?;
        Ok(Progressive { encoded, read: 0, out: Vec::with_capacity(len), context: Some(context) })
    }

    /// Decompresses until at least `bytes` bytes are decoded (whole zstd blocks, so usually more), or, with
    /// the chunk's length or more, to the end of its frames; an error when they end before.
    pub(crate) fn decode_to(&mut self, bytes: usize) -> Result<(), String> {
        let whole = bytes >= self.out.capacity();
        while (whole || self.out.len() < bytes)
            && let Some(context) = &self.context
        {
            let dctx = context.0.as_ptr();
            // SAFETY: a valid context.
            let next = unsafe { zstd_sys::ZSTD_nextSrcSizeToDecompress(dctx) };
            let encoded = &self.encoded;
            if next == 0 {
                // A frame ends: another may follow (zstd decodes concatenated frames as one).
                if self.read == encoded.len() {
                    self.release();
                } else {
                    // SAFETY: as above.
                    check(unsafe { zstd_sys::ZSTD_decompressBegin(dctx) })?;
                }
                continue;
            }
            let Some(input) = encoded.get(self.read..self.read + next) else {
                return Err(fail("zstd: the frame is truncated"));
            };
            let (done, capacity) = (self.out.len(), self.out.capacity());
            // SAFETY: zstd writes at most `capacity − done` bytes after the first `done` of `out`, which
            // hold what it decoded before (its back-references point there); it reads `next` input bytes.
            let n = check(unsafe {
                zstd_sys::ZSTD_decompressContinue(
                    dctx,
                    self.out.as_mut_ptr().add(done).cast(),
                    capacity - done,
                    input.as_ptr().cast(),
                    next,
                )
            })?;
            self.read += next;
            // SAFETY: the `n` bytes after `done` were written by zstd, within the capacity.
            unsafe { self.out.set_len(done + n) };
        }
        let (n, len) = (self.out.len(), self.out.capacity());
        if n < bytes.min(len) {
            return Err(fail(&format!("zstd gave {n} bytes, the chunk holds {len}")));
        }
        Ok(())
    }

    /// The bytes decoded so far.
    pub(crate) fn decoded(&self) -> &[u8] {
        &self.out
    }

    /// Whether the decoded bytes lie where a `T` may be read.
    pub(crate) fn aligned_for<T>(&self) -> bool {
        self.out.as_ptr().cast::<T>().is_aligned()
    }

    /// Decodes the rest; the chunk, checked to be exactly its length.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, String> {
        self.decode_to(usize::MAX)?;
        Ok(std::mem::take(&mut self.out))
    }

    /// Gives the context back to the thread's idle ones (at the thread's end it is freed instead).
    fn release(&mut self) {
        if let Some(context) = self.context.take() {
            let _ = CONTEXTS.try_with(|idle| idle.borrow_mut().push(context));
        }
    }
}

impl Drop for Progressive {
    fn drop(&mut self) {
        self.release();
    }
}

fn fail(why: &str) -> String {
    format!("cannot be decoded: {why}")
}

/// A zstd result as a count, or its error as a message.
fn check(code: usize) -> Result<usize, String> {
    // SAFETY: both only read the code; the name is a static C string.
    if unsafe { zstd_sys::ZSTD_isError(code) } == 0 {
        return Ok(code);
    }
    let name = unsafe { std::ffi::CStr::from_ptr(zstd_sys::ZSTD_getErrorName(code)) };
    Err(fail(&format!("zstd: {}", name.to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as zarrs' codecs write them (zstd, then the CRC32C of the compressed bytes appended).
    fn encode(values: &[f32]) -> Bytes {
        let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut encoded = zstd::bulk::compress(&raw, 3).unwrap();
        let checksum = crc32c::crc32c(&encoded);
        encoded.extend_from_slice(&checksum.to_le_bytes());
        encoded.into()
    }

    /// A shard index as the sharding codec writes it: (offset, length) per chunk, `u64::MAX` twice for a
    /// chunk not stored, then the CRC32C of those bytes.
    #[test]
    fn shard_index_entries_and_checksum() {
        let entries = [(0u64, 100u64), (u64::MAX, u64::MAX), (100, 7)];
        let mut index: Vec<u8> =
            entries.iter().flat_map(|(o, l)| [o.to_le_bytes(), l.to_le_bytes()]).flatten().collect();
        let checksum = crc32c::crc32c(&index);
        index.extend_from_slice(&checksum.to_le_bytes());
        assert!(index_is_intact(&index));
        assert_eq!(chunk_in_shard(&index, 0), Some(InShard::Stored(ByteRange::FromStart(0, Some(100)))));
        assert_eq!(chunk_in_shard(&index, 1), Some(InShard::Empty));
        assert_eq!(chunk_in_shard(&index, 2), Some(InShard::Stored(ByteRange::FromStart(100, Some(7)))));
        assert_eq!(chunk_in_shard(&index, 3), None, "past the index: its checksum, not an entry");
        assert_eq!(shard_data_end(&index), Some(107), "the end of the last chunk, the checksum left out");
        let mut damaged = index.clone();
        damaged[3] ^= 1;
        assert!(!index_is_intact(&damaged));
        assert!(!index_is_intact(&index[1..]), "not a whole index");
        assert!(index_is_intact(&index[..48]), "an index without a checksum has nothing to check");
    }

    fn decode(encoded: &[u8], len: usize) -> Result<Vec<u8>, String> {
        Progressive::new(Bytes::copy_from_slice(encoded), len)?.finish()
    }

    #[test]
    fn decodes_what_was_encoded_and_refuses_damage() {
        let values: Vec<f32> =
            (0..1000).map(|k| if k % 9 == 0 { f32::NAN } else { k as f32 * 0.5 }).collect();
        let encoded = encode(&values);
        let decoded = decode(&encoded, values.len() * 4).unwrap();
        let bits = |b: &[u8]| {
            b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()
        };
        assert_eq!(bits(&decoded), values.iter().map(|x| x.to_bits()).collect::<Vec<_>>());

        let mut flipped = encoded.to_vec();
        flipped[5] ^= 0x10;
        assert!(decode(&flipped, values.len() * 4).unwrap_err().contains("checksum mismatch"));
        let short = decode(&encoded, values.len() * 4 - 4).unwrap_err();
        assert!(short.contains("zstd"), "{short}");
        let long = decode(&encoded, values.len() * 4 + 4).unwrap_err();
        assert!(long.contains("gave 4000 bytes"), "{long}");
        assert!(decode(&[1, 2], 8).unwrap_err().contains("too few"));
    }

    /// With the CRC32C appended to what a zstd encoder gave.
    fn with_crc(mut frames: Vec<u8>) -> Vec<u8> {
        let checksum = crc32c::crc32c(&frames);
        frames.extend_from_slice(&checksum.to_le_bytes());
        frames
    }

    /// Frames that carry zstd's own checksum of their content (zarrs writes them with `checksum: true`) are
    /// checked too; several frames one after the other decode as one chunk, as zstd's one-shot call decodes
    /// them; both also a block at a time.
    #[test]
    fn frames_with_a_content_checksum_and_concatenated_frames() {
        let values: Vec<u8> = (0..300_000u32).flat_map(|k| ((k % 977) as f32 * 0.25).to_le_bytes()).collect();
        let mut encoder = zstd::bulk::Compressor::new(3).unwrap();
        encoder.include_checksum(true).unwrap();
        let checked = encoder.compress(&values).unwrap();
        assert_eq!(decode(&with_crc(checked.clone()), values.len()).unwrap(), values);
        // The content changed under a frame whose CRC32C is recomputed: zstd's checksum still finds it (the
        // last 4 bytes of the frame are that checksum).
        let mut damaged = checked.clone();
        let at = damaged.len() - 2;
        damaged[at] ^= 1;
        let error = decode(&with_crc(damaged), values.len()).unwrap_err();
        assert!(error.contains("zstd") && error.contains("checksum"), "{error}");

        let half = values.len() / 2;
        let mut two = zstd::bulk::compress(&values[..half], 3).unwrap();
        two.extend(zstd::bulk::compress(&values[half..], 3).unwrap());
        let two = Bytes::from(with_crc(two));
        assert_eq!(decode(&two, values.len()).unwrap(), values);
        let mut blocks = Progressive::new(two, values.len()).unwrap();
        for upto in (0..=values.len()).step_by(100_000) {
            blocks.decode_to(upto).unwrap();
            assert!(blocks.decoded().len() >= upto && values.starts_with(blocks.decoded()));
        }
        assert_eq!(blocks.finish().unwrap(), values);
    }
}
