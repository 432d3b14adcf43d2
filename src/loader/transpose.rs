//! The transpose at the heart of a pixel-series batch. A time-major chunk holds, for each step, the values
//! of all samples side by side; a batch holds, for each sample, its steps (and variables) side by side. So
//! the batch is the transpose of a matrix whose rows are the chunk rows of every (step, variable), each
//! going to one column of the batch. Transposed 8 × 8 values at a time in vector registers (AVX2, where the
//! processor has it), each sample receives 8 consecutive columns in one store, instead of one store per
//! value: stores, not loads, were what limited the element-by-element copy.
//!
//! The batch is written, never read, by the transpose, and goes to another thread: where two row groups fill
//! whole cache lines of it, they are written with non-temporal stores, straight to memory without first
//! reading each line into the cache. Neither the batch nor its mask is zeroed beforehand (every element is
//! written: the destinations are `MaybeUninit`). Together (the batch's part), in `cubeload bench`,
//! `ratio_to_ceiling` 0.64 → 0.74. The mask's bytes of a group of samples come 8 at a time, too few to fill
//! a line: where the rows make whole mask rows, they are made in a small buffer of the thread and streamed
//! to the batch from there; a batch made a block of steps at a time has its whole mask made as bits, one
//! per mask byte, which stay in the core's cache, then written out as bytes ([`with_mask_staged`]).
//!
//! Where the processor has AVX-512 (F, BW, VL), the lines of values are written by code for it: a
//! comparison gives a bit mask, which selects the fill and makes a line's 16 mask bytes in one store, where
//! AVX2 makes 8 at a time from a table (a `movemask`, a load and a store each). Values delivered as stored
//! are transposed a whole line of each sample at a time, in 512-bit registers; normalized ones on 256-bit
//! vectors.
//!
//! Each sample is written from a place of its own ([`Dest`]): the samples of one batch lie a stride apart,
//! and the samples of a group of chunks mixed across its batches go straight to their places there, so that
//! mixing writes nothing more than assembling.

use std::mem::MaybeUninit;

/// One row of that matrix: the values of all samples at one step of one variable, the batch column they go
/// to, and the affine that prepares them (`(0, 1)` leaves them as stored, bit for bit).
pub(crate) struct Row<'a> {
    pub values: &'a [f32],
    pub col: usize,
    pub affine: (f32, f32),
}

/// Samples handled together, where a transpose has few rows: every row is transposed for 8 samples (one
/// 8 × 8 block's width) before the next 8, so that the lines streamed at any moment lie in the rows of 8
/// samples, a few pages, not of 128. (In `cubeload bench`, 8 against 128 raised `ratio_to_ceiling` from
/// 0.72 to 0.74 in ten alternating pairs out of ten; 16 was lower than 8 in five rounds of six. With one
/// thread on chunks in its cache, `cargo bench --bench loader -- batch_assembly/default`, 8 takes longer
/// than 16 or 128.)
const SMALL_TILE: usize = 8;

/// Samples handled together, where a transpose has many rows (a chunk decoded whole, its thousands of rows
/// read from beyond the core's cache): each group of rows is read 512 bytes at a time, which the processor's
/// prefetcher follows. (On a cube of batches of 4096 series decoded whole, 128 was higher than 8 in three
/// alternating pairs of three.)
const LARGE_TILE: usize = 128;

/// The most rows transposed in [`SMALL_TILE`]s: those of a block of steps just decoded, in the core's cache
/// (a batch of the default bench cube is made in blocks of 128 steps of 3 variables, 384 rows); the
/// thousands of rows of chunks decoded whole lie mostly beyond it.
const SMALL_TILE_ROWS: usize = 512;

/// The tile for a transpose of `rows` rows.
fn tile_for(rows: usize) -> usize {
    if rows <= SMALL_TILE_ROWS { SMALL_TILE } else { LARGE_TILE }
}

/// Where a transpose writes the validity of the values it writes.
pub(crate) enum Mask<'a> {
    /// The batch's mask: byte `o` for value `o`, 1 where valid and 0 where missing.
    Bytes(&'a mut [MaybeUninit<u8>]),
    /// One bit per mask byte (bit `o % 64` of word `o / 64`), all zero before the transposes, which set
    /// those of valid values ([`with_mask_staged`] makes them and turns them into bytes).
    Bits(&'a mut [u64]),
}

impl Mask<'_> {
    /// The same mask, for one more transpose of the batch.
    pub(crate) fn reborrow(&mut self) -> Mask<'_> {
        match self {
            Mask::Bytes(bytes) => Mask::Bytes(bytes),
            Mask::Bits(words) => Mask::Bits(words),
        }
    }

    /// Mask bytes it holds.
    fn len(&self) -> usize {
        match self {
            Mask::Bytes(bytes) => bytes.len(),
            Mask::Bits(words) => words.len() * 64,
        }
    }

    /// Sets the validity of value `o`.
    fn set(&mut self, o: usize, valid: u8) {
        match self {
            Mask::Bytes(bytes) => {
                bytes[o].write(valid);
            }
            Mask::Bits(words) => words[o / 64] |= u64::from(valid) << (o % 64),
        }
    }
}

/// Where a transpose writes each sample: a row's value of sample `p` at `row.col` from `starts[p]`, its
/// validity at index `masks[p] + row.col` of the mask. The samples of one batch lie a stride apart in it;
/// mixed across the batches of a group, anywhere in any of them.
pub(crate) struct Dest<'a> {
    starts: Vec<*mut f32>,
    masks: Vec<usize>,
    /// Elements from each sample's start to the end of its buffer, at least.
    room: usize,
    /// `Some(stride)` where the samples lie `stride` apart in one buffer and mask, from their starts.
    stride: Option<usize>,
    _buffers: std::marker::PhantomData<&'a mut [MaybeUninit<f32>]>,
}

impl<'a> Dest<'a> {
    /// The samples of one batch: sample `p` from `p · stride` of `data`, and of the mask.
    ///
    /// # Panics
    /// When `data` does not reach the start of the last sample.
    pub(crate) fn batch(data: &'a mut [MaybeUninit<f32>], samples: usize, stride: usize) -> Self {
        let last = samples.saturating_sub(1) * stride;
        assert!(samples == 0 || last < data.len(), "batch too small for the samples");
        let base = data.as_mut_ptr().cast::<f32>();
        Dest {
            starts: (0..samples).map(|p| base.wrapping_add(p * stride)).collect(),
            masks: (0..samples).map(|p| p * stride).collect(),
            room: data.len().saturating_sub(last),
            stride: Some(stride),
            _buffers: std::marker::PhantomData,
        }
    }

    /// Samples placed anywhere in `buffers`: sample `p` from element `places[p].1` of buffer
    /// `places[p].0`, with at least `room` elements of it from there, its mask from `masks[p]`.
    ///
    /// # Panics
    /// When a place lies outside its buffer or has less room, or the lengths differ.
    pub(crate) fn scattered(
        buffers: &'a mut [&mut [MaybeUninit<f32>]],
        places: &[(usize, usize)],
        room: usize,
        masks: Vec<usize>,
    ) -> Self {
        assert_eq!(places.len(), masks.len(), "a mask place for every sample");
        let starts = places
            .iter()
            .map(|&(b, at)| {
                assert!(at + room <= buffers[b].len(), "sample outside its batch");
                buffers[b].as_mut_ptr().cast::<f32>().wrapping_add(at)
            })
            .collect();
        Dest { starts, masks, room, stride: None, _buffers: std::marker::PhantomData }
    }

    /// Whether every sample starts at the same offset within a 64-byte line.
    fn aligned_alike(&self) -> bool {
        let offset = |p: &*mut f32| p.addr() % 64;
        self.starts.first().is_none_or(|first| self.starts.iter().all(|p| offset(p) == offset(first)))
    }
}

/// Writes each row's value of every sample `p < samples` at its place in `dest`, and its validity in
/// `mask`: the value prepared as [`prepare`] does, or `fill` and 0 where it is missing. Nothing else is
/// touched.
///
/// # Panics
/// When a row holds fewer than `samples` values, or a destination lies outside its buffer or `mask`.
pub(crate) fn transpose_rows(rows: &[Row<'_>], samples: usize, fill: f32, dest: &Dest<'_>, mask: Mask<'_>) {
    transpose_rows_on(Isa::best(), tile_for(rows.len()), rows, samples, fill, dest, mask);
}

/// The instruction sets the transpose is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Scalar,
    Avx2,
    /// AVX2, and AVX-512 F, BW and VL where pairs of groups fill lines.
    Avx512,
}

impl Isa {
    /// Those this processor has, the best last.
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            isas.push(Isa::Avx2);
            if avx2::avx512_available() {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return if avx2::avx512_available() { Isa::Avx512 } else { Isa::Avx2 };
        }
        Isa::Scalar
    }
}

