//! Decoding the chunks cubeload writes straight from their stored bytes. Their codec chain is fixed
//! (little-endian bytes → zstd → CRC32C, in shards whose index is 16 bytes per chunk and a CRC32C, as the Zarr
//! v3 sharding codec lays it out): the loader reads a shard's index once, each chunk's byte range, checks
//! both checksums and lets zstd decompress into the chunk's final buffer, with one decompression context per
//! thread. zarrs' pipeline would zero a buffer, copy the decoded chunk into it and make a context per chunk,
//! which together cost as much as zstd itself (making a context runs `cpuid`, which in a virtual machine
//! traps to the hypervisor), and zarrs 0.23's `retrieve_encoded_subchunk`, which would give the encoded
//! bytes, overflows on chunks a shard does not store. Any other chain or data type, and anything that does
//! not fit, is read by zarrs.

use std::cell::RefCell;

use zarrs::array::Array;
use zarrs::storage::ReadableStorageTraits;
use zarrs::storage::byte_range::ByteRange;
use zstd::zstd_safe::DCtx;

thread_local! {
    /// This thread's decompression context, reused for every chunk.
    static DCTX: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
}

/// Whether the chunks of `array` can be decoded by [`decode`]: float32 with a NaN fill value or one of the
/// integer types cubeload stores categories in, and exactly the codecs cubeload writes (bytes little-endian,
/// zstd, crc32c), inside `sharding_indexed` or not.
pub(crate) fn is_direct(array: &Array<dyn ReadableStorageTraits>) -> bool {
    let Ok(meta) = serde_json::to_value(array.metadata()) else { return false };
    let integer = ["uint8", "uint16", "int16", "uint32", "int32"].iter().any(|t| meta["data_type"] == *t);
    let float_nan = meta["data_type"] == "float32" && meta["fill_value"] == "NaN";
    let codecs = &meta["codecs"];
    let chain = match codecs.as_array().map(Vec::as_slice) {
        Some([sharding]) if sharding["name"] == "sharding_indexed" => &sharding["configuration"]["codecs"],
        _ => codecs,
    };
    let names: Vec<&str> = chain.as_array().map_or(Vec::new(), |c| c.iter().filter_map(codec_name).collect());
    let little = chain[0]["configuration"]["endian"] == "little";
    (float_nan || integer) && little && cfg!(target_endian = "little") && names == ["bytes", "zstd", "crc32c"]
}

/// The name of a codec in array metadata: `{"name": …, "configuration": …}`, or the name alone for a codec
/// without configuration (zarrs writes `"crc32c"` so).
pub(crate) fn codec_name(codec: &serde_json::Value) -> Option<&str> {
    codec.get("name").and_then(serde_json::Value::as_str).or_else(|| codec.as_str())
}

/// Whether a shard index as stored (16 bytes per inner chunk, then, if present, the CRC32C of those) is
/// whole and matches its checksum.
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

/// Checks the CRC32C of an encoded chunk and decompresses it into exactly `len` bytes.
pub(crate) fn decode(encoded: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let fail = |why: String| format!("cannot be decoded: {why}");
    let Some((body, checksum)) = encoded.split_last_chunk::<4>() else {
        return Err(fail(format!("{} bytes are too few for a CRC32C checksum", encoded.len())));
    };
    if crc32c::crc32c(body) != u32::from_le_bytes(*checksum) {
        return Err(fail("CRC32C checksum mismatch".to_string()));
    }
    // Decompressed into the vector's capacity: nothing is zeroed first.
    let mut bytes = Vec::with_capacity(len);
    match DCTX.with_borrow_mut(|dctx| dctx.decompress(&mut bytes, body)) {
        Ok(n) if n == len => Ok(bytes),
        Ok(n) => Err(fail(format!("zstd gave {n} bytes, the chunk holds {len}"))),
        Err(code) => Err(fail(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as zarrs' codecs write them (zstd, then the CRC32C of the compressed bytes appended).
    fn encode(values: &[f32]) -> Vec<u8> {
        let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut encoded = zstd::bulk::compress(&raw, 3).unwrap();
        let checksum = crc32c::crc32c(&encoded);
        encoded.extend_from_slice(&checksum.to_le_bytes());
        encoded
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

        let mut flipped = encoded.clone();
        flipped[5] ^= 0x10;
        assert!(decode(&flipped, values.len() * 4).unwrap_err().contains("checksum mismatch"));
        let short = decode(&encoded, values.len() * 4 - 4).unwrap_err();
        assert!(short.contains("zstd"), "{short}");
        let long = decode(&encoded, values.len() * 4 + 4).unwrap_err();
        assert!(long.contains("gave 4000 bytes"), "{long}");
        assert!(decode(&[1, 2], 8).unwrap_err().contains("too few"));
    }
}