/// [`transpose_rows`] with the instructions of `isa`, which the processor must have, `tile` samples at a
/// time.
fn transpose_rows_on(
    isa: Isa,
    tile: usize,
    rows: &[Row<'_>],
    samples: usize,
    fill: f32,
    dest: &Dest<'_>,
    mut mask: Mask<'_>,
) {
    if samples == 0 || rows.is_empty() {
        return;
    }
    let last_col = rows.iter().map(|r| r.col).max().unwrap_or(0);
    assert!(samples <= dest.starts.len(), "a place for every sample");
    let last_mask = dest.masks[..samples].iter().max().map_or(0, |m| m + last_col);
    assert!(last_col < dest.room && last_mask < mask.len(), "batch too small for the rows");
    assert!(rows.iter().all(|r| r.values.len() >= samples), "row shorter than the samples");
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        assert!(std::arch::is_x86_feature_detected!("avx2"), "AVX2 is present");
        assert!(isa != Isa::Avx512 || avx2::avx512_available(), "AVX-512 is present");
        let avx512 = isa == Isa::Avx512;
        // SAFETY: AVX2 (and where used AVX-512) is present (asserted above); rows and destinations are in
        // bounds (asserted above).
        unsafe { avx2::transpose_rows(rows, samples, fill, (dest, mask), (tile, avx512)) };
        return;
    }
    transpose_scalar(rows, 0..rows.len(), (0..samples, tile), fill, dest, &mut mask);
}

/// Runs `make` on a mask to be written to `mask`: where the processor has AVX2 and it fits, bits in a buffer
/// of this thread ([`Mask::Bits`]), which stays in its cache while `make` writes it piece by piece, then
/// turned into bytes streamed to `mask` whole cache lines at a time ([`fence`] before another thread reads
/// it); otherwise `mask` itself. For a batch made in several transposes, each writing a part of every
/// sample's mask row: streamed by each, the parts would begin and end inside cache lines, each such line
/// written to memory in pieces. As bits, the staged mask takes an eighth of the cache that bytes took (63
/// KiB for a batch of the default bench cube), and larger batches are made a block at a time too: staged as
/// bytes, a mask over 512 KiB had its chunks decoded whole first. (In `cubeload bench`, on cubes of the
/// same inputs with batches of 1024 series, a 2 MiB mask, `ratio_to_ceiling` 0.63 → 0.71 in four
/// alternating pairs, higher in each; of 4096 series, 0.51 → 0.57 in three; on the default cube, about
/// +0.01, within the noise.)
pub(crate) fn with_mask_staged<R>(mask: &mut [MaybeUninit<u8>], make: impl FnOnce(Mask<'_>) -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if mask.len() / 8 <= BITS_BYTES && std::arch::is_x86_feature_detected!("avx2") {
        let mut bits = avx2::BITS.take();
        bits.clear();
        bits.resize(mask.len().div_ceil(64), 0);
        let result = make(Mask::Bits(&mut bits));
        bits_to_mask(&bits, mask);
        avx2::BITS.set(bits);
        return result;
    }
    make(Mask::Bytes(mask))
}

/// Writes mask byte `o` of `mask` as bit `o` of `bits` says: 1 where set, 0 where not. Where the processor
/// has AVX2, whole cache lines with non-temporal stores ([`fence`] before another thread reads it).
///
/// # Panics
/// When `bits` holds fewer bits than `mask` bytes.
pub(crate) fn bits_to_mask(bits: &[u64], mask: &mut [MaybeUninit<u8>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        unsafe { avx2::expand_bits(bits, mask) };
        return;
    }
    assert!(bits.len() * 64 >= mask.len(), "a bit for every mask byte");
    for (o, m) in mask.iter_mut().enumerate() {
        m.write(((bits[o / 64] >> (o % 64)) & 1) as u8);
    }
}

/// The most bytes of a batch's mask staged as bits by [`with_mask_staged`]: a mask of 16 MiB (a batch of 4096
/// series of 672 steps of 3 variables takes 1 MiB of bits).
const BITS_BYTES: usize = 2 << 20;

/// The same, one value at a time, for `rows[rows_range]` and samples `samples`: the fallback, and the
/// edges the vector path leaves (ragged row groups and sample tails).
///
/// The bounds [`transpose_rows_on`] checks must hold.
fn transpose_scalar(
    rows: &[Row<'_>],
    rows_range: std::ops::Range<usize>,
    (samples, tile): (std::ops::Range<usize>, usize),
    fill: f32,
    dest: &Dest<'_>,
    mask: &mut Mask<'_>,
) {
    for p0 in samples.clone().step_by(tile) {
        let tile = p0..(p0 + tile).min(samples.end);
        for row in &rows[rows_range.clone()] {
            let (mean, inv) = row.affine;
            assert!(row.col < dest.room, "column outside the samples' room");
            for p in tile.clone() {
                let (value, valid) = prepare(row.values[p], mean, inv, fill);
                // SAFETY: `col < room` (asserted), and each start has `room` elements of its buffer after it.
                unsafe { dest.starts[p].add(row.col).write(value) };
                mask.set(dest.masks[p] + row.col, valid);
            }
        }
    }
}

/// A stored value as a model input and its mask: `(x − mean) · inv`, or `fill` and 0 when missing.
#[inline]
pub(crate) fn prepare(x: f32, mean: f32, inv: f32, fill: f32) -> (f32, u8) {
    // Computed whatever `x`, then selected: no branch, so that loops over it are vectorized.
    let (ok, y) = (!x.is_nan(), (x - mean) * inv);
    (if ok { y } else { fill }, u8::from(ok))
}

/// Copies a block of `rows × cols` values (rows `stride` apart in `values`) into consecutive rows of `out`
/// and `mask`, each value prepared as [`prepare`] does: a patch of an image-sequence batch at one step.
/// Rows of whole AVX2 vectors are written with non-temporal stores: [`fence`] before another thread reads
/// them.
///
/// # Panics
/// When the block lies outside `values`, or `out` or `mask` holds fewer than `rows × cols` elements.
pub(crate) fn prepare_block(
    values: &[f32],
    stride: usize,
    (rows, cols): (usize, usize),
    (mean, inv): (f32, f32),
    fill: f32,
    out: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<u8>],
) {
    // Always inlined: the AVX2 copy below is this body compiled for AVX2, which needs it in place.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn body(
        values: &[f32],
        stride: usize,
        (rows, cols): (usize, usize),
        (mean, inv): (f32, f32),
        fill: f32,
        out: &mut [MaybeUninit<f32>],
        mask: &mut [MaybeUninit<u8>],
    ) {
        let (out, mask) = (&mut out[..rows * cols], &mut mask[..rows * cols]);
        for ((r, out), mask) in out.chunks_exact_mut(cols).enumerate().zip(mask.chunks_exact_mut(cols)) {
            let row = &values[r * stride..r * stride + cols];
            for ((x, value), valid) in row.iter().zip(out).zip(mask) {
                let (prepared, ok) = prepare(*x, mean, inv, fill);
                value.write(prepared);
                valid.write(ok);
            }
        }
    }
    // Rows of a patch are short (a patch 12 values wide, say): with AVX2 fewer vector iterations, the loop
    // being bound by its stores. (Rows of whole vectors take the streamed path below.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn body_avx2(
        values: &[f32],
        stride: usize,
        shape: (usize, usize),
        affine: (f32, f32),
        fill: f32,
        out: &mut [MaybeUninit<f32>],
        mask: &mut [MaybeUninit<u8>],
    ) {
        body(values, stride, shape, affine, fill, out, mask);
    }
    if rows == 0 || cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        if cols.is_multiple_of(8) {
            let rows_in = |len: usize| (rows - 1) * stride + cols <= len;
            assert!(rows_in(values.len()), "block outside the values");
            assert!(out.len() >= rows * cols && mask.len() >= rows * cols, "destination too small");
            // SAFETY: AVX2 is present (checked above); the block lies in `values`, and `out` and `mask`
            // hold `rows × cols` elements (asserted above).
            let shape = (rows, cols);
            unsafe { avx2::prepare_rows_streamed(values, stride, shape, (mean, inv), fill, out, mask) };
            return;
        }
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { body_avx2(values, stride, (rows, cols), (mean, inv), fill, out, mask) };
        return;
    }
    body(values, stride, (rows, cols), (mean, inv), fill, out, mask);
}

/// Writes `rows` one after the other from the start of `dst`, which they fill: a batch made sample by
/// sample from rows of other batches (the mixing of chunks). The batch goes to another thread unread, so
/// where the processor has AVX2 the rows are written with non-temporal stores, each 32-byte-aligned part
/// of `dst` in one store whichever rows its bytes come from ([`fence`] before the batch is handed over).
///
/// # Panics
/// When the rows do not add up to the length of `dst`.
pub(crate) fn stream_rows<'a>(rows: impl IntoIterator<Item = &'a [u8]>, dst: &mut [MaybeUninit<u8>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        let mut out = avx2::Streamed::new(dst);
        for row in rows {
            // SAFETY: AVX2 is present (checked above).
            unsafe { out.push(row) };
        }
        out.finish();
        return;
    }
    let mut at = 0;
    for row in rows {
        for (d, s) in dst[at..at + row.len()].iter_mut().zip(row) {
            d.write(*s);
        }
        at += row.len();
    }
    assert_eq!(at, dst.len(), "the rows fill the destination");
}

/// Makes the non-temporal stores of [`prepare_block`] visible to other threads: once after the blocks of a
/// batch, before the batch is handed over.
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of every x86_64 processor; the fence only orders this thread's stores.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, __m512, __m512i, _CMP_ORD_Q, _CMP_UNORD_Q, _mm_maskz_set1_epi8, _mm_sfence,
        _mm_storeu_si128, _mm_stream_si64, _mm256_and_si256, _mm256_blendv_ps, _mm256_castps_pd,
        _mm256_castps_si256, _mm256_cmp_ps, _mm256_cmp_ps_mask, _mm256_cmpeq_epi8, _mm256_cmpeq_epi32,
        _mm256_loadu_ps, _mm256_loadu_si256, _mm256_mask_blend_ps, _mm256_movemask_epi8, _mm256_movemask_ps,
        _mm256_mul_ps, _mm256_permute2f128_ps, _mm256_set1_epi8, _mm256_set1_epi32, _mm256_set1_epi64x,
        _mm256_set1_ps, _mm256_setr_epi8, _mm256_setzero_ps, _mm256_shuffle_epi8, _mm256_shuffle_ps,
        _mm256_storeu_ps, _mm256_stream_ps, _mm256_stream_si256, _mm256_sub_ps, _mm256_unpackhi_ps,
        _mm256_unpacklo_ps, _mm512_castpd_ps, _mm512_castps_pd, _mm512_castps256_ps512, _mm512_cmp_ps_mask,
        _mm512_insertf64x4, _mm512_mask_blend_ps, _mm512_maskz_set1_epi8, _mm512_permutex2var_ps,
        _mm512_setr_epi32, _mm512_shuffle_ps, _mm512_stream_ps, _mm512_stream_si512, _mm512_unpackhi_ps,
        _mm512_unpacklo_ps,
    };
    use std::cell::RefCell;
    use std::mem::MaybeUninit;

    use super::{Dest, Mask, Row, transpose_scalar};

    /// Rows transposed together: one vector register each.
    const GROUP: usize = 8;

    /// Groups of [`GROUP`] rows whose columns are consecutive (one contiguous store per sample), and the rows
    /// left for the scalar path.
    /// The first `start` rows are left to the scalar path (see [`line_start`]).
    pub(super) fn groups(rows: &[Row<'_>], start: usize) -> (Vec<usize>, Vec<usize>) {
        let (mut vector, mut scalar): (Vec<usize>, Vec<usize>) = (Vec::new(), (0..start).collect());
        let mut k = start;
        while k < rows.len() {
            let group =
                rows.get(k..k + GROUP).filter(|g| g.iter().enumerate().all(|(j, r)| r.col == g[0].col + j));
            if group.is_some() {
                vector.push(k);
                k += GROUP;
            } else {
                scalar.push(k);
                k += 1;
            }
        }
        (vector, scalar)
    }

    /// Floats in a cache line.
    const LINE: usize = 64 / size_of::<f32>();

    /// Where row groups should start so that pairs of them fill cache lines of `out`: the first row (of the
    /// first 16) whose column starts a line. The allocator aligns a batch to 16 bytes, not always to 64.
    pub(super) fn line_start(rows: &[Row<'_>], out: *const f32) -> usize {
        let starts_line = |r: &Row<'_>| (out as usize + r.col * size_of::<f32>()).is_multiple_of(64);
        rows.iter().take(LINE).position(starts_line).unwrap_or(0)
    }

    /// Whether the row groups `vector`, taken two by two, each cover 16 consecutive columns starting on a
    /// cache line from `out`, the start of a sample (every sample starting at the same offset within a line,
    /// [`Dest::aligned_alike`]): each pair then fills whole lines, written by non-temporal stores (a last
    /// group without a pair is written through the cache). Otherwise every group is written through the
    /// cache.
    pub(super) fn fills_lines(rows: &[Row<'_>], vector: &[usize], out: *const f32) -> bool {
        vector.chunks_exact(2).all(|g| {
            g[1] == g[0] + GROUP
                && rows[g[1]].col == rows[g[0]].col + GROUP
                && (out as usize + rows[g[0]].col * size_of::<f32>()).is_multiple_of(64)
        })
    }

    /// Whether the rows write every column `0..stride` once: each sample's mask row is then whole.
    pub(super) fn cover_every_column(rows: &[Row<'_>], stride: usize) -> bool {
        let mut seen = vec![false; stride];
        rows.len() == stride
            && rows.iter().all(|r| r.col < stride && !std::mem::replace(&mut seen[r.col], true))
    }

    /// The most bytes of a tile's mask rows staged, a part of a core's cache (8 series of 672 steps of 3
    /// variables take 16 KB, 128 of them 252 KiB).
    pub(super) const STAGING_BYTES: usize = 512 << 10;

    thread_local! {
        /// A tile's mask rows, built here (in this core's cache) and then streamed to the batch.
        pub(super) static STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        /// A batch's mask as bits ([`super::with_mask_staged`]).
        pub(super) static BITS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    }

    /// Copies `src` to `dst` (same length), the 32-byte-aligned part of `dst` with non-temporal stores.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::cast_ptr_alignment)] // the load takes any address; the stores' are 32-byte aligned
    pub(super) unsafe fn stream_copy(src: &[u8], dst: &mut [MaybeUninit<u8>]) {
        assert_eq!(src.len(), dst.len());
        let head = dst.as_ptr().align_offset(32).min(dst.len());
        let body = (dst.len() - head) / 32 * 32;
        for (d, s) in dst[..head].iter_mut().zip(&src[..head]) {
            d.write(*s);
        }
        for k in (head..head + body).step_by(32) {
            // SAFETY: k + 32 <= len; dst + k is 32-byte aligned.
            unsafe {
                let v = _mm256_loadu_si256(src.as_ptr().add(k).cast::<__m256i>());
                _mm256_stream_si256(dst.as_mut_ptr().add(k).cast::<__m256i>(), v);
            }
        }
        for (d, s) in dst[head + body..].iter_mut().zip(&src[head + body..]) {
            d.write(*s);
        }
    }

    /// A destination written front to back, each 32-byte-aligned part by one non-temporal store: the bytes
    /// before the first such part, and after the last, plainly; a part that begins in one row and ends in
    /// the next is gathered first.
    pub(super) struct Streamed<'d> {
        dst: &'d mut [MaybeUninit<u8>],
        /// Bytes written (or gathered) so far.
        at: usize,
        /// The part being gathered, `at % 32` of its bytes in place (past the plainly written head).
        part: [u8; 32],
    }

    impl<'d> Streamed<'d> {
        pub(super) fn new(dst: &'d mut [MaybeUninit<u8>]) -> Self {
            Streamed { dst, at: 0, part: [0; 32] }
        }

        /// Bytes before the first 32-byte-aligned part, written plainly.
        fn head(&self) -> usize {
            self.dst.as_ptr().align_offset(32).min(self.dst.len())
        }

        /// Appends `row`.
        ///
        /// # Safety
        /// AVX2 must be available.
        ///
        /// # Panics
        /// When `row` goes past the end of the destination.
        #[target_feature(enable = "avx2")]
        #[allow(clippy::cast_ptr_alignment)] // the load takes any address; the stores' are 32-byte aligned
        pub(super) unsafe fn push(&mut self, mut row: &[u8]) {
            assert!(self.at + row.len() <= self.dst.len(), "rows past the end of the destination");
            let (head, len) = (self.head(), self.dst.len());
            // Plain bytes: the head, and the tail after the last whole part.
            let tail = head + (len - head) / 32 * 32;
            let plain = |this: &mut Self, row: &mut &[u8], until: usize| {
                let n = until.saturating_sub(this.at).min(row.len());
                for (d, s) in this.dst[this.at..this.at + n].iter_mut().zip(&row[..n]) {
                    d.write(*s);
                }
                (this.at, *row) = (this.at + n, &row[n..]);
            };
            plain(self, &mut row, head);
            while !row.is_empty() && self.at < tail {
                let offset = (self.at - head) % 32;
                let base = self.at - offset;
                if offset == 0 && row.len() >= 32 {
                    // A whole part straight from the row.
                    // SAFETY: base + 32 <= tail <= len, dst + base is 32-byte aligned; the row holds 32 bytes.
                    unsafe {
                        let v = _mm256_loadu_si256(row.as_ptr().cast::<__m256i>());
                        _mm256_stream_si256(self.dst.as_mut_ptr().add(base).cast::<__m256i>(), v);
                    }
                    (self.at, row) = (self.at + 32, &row[32..]);
                    continue;
                }
                let n = (32 - offset).min(row.len());
                self.part[offset..offset + n].copy_from_slice(&row[..n]);
                (self.at, row) = (self.at + n, &row[n..]);
                if offset + n == 32 {
                    // SAFETY: as above; the gathered part is whole.
                    unsafe {
                        let v = _mm256_loadu_si256(self.part.as_ptr().cast::<__m256i>());
                        _mm256_stream_si256(self.dst.as_mut_ptr().add(base).cast::<__m256i>(), v);
                    }
                }
            }
            plain(self, &mut row, len);
        }

        /// Checks that the rows filled the destination.
        ///
        /// # Panics
        /// When they did not.
        pub(super) fn finish(self) {
            assert_eq!(self.at, self.dst.len(), "the rows fill the destination");
        }
    }

    /// Writes mask byte `o` of `mask` as bit `o` of `bits` says (1 where set, 0 where not), a cache line at a
    /// time with non-temporal stores where `mask` is 64-byte aligned: the batch's mask goes to another
    /// thread.
    ///
    /// # Safety
    /// AVX2 must be available.
    ///
    /// # Panics
    /// When `bits` holds fewer bits than `mask` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn expand_bits(bits: &[u64], mask: &mut [MaybeUninit<u8>]) {
        assert!(bits.len() * 64 >= mask.len(), "a bit for every mask byte");
        let bit = |o: usize| ((bits[o / 64] >> (o % 64)) & 1) as u8;
        let head = mask.as_ptr().align_offset(64).min(mask.len());
        let lines = (mask.len() - head) / 64;
        for (o, m) in mask[..head].iter_mut().enumerate() {
            m.write(bit(o));
        }
        let out = mask[head..].as_mut_ptr().cast::<u8>();
        // SAFETY: AVX2 (and AVX-512 where used) is present; `lines` whole lines from `out` lie in `mask`.
        unsafe {
            if avx512_available() {
                expand_lines_avx512(bits, head, out, lines);
            } else {
                expand_lines_avx2(bits, head, out, lines);
            }
        }
        for (o, m) in mask.iter_mut().enumerate().skip(head + lines * 64) {
            m.write(bit(o));
        }
    }

    /// The 64 bits from bit `head + 64 · k` (those past the last word zero).
    #[inline]
    fn bits64(bits: &[u64], head: usize, k: usize) -> u64 {
        let (w, shift) = (head / 64 + k, head % 64);
        let next = bits.get(w + 1).copied().unwrap_or(0);
        if shift == 0 { bits[w] } else { (bits[w] >> shift) | (next << (64 - shift)) }
    }

    /// Lines `k < lines` of [`expand_bits`]: 64 mask bytes at `out + 64 · k` from [`bits64`].
    ///
    /// # Safety
    /// AVX2 must be available; `out` 64-byte aligned and valid for `64 · lines` writes.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::cast_ptr_alignment)] // `out` is 64-byte aligned
    unsafe fn expand_lines_avx2(bits: &[u64], head: usize, out: *mut u8, lines: usize) {
        // Byte j of a vector takes byte j / 8 of 32 bits, then keeps bit j % 8 of it.
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64.cast_signed());
        let one = _mm256_set1_epi8(1);
        let bytes = |half: u32| {
            let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(half.cast_signed()), spread);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), one)
        };
        for k in 0..lines {
            let word = bits64(bits, head, k);
            // SAFETY: the caller's bounds and alignment.
            unsafe {
                let line = out.add(64 * k).cast::<__m256i>();
                _mm256_stream_si256(line, bytes(word as u32));
                _mm256_stream_si256(line.add(1), bytes((word >> 32) as u32));
            }
        }
    }

    /// [`expand_lines_avx2`] with AVX-512: a line from its 64 bits in one instruction.
    ///
    /// # Safety
    /// AVX-512 F and BW must be available; `out` 64-byte aligned and valid for `64 · lines` writes.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    #[allow(clippy::cast_ptr_alignment)] // `out` is 64-byte aligned
    unsafe fn expand_lines_avx512(bits: &[u64], head: usize, out: *mut u8, lines: usize) {
        for k in 0..lines {
            let line = _mm512_maskz_set1_epi8(bits64(bits, head, k), 1);
            // SAFETY: the caller's bounds and alignment.
            unsafe { _mm512_stream_si512(out.add(64 * k).cast::<__m512i>(), line) };
        }
    }

    /// [`super::prepare_block`] for rows of whole vectors, written with non-temporal stores (each row's
    /// values and mask bytes follow the previous row's, so lines fill in order): a batch goes to another
    /// thread unread, and the buffers it is made in, freed after the prefetch window, are no longer in the
    /// cache, whose lines regular stores would first read from memory. Values are streamed where `out` is
    /// 32-byte aligned, mask bytes where `mask` is 8-byte aligned, and written through the cache otherwise.
    ///
    /// # Safety
    /// AVX2 must be available; `cols` a multiple of 8; `(rows − 1) · stride + cols <= values.len()`;
    /// `out` and `mask` at least `rows · cols` long.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::cast_ptr_alignment)] // the mask's 8-byte stores are unaligned where not streamed
    pub(super) unsafe fn prepare_rows_streamed(
        values: &[f32],
        stride: usize,
        (rows, cols): (usize, usize),
        (mean, inv): (f32, f32),
        fill: f32,
        out: &mut [MaybeUninit<f32>],
        mask: &mut [MaybeUninit<u8>],
    ) {
        let (mean, inv, fill) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv), _mm256_set1_ps(fill));
        let (out, mask) = (out.as_mut_ptr().cast::<f32>(), mask.as_mut_ptr().cast::<u8>());
        let (stream_values, stream_mask) = (out.addr().is_multiple_of(32), mask.addr().is_multiple_of(8));
        for r in 0..rows {
            for k in (0..cols).step_by(8) {
                let o = r * cols + k;
                // SAFETY: r · stride + k + 8 <= (rows − 1) · stride + cols <= values.len(), and o + 8 <=
                // rows · cols, within `out` and `mask` (the caller's bounds); 32-byte alignment of `out + o`
                // follows from that of `out` (o a multiple of 8), 8-byte alignment of `mask + o` likewise.
                unsafe {
                    let x = _mm256_loadu_ps(values.as_ptr().add(r * stride + k));
                    let (y, valid) = prepared(x, (mean, inv), fill);
                    let bytes = BYTES_OF_BITS[valid as usize];
                    if stream_values {
                        _mm256_stream_ps(out.add(o), y);
                    } else {
                        _mm256_storeu_ps(out.add(o), y);
                    }
                    if stream_mask {
                        _mm_stream_si64(mask.add(o).cast::<i64>(), bytes.cast_signed());
                    } else {
                        mask.add(o).cast::<u64>().write_unaligned(bytes);
                    }
                }
            }
        }
    }

    /// Byte `j` is 1 where bit `j` of the index is set: an 8-lane validity bit mask as 8 mask bytes.
    static BYTES_OF_BITS: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut bit = 0;
            while bit < 8 {
                if i & (1 << bit) != 0 {
                    table[i] |= 1 << (8 * bit);
                }
                bit += 1;
            }
            i += 1;
        }
        table
    };

    /// See [`super::transpose_rows`]; with `avx512`, pairs of groups are written by AVX-512 code.
    ///
    /// # Safety
    /// AVX2 (and with `avx512`, AVX-512 F, BW and VL) must be available; the bounds
    /// [`super::transpose_rows_on`] checks must hold.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose_rows(
        rows: &[Row<'_>],
        samples: usize,
        fill: f32,
        (dest, mut mask): (&Dest<'_>, Mask<'_>),
        (tile, avx512): (usize, bool),
    ) {
        // Every sample's start in the same place of a line, as this one's: the lines pairs of groups fill.
        let out = dest.starts[0];
        // Groups start where a line does only when lines can be filled at all (every sample's row starting at
        // the same offset within a line); otherwise at the first row, leaving the fewest to the scalar path.
        let alike = dest.aligned_alike();
        let start = if alike { line_start(rows, out) } else { 0 };
        let (vector, scalar) = groups(rows, start);
        let lanes = |k: usize, f: fn(&Row<'_>) -> f32| {
            let mut lane = [0.0f32; GROUP];
            for (j, l) in lane.iter_mut().enumerate() {
                *l = f(&rows[k + j]);
            }
            // SAFETY: AVX2 is enabled for this function; `lane` holds 8 floats.
            unsafe { _mm256_loadu_ps(lane.as_ptr()) }
        };
        let affine: Vec<(__m256, __m256)> =
            vector.iter().map(|&k| (lanes(k, |r| r.affine.0), lanes(k, |r| r.affine.1))).collect();
        let fill_v = _mm256_set1_ps(fill);
        let whole = samples / GROUP * GROUP;
        let lines = alike && fills_lines(rows, &vector, out);
        let tiles = (0..whole).step_by(tile);
        let blocks = |p0: usize| (p0..(p0 + tile).min(whole)).step_by(GROUP);
        // SAFETY (of the loads and `put`s below): s0 + 8 <= samples <= every row's length; each store lands
        // at col + j from the start of sample s0 + i, for i, j < 8, the columns col .. col + 8 being those of
        // the rows of the group, below the room of every start (checked by the caller), and its validity at
        // col + j from the sample's mask place (with `staged`, less that of the tile's first sample p0:
        // inside the staging's tile · stride bytes, as s0 + i < p0 + tile and col + j < stride); with
        // `lines`, the first column of each pair starts a 64-byte line of every sample (all starting alike),
        // so every non-temporal store is 32-byte aligned.
        let load = |k: usize, s0: usize| unsafe { transpose8(load8(rows, k, s0)) };
        // Mask bytes of one batch: each tile's mask rows are made in a buffer of this thread (in its cache)
        // and streamed to the batch after: written in place, each of their cache lines would first be read
        // from memory.
        let stride = dest.stride.filter(|_| matches!(mask, Mask::Bytes(_))).unwrap_or(0);
        let staged = stride > 0 && tile * stride <= STAGING_BYTES && cover_every_column(rows, stride);
        let mut staging = if staged { STAGING.take() } else { Vec::new() };
        if staged && staging.len() < tile * stride {
            staging = vec![0; tile * stride];
        }
        // Where the validity of a value goes: its byte, in the batch or in the staging of its tile (less
        // `shift`, the mask place of the tile's first sample), or its bit.
        let mask_at = match &mut mask {
            _ if staged => MaskAt { base: staging.as_mut_ptr(), bits: false },
            Mask::Bytes(bytes) => MaskAt { base: bytes.as_mut_ptr().cast::<u8>(), bits: false },
            Mask::Bits(words) => MaskAt { base: words.as_mut_ptr().cast::<u8>(), bits: true },
        };
        // Only the AVX-512 code tells pairs as stored from the others.
        let as_stored: Vec<bool> = if avx512 {
            affine.chunks(2).map(|a| a.len() == 2 && a.iter().all(|&a| is_identity(a))).collect()
        } else {
            Vec::new()
        };
        let pairs = Pairs {
            rows,
            vector: &vector,
            affine: &affine,
            as_stored: &as_stored,
            whole,
            tile,
            fill: fill_v,
            dest,
            mask: mask_at,
        };
        let singles = |p0: usize, shift: usize| {
            for (&k, &affine) in vector.iter().zip(&affine) {
                let col = rows[k].col;
                for s0 in blocks(p0) {
                    for (i, x) in load(k, s0).into_iter().enumerate() {
                        let (out, m) = unsafe { pairs.at(s0 + i, col, shift) };
                        unsafe { put::<false>(out, m, x, affine, fill_v) };
                    }
                }
            }
        };
        for p0 in tiles {
            let shift = if staged { dest.masks[p0] } else { 0 };
            if lines {
                // SAFETY: as above; AVX-512 is present where it is used.
                unsafe {
                    if avx512 {
                        pairs_avx512(&pairs, p0, shift);
                    } else {
                        pairs_avx2(&pairs, p0, shift);
                    }
                }
            } else {
                singles(p0, shift);
            }
            if staged && let Mask::Bytes(bytes) = &mut mask {
                let n = (p0 + tile).min(whole) - p0;
                // SAFETY: the staging holds `tile · stride` initialized bytes, the tile's rows written
                // through `mask_at` above (not used while this view lives).
                let tile = unsafe { std::slice::from_raw_parts(mask_at.base, n * stride) };
                unsafe { stream_copy(tile, &mut bytes[shift..shift + n * stride]) };
            }
        }
        if staged {
            STAGING.set(staging);
        }
        if lines || staged {
            // Non-temporal stores are weakly ordered: visible to the thread that receives the batch only
            // after this fence.
            _mm_sfence();
        }
        for &k in &scalar {
            transpose_scalar(rows, k..k + 1, (0..whole, tile), fill, dest, &mut mask);
        }
        transpose_scalar(rows, 0..rows.len(), (whole..samples, tile), fill, dest, &mut mask);
    }

    /// Where a vector of values writes its validity: mask bytes, or the bits of [`Mask::Bits`].
    #[derive(Clone, Copy)]
    struct MaskAt {
        base: *mut u8,
        bits: bool,
    }

    impl MaskAt {
        /// Writes the validity of values `o .. o + 8`, bit `j` of `valid` that of value `o + j`, as bytes or
        /// bits (a whole byte of bits stored, or set in the bits it shares with other values).
        ///
        /// # Safety
        /// Bytes: `base + o .. base + o + 8` must be writable. Bits: word `o / 64` (and, where set bits
        /// cross into it, the next) must lie in the words at `base`, which must be 8-byte aligned.
        #[inline]
        #[allow(clippy::cast_ptr_alignment)] // bits: the base of `u64` words; bytes: an unaligned store
        unsafe fn put8(self, o: usize, valid: u32) {
            // SAFETY: the caller's bounds.
            unsafe {
                if self.bits && o.is_multiple_of(8) {
                    *self.base.add(o / 8) = valid as u8;
                } else if self.bits {
                    self.or_bits(o, valid);
                } else {
                    self.base.add(o).cast::<u64>().write_unaligned(BYTES_OF_BITS[valid as usize]);
                }
            }
        }

        /// Writes the validity of values `o .. o + 16`, bit `j` of `valid` that of value `o + j`: 16 bytes
        /// in one store, or the bits (two bytes stored where they start one).
        ///
        /// # Safety
        /// As [`MaskAt::put8`]'s, for 16 values; AVX-512 BW and VL available.
        #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
        #[inline]
        #[allow(clippy::cast_ptr_alignment)] // unaligned stores
        unsafe fn put16(self, o: usize, valid: u16) {
            // SAFETY: the caller's bounds.
            unsafe {
                if self.bits && o.is_multiple_of(16) {
                    self.base.add(o / 8).cast::<u16>().write_unaligned(valid);
                } else if self.bits {
                    self.or_bits(o, u32::from(valid));
                } else {
                    _mm_storeu_si128(self.base.add(o).cast::<__m128i>(), _mm_maskz_set1_epi8(valid, 1));
                }
            }
        }

        /// Sets the bits of `valid` (at most 16) from bit `o`.
        ///
        /// # Safety
        /// As [`MaskAt::put8`]'s, for bits.
        #[inline]
        #[allow(clippy::cast_ptr_alignment)] // the base of `u64` words
        unsafe fn or_bits(self, o: usize, valid: u32) {
            let (words, shift) = (self.base.cast::<u64>(), o % 64);
            // SAFETY: the caller's bounds.
            unsafe {
                *words.add(o / 64) |= u64::from(valid) << shift;
                // Set bits past the word's end (of values inside the mask, so the next word exists).
                let past = if shift > 48 { u64::from(valid) >> (64 - shift) } else { 0 };
                if past != 0 {
                    *words.add(o / 64 + 1) |= past;
                }
            }
        }
    }

    /// Whether the processor has the AVX-512 subsets [`put_pair_avx512`] uses.
    pub(super) fn avx512_available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// What the rows of one transpose are written with where pairs of groups fill whole lines of each
    /// sample: see [`transpose_rows`].
    struct Pairs<'p, 'r> {
        rows: &'p [Row<'r>],
        /// The first row of each group, pairs of groups side by side.
        vector: &'p [usize],
        /// Each group's `(mean, inv)`, a lane per row.
        affine: &'p [(__m256, __m256)],
        /// For each pair, whether both its groups are delivered as stored (affine `(0, 1)`).
        as_stored: &'p [bool],
        /// Samples in whole groups of 8.
        whole: usize,
        /// Samples handled together.
        tile: usize,
        fill: __m256,
        dest: &'p Dest<'p>,
        /// The mask, the staging of the tile's mask rows, or bits.
        mask: MaskAt,
    }

    impl Pairs<'_, '_> {
        /// Where column `col` of sample `p` goes, and its validity (the mask place less `shift`).
        ///
        /// # Safety
        /// `p` must be below the samples of the transpose (which has a place for each).
        #[inline]
        unsafe fn at(&self, p: usize, col: usize, shift: usize) -> (*mut f32, (MaskAt, usize)) {
            // SAFETY: the caller's (the places' lengths were checked by `transpose_rows_on`).
            let (start, mask) =
                unsafe { (*self.dest.starts.get_unchecked(p), *self.dest.masks.get_unchecked(p)) };
            (start.wrapping_add(col), (self.mask, mask + col - shift))
        }
    }

    /// The samples `p0 .. p0 + t.tile` of every pair of groups: each sample receives 16 consecutive values,
    /// a whole line, streamed, and their 16 mask bytes (a last group without a pair, 8 through the cache).
    /// Compiled twice, for AVX2 and for AVX-512, whose comparisons give a bit mask: 16 mask bytes in one
    /// store, where AVX2 makes 8 at a time from a table.
    ///
    /// # Safety
    /// AVX2 (and with `AVX512`, AVX-512 F, BW and VL) must be available; the bounds of [`transpose_rows`]
    /// hold for `t`, with `shift` that of the tile's staging (0 without).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    unsafe fn pairs_of<const AVX512: bool>(t: &Pairs<'_, '_>, p0: usize, shift: usize) {
        for (pair, affine) in t.vector.chunks(2).zip(t.affine.chunks(2)) {
            for s0 in (p0..(p0 + t.tile).min(t.whole)).step_by(GROUP) {
                // SAFETY: the caller's.
                unsafe { pair_at::<AVX512>(t, (pair, affine), s0, shift) };
            }
        }
    }

    /// Samples `s0 .. s0 + 8` of a pair of groups (or of a last group without a pair), as [`pairs_of`].
    ///
    /// # Safety
    /// As [`pairs_of`]'s, with `s0 + 8 <= t.whole`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    unsafe fn pair_at<const AVX512: bool>(
        t: &Pairs<'_, '_>,
        (pair, affine): (&[usize], &[(__m256, __m256)]),
        s0: usize,
        shift: usize,
    ) {
        let col = t.rows[pair[0]].col;
        // SAFETY (here and below): as in `transpose_rows`.
        let a = unsafe { transpose8(load8(t.rows, pair[0], s0)) };
        let Some(&second) = pair.get(1) else {
            for (i, x) in a.into_iter().enumerate() {
                let (out, mask) = unsafe { t.at(s0 + i, col, shift) };
                unsafe { put::<false>(out, mask, x, affine[0], t.fill) };
            }
            return;
        };
        let b = unsafe { transpose8(load8(t.rows, second, s0)) };
        for i in 0..GROUP {
            let (out, mask) = unsafe { t.at(s0 + i, col, shift) };
            unsafe {
                if AVX512 {
                    put_pair_avx512(out, mask, (a[i], b[i]), (affine[0], affine[1]), t.fill);
                } else {
                    put::<true>(out, mask, a[i], affine[0], t.fill);
                    put::<true>(out.add(GROUP), (mask.0, mask.1 + GROUP), b[i], affine[1], t.fill);
                }
            }
        }
    }

    /// [`pairs_of`] for AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn pairs_avx2(t: &Pairs<'_, '_>, p0: usize, shift: usize) {
        // SAFETY: the caller's.
        unsafe { pairs_of::<false>(t, p0, shift) };
    }

    /// [`pairs_of`] for AVX-512. The pairs of groups whose values are delivered as stored (the affine
    /// `(0, 1)`) are transposed in 512-bit registers, a whole line of 16 values of each of 8 samples at a
    /// time, each written in one non-temporal store: a third fewer shuffles per value than two 8 × 8
    /// transposes, and half the stores. The others go through [`put_pair_avx512`]: 512-bit arithmetic can
    /// lower the core's clock (with it, in a trial, the zstd decoding that follows on the core ran slower).
    ///
    /// # Safety
    /// As [`pairs_of`]'s, AVX-512 F, BW and VL available.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    unsafe fn pairs_avx512(t: &Pairs<'_, '_>, p0: usize, shift: usize) {
        let end = (p0 + t.tile).min(t.whole);
        let fill = widen(t.fill, t.fill);
        let pairs = t.vector.chunks(2).zip(t.affine.chunks(2)).zip(t.as_stored);
        for ((pair, affine), &as_stored) in pairs {
            let wide = match *pair {
                [first, second] if as_stored => Some((first, second)),
                _ => None,
            };
            for s0 in (p0..end).step_by(GROUP) {
                let Some((first, second)) = wide else {
                    // SAFETY: the caller's.
                    unsafe { pair_at::<true>(t, (pair, affine), s0, shift) };
                    continue;
                };
                let col = t.rows[first].col;
                // SAFETY: as in `transpose_rows`.
                let lines = transpose16x8(&unsafe { load16x8(t.rows, (first, second), s0) });
                for (i, x) in lines.into_iter().enumerate() {
                    let (out, (mask, o)) = unsafe { t.at(s0 + i, col, shift) };
                    let valid = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
                    // SAFETY: as in `transpose_rows`; `out` starts a line of the batch (`fills_lines`).
                    unsafe {
                        _mm512_stream_ps(out, _mm512_mask_blend_ps(valid, fill, x));
                        mask.put16(o, valid);
                    }
                }
            }
        }
    }

    /// Whether a group's affine leaves every value as stored: `(0, 1)` in every lane.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn is_identity((mean, inv): (__m256, __m256)) -> bool {
        let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
        // Equal as integers: a mean of -0 is not the identity for a value of +0.
        let eq = |a: __m256, b: __m256| {
            _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b))) == -1
        };
        eq(mean, zero) && eq(inv, one)
    }

    /// The 512-bit vector of `lo` then `hi`.
    #[target_feature(enable = "avx2,avx512f")]
    #[inline]
    fn widen(lo: __m256, hi: __m256) -> __m512 {
        let lo = _mm512_castps_pd(_mm512_castps256_ps512(lo));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, _mm256_castps_pd(hi)))
    }

    /// Rows `first .. first + 8` at sample `s0`, 8 values each, beside rows `second .. second + 8`: vector
    /// `j` holds row `first + j` then row `second + j`.
    ///
    /// # Safety
    /// AVX-512 F must be available; the rows must exist and hold `s0 + 8` values.
    #[target_feature(enable = "avx2,avx512f")]
    #[inline]
    unsafe fn load16x8(rows: &[Row<'_>], (first, second): (usize, usize), s0: usize) -> [__m512; 8] {
        // SAFETY: the caller's.
        let (a, b) = unsafe { (load8(rows, first, s0), load8(rows, second, s0)) };
        std::array::from_fn(|j| widen(a[j], b[j]))
    }

    /// [`transpose8`] of both halves at once: vector `i` of the result holds element `i` of the lower
    /// halves of every vector of `rows`, then element `i` of their upper halves.
    #[target_feature(enable = "avx2,avx512f")]
    #[inline]
    fn transpose16x8(rows: &[__m512; 8]) -> [__m512; 8] {
        let pairs: [__m512; 8] = std::array::from_fn(|i| {
            let (lo, hi) = (rows[i & !1], rows[i | 1]);
            if i % 2 == 0 { _mm512_unpacklo_ps(lo, hi) } else { _mm512_unpackhi_ps(lo, hi) }
        });
        let quads: [__m512; 8] = std::array::from_fn(|j| {
            let (first, k) = (j & !3, j & 3);
            let (lo, hi) = (pairs[first + k / 2], pairs[first + k / 2 + 2]);
            if k % 2 == 0 { _mm512_shuffle_ps::<0x44>(lo, hi) } else { _mm512_shuffle_ps::<0xEE>(lo, hi) }
        });
        // 128-bit lanes 0 of `lo`, 0 of `hi`, 2 of `lo`, 2 of `hi` (and 1, 1, 3, 3): both 256-bit halves
        // transposed at once.
        let (even, odd) = (
            _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
            _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31),
        );
        std::array::from_fn(|i| {
            let (lo, hi) = (quads[i % 4], quads[i % 4 + 4]);
            _mm512_permutex2var_ps(lo, if i < 4 { even } else { odd }, hi)
        })
    }

    /// Writes two groups' values of one sample, prepared as [`super::prepare`] does, at `out[..16]` with
    /// non-temporal stores, and their validity, values `o .. o + 16` of `mask`, in one store: the
    /// comparisons' bit masks select the fill and make the mask bytes (or are the bits).
    ///
    /// # Safety
    /// `out` must be valid for 16 writes and 32-byte aligned; `mask` as [`MaskAt::put8`] requires, for 16
    /// values.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn put_pair_avx512(
        out: *mut f32,
        (mask, o): (MaskAt, usize),
        (a, b): (__m256, __m256),
        ((mean_a, inv_a), (mean_b, inv_b)): ((__m256, __m256), (__m256, __m256)),
        fill: __m256,
    ) {
        let (valid_a, valid_b) =
            (_mm256_cmp_ps_mask::<_CMP_ORD_Q>(a, a), _mm256_cmp_ps_mask::<_CMP_ORD_Q>(b, b));
        let ya = _mm256_mask_blend_ps(valid_a, fill, _mm256_mul_ps(_mm256_sub_ps(a, mean_a), inv_a));
        let yb = _mm256_mask_blend_ps(valid_b, fill, _mm256_mul_ps(_mm256_sub_ps(b, mean_b), inv_b));
        // SAFETY: the caller's bounds and alignment.
        unsafe {
            _mm256_stream_ps(out, ya);
            _mm256_stream_ps(out.add(GROUP), yb);
            mask.put16(o, u16::from(valid_a) | (u16::from(valid_b) << 8));
        }
    }

    /// Rows `k .. k + 8` at sample `s0`, 8 values each.
    ///
    /// # Safety
    /// AVX2 must be available; the rows must exist and hold `s0 + 8` values.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(rows: &[Row<'_>], k: usize, s0: usize) -> [__m256; 8] {
        let rows = &rows[k..k + GROUP];
        // SAFETY: the caller's bounds.
        std::array::from_fn(|j| unsafe { _mm256_loadu_ps(rows[j].values.as_ptr().add(s0)) })
    }

    /// Writes 8 values prepared as [`super::prepare`] does at `out[..8]` (non-temporal stores with `STREAM`)
    /// and their validity, values `o .. o + 8` of `mask`.
    ///
    /// # Safety
    /// `out` must be valid for 8 writes, with `STREAM` 32-byte aligned; `mask` as [`MaskAt::put8`] requires.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn put<const STREAM: bool>(
        out: *mut f32,
        (mask, o): (MaskAt, usize),
        x: __m256,
        (mean, inv): (__m256, __m256),
        fill: __m256,
    ) {
        let (y, valid) = prepared(x, (mean, inv), fill);
        // SAFETY: the caller's bounds and alignment.
        unsafe {
            if STREAM {
                _mm256_stream_ps(out, y);
            } else {
                _mm256_storeu_ps(out, y);
            }
            mask.put8(o, valid);
        }
    }

    /// 8 values prepared as [`super::prepare`] does, and their validity, bit `j` that of value `j`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn prepared(x: __m256, (mean, inv): (__m256, __m256), fill: __m256) -> (__m256, u32) {
        let missing = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let y = _mm256_blendv_ps(_mm256_mul_ps(_mm256_sub_ps(x, mean), inv), fill, missing);
        (y, (!_mm256_movemask_ps(missing) & 0xff).cast_unsigned())
    }

    /// The 8 × 8 transpose: vector `i` of the result holds element `i` of every vector of `a`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn transpose8(a: [__m256; 8]) -> [__m256; 8] {
        let t = [
            _mm256_unpacklo_ps(a[0], a[1]),
            _mm256_unpackhi_ps(a[0], a[1]),
            _mm256_unpacklo_ps(a[2], a[3]),
            _mm256_unpackhi_ps(a[2], a[3]),
            _mm256_unpacklo_ps(a[4], a[5]),
            _mm256_unpackhi_ps(a[4], a[5]),
            _mm256_unpacklo_ps(a[6], a[7]),
            _mm256_unpackhi_ps(a[6], a[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(k: usize) -> f32 {
        if k % 7 == 3 { f32::NAN } else { (k as f32).sin() * 40.0 }
    }

    /// Rows of many lengths (whole 32-byte parts, less, more, a part split over several rows, empty rows)
    /// land in order in destinations starting at every offset from a 32-byte boundary, and nothing is
    /// written outside them.
    #[test]
    fn rows_are_streamed_in_order() {
        let lengths = [0, 1, 31, 32, 33, 5, 0, 64, 100, 2016, 3, 29, 96, 7];
        let rows: Vec<Vec<u8>> =
            lengths.iter().enumerate().map(|(k, &n)| (0..n).map(|i| (k * 37 + i) as u8).collect()).collect();
        let all: Vec<u8> = rows.concat();
        for first in 0..40 {
            let mut buffer = vec![MaybeUninit::new(0xEEu8); all.len() + 128];
            let start = buffer.as_ptr().align_offset(32) + first;
            stream_rows(rows.iter().map(Vec::as_slice), &mut buffer[start..start + all.len()]);
            fence();
            // SAFETY: every byte was initialized above.
            let got: Vec<u8> = buffer.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(&got[start..start + all.len()], &all[..], "destination at offset {first}");
            assert!(got[..start].iter().chain(&got[start + all.len()..]).all(|&b| b == 0xEE), "outside");
        }
    }

    /// Rows that do not fill the destination are an error, not a batch left partly unwritten.
    #[test]
    #[should_panic(expected = "fill the destination")]
    fn rows_must_fill_the_destination() {
        let mut buffer = vec![MaybeUninit::new(0u8); 100];
        stream_rows([&[1u8; 40][..], &[2u8; 40][..]], &mut buffer);
    }

    /// `n` floats set to `x`, and where in them a 64-byte boundary is.
    fn aligned(n: usize, x: f32) -> (Vec<MaybeUninit<f32>>, usize) {
        let buffer = vec![MaybeUninit::new(x); n + 16];
        let offset = buffer.as_ptr().cast::<f32>().align_offset(64);
        (buffer, offset)
    }

    /// Every instruction set this processor has (the scalar path, AVX2, AVX-512), in small and large tiles,
    /// with the mask as bytes or as bits, gives what the element-by-element definition gives, bit for bit,
    /// and writes nothing else.
    fn assert_as_defined(rows: &[Row<'_>], samples: usize, stride: usize, shift: usize) {
        let fill = -7.5;
        let cells = samples * stride;
        let mut results = Vec::new();
        let runs =
            Isa::available().into_iter().flat_map(|isa| [SMALL_TILE, LARGE_TILE].map(|tile| (isa, tile)));
        for (isa, tile) in runs {
            for as_bits in [false, true] {
                let (mut data, at) = aligned(cells + shift, f32::INFINITY);
                let at = at + shift;
                let mut mask = vec![MaybeUninit::new(9u8); cells];
                // Bits: those not written stay 0; bytes of the mask where a bit is set become 1, others
                // keep their 9 (that a missing value's byte is 0 is checked with bytes).
                let mut bits = vec![0u64; cells.div_ceil(64)];
                let out = &mut data[at..at + cells];
                let mask_out = if as_bits { Mask::Bits(&mut bits) } else { Mask::Bytes(&mut mask) };
                transpose_rows_on(
                    isa,
                    tile,
                    rows,
                    samples,
                    fill,
                    &Dest::batch(out, samples, stride),
                    mask_out,
                );
                results.push((
                    format!("{isa:?}, tile {tile}, mask as bits {as_bits}"),
                    data[at..at + cells].to_vec(),
                    mask,
                    as_bits.then_some(bits),
                ));
            }
        }
        let mut expected: Vec<(u32, u8)> = vec![(f32::INFINITY.to_bits(), 9); cells];
        for row in rows {
            for p in 0..samples {
                let x = row.values[p];
                let (mean, inv) = row.affine;
                let e = if x.is_nan() { (fill, 0) } else { ((x - mean) * inv, 1) };
                expected[p * stride + row.col] = (e.0.to_bits(), e.1);
            }
        }
        let bits = |d: &[MaybeUninit<f32>], m: &[MaybeUninit<u8>]| -> Vec<(u32, u8)> {
            // SAFETY: every element was initialized (to infinity and 9) before the transpose.
            d.iter().zip(m).map(|(x, m)| unsafe { (x.assume_init().to_bits(), m.assume_init()) }).collect()
        };
        let n_rows = rows.len();
        for (what, data, mask, as_bits) in &results {
            let Some(words) = as_bits else {
                assert_eq!(bits(data, mask), expected, "{what}: {samples} samples, {n_rows} rows");
                continue;
            };
            let set = |o: usize| (words[o / 64] >> (o % 64)) & 1 == 1;
            let got: Vec<(u32, u8)> = bits(data, mask)
                .into_iter()
                .enumerate()
                .map(|(o, (x, m))| (x, if set(o) { 1 } else { m }))
                .collect();
            let want: Vec<(u32, u8)> =
                expected.iter().map(|&(x, m)| (x, if m == 0 { 9 } else { m })).collect();
            assert_eq!(got, want, "{what}: {samples} samples, {n_rows} rows");
            assert!((cells..words.len() * 64).all(|o| !set(o)), "{what}: bits past the mask");
        }
    }

    /// The bits of a mask become its bytes, whatever the alignment and length of the destination, and
    /// nothing around it is written; [`with_mask_staged`] hands a transpose bits or bytes and leaves the
    /// mask as the transpose made it.
    #[test]
    fn mask_bits_become_mask_bytes() {
        let words: Vec<u64> = (0..40u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k << 17)).collect();
        let set = |o: usize| u8::from((words[o / 64] >> (o % 64)) & 1 == 1);
        for len in [0, 1, 31, 64, 65, 127, 1000, 40 * 64] {
            for shift in [0, 1, 8, 31, 32, 63] {
                let mut buffer = vec![MaybeUninit::new(9u8); len + 128];
                let at = buffer.as_ptr().align_offset(64) + shift;
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present.
                    unsafe { avx2::expand_bits(&words, &mut buffer[at..at + len]) };
                    for (i, b) in buffer.iter().enumerate() {
                        // SAFETY: initialized above.
                        let b = unsafe { b.assume_init() };
                        let want = if (at..at + len).contains(&i) { set(i - at) } else { 9 };
                        assert_eq!(b, want, "length {len}, shift {shift}, byte {i}");
                    }
                }
                let mut mask = vec![MaybeUninit::new(9u8); len];
                with_mask_staged(&mut mask, |mut staged| {
                    for o in 0..len {
                        staged.set(o, set(o));
                    }
                });
                // SAFETY: initialized above.
                let got: Vec<u8> = mask.iter().map(|b| unsafe { b.assume_init() }).collect();
                assert_eq!(got, (0..len).map(set).collect::<Vec<u8>>(), "length {len}");
            }
        }
    }

    /// Ragged sample tails, row groups broken by a gap in the columns, a repeated (static) row, missing
    /// values, normalization.
    #[test]
    fn transpose_equals_the_definition() {
        // Up to several tiles of samples (small and large), the last one partial.
        for samples in [1, 7, 8, 9, 16, 23, 40, 2 * LARGE_TILE + 13] {
            for n_rows in [3, 8, 13, 24, 29] {
                let chunks: Vec<Vec<f32>> =
                    (0..n_rows).map(|r| (0..samples + 3).map(|p| value(r * 97 + p)).collect()).collect();
                // Columns consecutive except for a gap after row 11; row 5 repeats row 4's values.
                let rows: Vec<Row<'_>> = (0..n_rows)
                    .map(|r| Row {
                        values: &chunks[if r == 5 { 4 } else { r }],
                        col: r + usize::from(r > 11) * 2,
                        affine: if r % 3 == 0 { (0.0, 1.0) } else { (r as f32, 0.5) },
                    })
                    .collect();
                assert_as_defined(&rows, samples, n_rows + 4, 0);
            }
        }
    }

    /// Rows whose groups fill whole cache lines of each sample (written by non-temporal stores where the
    /// processor has AVX2): batch rows of 32 and 48 floats (the last 16 columns of those left alone), the
    /// batch starting anywhere the allocator may put it.
    #[test]
    fn whole_cache_lines_are_written_as_defined() {
        // Rows as stored (the affine (0, 1): AVX-512 transposes their pairs of groups in 512-bit registers),
        // and rows of which some are normalized.
        fn as_stored(_: usize) -> (f32, f32) {
            (0.0, 1.0)
        }
        fn mixed(r: usize) -> (f32, f32) {
            if r.is_multiple_of(2) { (0.0, 1.0) } else { (1.0, 2.0) }
        }
        // A group as stored, the other of its pair normalized.
        fn by_group(r: usize) -> (f32, f32) {
            if (r / 8).is_multiple_of(2) { (0.0, 1.0) } else { (1.0, 2.0) }
        }
        let affines: [fn(usize) -> (f32, f32); 3] = [as_stored, mixed, by_group];
        let runs = [8, 13, 2 * LARGE_TILE + 5]
            .into_iter()
            .flat_map(|samples| affines.map(move |affine| (samples, affine)));
        for (samples, affine) in runs {
            let chunks: Vec<Vec<f32>> =
                (0..32).map(|r| (0..samples).map(|p| value(r * 31 + p)).collect()).collect();
            let rows: Vec<Row<'_>> =
                (0..32).map(|r| Row { values: &chunks[r], col: r, affine: affine(r) }).collect();
            for stride in [32, 48] {
                // The batch starting on a line, or 4, 8 or 12 floats past one (the allocator's alignment
                // is 16 bytes): pairs of groups then start at row 0, 12, 8 or 4.
                for shift in [0, 4, 8, 12] {
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        let (buffer, at) = aligned(samples * stride + shift, 0.0);
                        let out = buffer[at + shift..].as_ptr().cast::<f32>();
                        let start = avx2::line_start(&rows, out);
                        assert_eq!(start, (16 - shift) % 16);
                        assert!(avx2::fills_lines(&rows, &avx2::groups(&rows, start).0, out));
                    }
                    assert_as_defined(&rows, samples, stride, shift);
                }
            }
        }
    }

    /// Rows that write every column of each sample (their mask made in the staging, then streamed): with
    /// groups in order, broken by rows out of order (left to the scalar path, written after the stream), a
    /// repeated (static) row; several tiles and a ragged tail of samples.
    #[test]
    fn rows_writing_every_column_are_written_as_defined() {
        for samples in [8, 9, LARGE_TILE, 2 * LARGE_TILE + 13] {
            for (stride, shuffled) in [(24, false), (29, false), (64, false), (29, true), (40, true)] {
                let chunks: Vec<Vec<f32>> =
                    (0..stride).map(|r| (0..samples).map(|p| value(r * 53 + p)).collect()).collect();
                let rows: Vec<Row<'_>> = (0..stride)
                    .map(|r| Row {
                        values: &chunks[if r == 2 { 1 } else { r }],
                        // Consecutive, or columns of the last 13 rows permuted (7 is prime to 13).
                        col: if shuffled && r >= stride - 13 { stride - 13 + (r * 7) % 13 } else { r },
                        affine: if r % 4 == 0 { (0.0, 1.0) } else { (r as f32, 0.25) },
                    })
                    .collect();
                #[cfg(target_arch = "x86_64")]
                assert!(avx2::cover_every_column(&rows, stride));
                assert_as_defined(&rows, samples, stride, 0);
            }
        }
    }

    /// A block copied row by row gives what [`prepare`] gives for each value (the vector path where the
    /// processor has it), and nothing past the block is written.
    #[test]
    fn prepare_block_equals_the_definition() {
        let fill = -3.0;
        for (rows, cols, stride) in [(16, 16, 32), (3, 5, 7), (1, 9, 9), (8, 24, 40), (2, 0, 4), (0, 16, 16)]
        {
            let values: Vec<f32> = (0..rows * stride).map(|k| value(k * 13 + 1)).collect();
            let cells = rows * cols;
            // The block starting on a 32-byte boundary or not (values streamed or not), and the mask on an
            // 8-byte boundary or not; nothing before or after the block written.
            for (shift, mask_shift) in [(0, 0), (4, 8), (8, 3), (1, 1)] {
                let (mut out, at) = aligned(cells + 16, f32::INFINITY);
                let mut mask = vec![MaybeUninit::new(9u8); cells + 80];
                let mask_at = mask.as_ptr().align_offset(64) + mask_shift;
                let (block, block_mask) = (at + shift..at + shift + cells + 3, mask_at..mask_at + cells + 3);
                let (out_block, mask_block) = (&mut out[block.clone()], &mut mask[block_mask.clone()]);
                prepare_block(&values, stride, (rows, cols), (1.5, 0.25), fill, out_block, mask_block);
                // What element `i` of a buffer holding the block from `start` should be (`f` picks the value
                // or the mask byte of a prepared value).
                let expected = |i: usize, start: usize, f: fn((f32, u8)) -> u32| match i.checked_sub(start) {
                    Some(k) if k < cells => f(prepare(values[k / cols * stride + k % cols], 1.5, 0.25, fill)),
                    _ => f((f32::INFINITY, 9)),
                };
                for (i, x) in out.iter().enumerate() {
                    // SAFETY: every element was initialized before the copy.
                    let x = unsafe { x.assume_init() }.to_bits();
                    assert_eq!(
                        x,
                        expected(i, block.start, |(x, _)| x.to_bits()),
                        "{rows}×{cols}+{shift}, {i}"
                    );
                }
                for (i, m) in mask.iter().enumerate() {
                    // SAFETY: as above.
                    let m = u32::from(unsafe { m.assume_init() });
                    let want = expected(i, block_mask.start, |(_, m)| u32::from(m));
                    assert_eq!(m, want, "{rows}×{cols}, mask +{mask_shift}, {i}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "batch too small")]
    fn destinations_outside_the_batch_are_refused() {
        let values = [1.0f32; 8];
        let rows = [Row { values: &values, col: 3, affine: (0.0, 1.0) }];
        let (mut data, mut mask) = (vec![MaybeUninit::new(0.0); 10], vec![MaybeUninit::new(0u8); 10]);
        transpose_rows(&rows, 8, 0.0, &Dest::batch(&mut data, 8, 4), Mask::Bytes(&mut mask));
    }

    /// Samples placed anywhere in several batches (the mixing of chunks) receive, with every instruction set
    /// and tile, what they receive as the samples of one batch, mask bits included, and nothing else is
    /// written.
    #[test]
    fn scattered_samples_are_written_as_in_one_batch() {
        let (samples, stride) = (40, 48);
        let chunks: Vec<Vec<f32>> =
            (0..stride).map(|r| (0..samples).map(|p| value(r * 29 + p)).collect()).collect();
        let rows: Vec<Row<'_>> = (0..stride)
            .map(|r| Row {
                values: &chunks[r],
                col: r,
                affine: if r % 5 == 0 { (1.0, 0.5) } else { (0.0, 1.0) },
            })
            .collect();
        // Sample p goes to batch p % 3, at slot (7 · p) % 40 / 3 spread over the three: a permutation.
        let order: Vec<usize> = (0..samples).map(|p| (7 * p) % samples).collect();
        let places: Vec<(usize, usize)> = order.iter().map(|&q| (q % 3, q / 3)).collect();
        let slots = samples.div_ceil(3);
        for isa in Isa::available() {
            for tile in [SMALL_TILE, LARGE_TILE] {
                let mut one = vec![MaybeUninit::new(f32::INFINITY); samples * stride];
                let mut one_bits = vec![0u64; (samples * stride).div_ceil(64)];
                transpose_rows_on(
                    isa,
                    tile,
                    &rows,
                    samples,
                    -1.0,
                    &Dest::batch(&mut one, samples, stride),
                    Mask::Bits(&mut one_bits),
                );
                // Each batch on a line, so that the vector paths stream whole lines of every sample.
                let mut lined: Vec<(Vec<MaybeUninit<f32>>, usize)> =
                    (0..3).map(|_| aligned(slots * stride, f32::INFINITY)).collect();
                let mut bits = vec![0u64; (3 * slots * stride).div_ceil(64)];
                {
                    let mut buffers: Vec<&mut [MaybeUninit<f32>]> =
                        lined.iter_mut().map(|(b, at)| &mut b[*at..*at + slots * stride]).collect();
                    let at: Vec<(usize, usize)> = places.iter().map(|&(b, s)| (b, s * stride)).collect();
                    let masks = places.iter().map(|&(b, s)| (b * slots + s) * stride).collect();
                    let dest = Dest::scattered(&mut buffers, &at, stride, masks);
                    transpose_rows_on(isa, tile, &rows, samples, -1.0, &dest, Mask::Bits(&mut bits));
                }
                fence();
                let batches: Vec<&[MaybeUninit<f32>]> =
                    lined.iter().map(|(b, at)| &b[*at..*at + slots * stride]).collect();
                let bit = |words: &[u64], o: usize| (words[o / 64] >> (o % 64)) & 1;
                let mut written = vec![vec![false; slots]; 3];
                for (p, &(b, s)) in places.iter().enumerate() {
                    written[b][s] = true;
                    for c in 0..stride {
                        // SAFETY: both were initialized above.
                        let (got, want) = unsafe {
                            (batches[b][s * stride + c].assume_init(), one[p * stride + c].assume_init())
                        };
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{isa:?}, tile {tile}, sample {p}, column {c}"
                        );
                        let (got, want) =
                            (bit(&bits, (b * slots + s) * stride + c), bit(&one_bits, p * stride + c));
                        assert_eq!(got, want, "{isa:?}, tile {tile}, mask of sample {p}, column {c}");
                    }
                }
                for (b, batch) in batches.iter().enumerate() {
                    for s in (0..slots).filter(|&s| !written[b][s]) {
                        // SAFETY: initialized above.
                        assert!(
                            batch[s * stride..(s + 1) * stride]
                                .iter()
                                .all(|x| unsafe { x.assume_init() } == f32::INFINITY)
                        );
                        assert!((0..stride).all(|c| bit(&bits, (b * slots + s) * stride + c) == 0));
                    }
                }
            }
        }
    }
}
