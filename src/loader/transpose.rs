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
//! to the batch from there.
//!
//! Where the processor has AVX-512 (F, BW, VL), the lines of values are written by code for it, still on
//! 256-bit vectors: a comparison gives a bit mask, which selects the fill and makes a line's 16 mask bytes
//! in one store, where AVX2 makes 8 at a time from a table (a `movemask`, a load and a store each).

use std::mem::MaybeUninit;

/// One row of that matrix: the values of all samples at one step of one variable, the batch column they go
/// to, and the affine that prepares them (`(0, 1)` leaves them as stored, bit for bit).
pub(crate) struct Row<'a> {
    pub values: &'a [f32],
    pub col: usize,
    pub affine: (f32, f32),
}

/// Samples handled together: every row is transposed for 8 samples (one 8 × 8 block's width) before the
/// next 8, so that the lines streamed at any moment lie in the rows of 8 samples, a few pages, not of 128.
/// (In `cubeload bench`, 8 against 128 raised `ratio_to_ceiling` from 0.72 to 0.74 in ten alternating pairs
/// out of ten; 16 did about as well as 8, 32 in between. 128 had been chosen over 16 when the batch was
/// written through the cache, each sample keeping a line in L1.)
const TILE: usize = 8;

/// Writes `data[p · stride + row.col]` and `mask[…]` for every row and every sample `p < samples`: the value
/// prepared as [`prepare`] does, or `fill` and 0 where it is missing. Nothing else of `data` is touched.
/// `mask_cached`: `mask` is a buffer of this thread in its cache ([`with_mask_staged`]), written in place.
///
/// # Panics
/// When a row holds fewer than `samples` values, or a destination lies outside `data` or `mask`.
pub(crate) fn transpose_rows(
    rows: &[Row<'_>],
    samples: usize,
    stride: usize,
    fill: f32,
    data: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<u8>],
    mask_cached: bool,
) {
    transpose_rows_on(Isa::best(), rows, samples, stride, fill, (data, mask), mask_cached);
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

/// [`transpose_rows`] with the instructions of `isa`, which the processor must have.
fn transpose_rows_on(
    isa: Isa,
    rows: &[Row<'_>],
    samples: usize,
    stride: usize,
    fill: f32,
    (data, mask): (&mut [MaybeUninit<f32>], &mut [MaybeUninit<u8>]),
    mask_cached: bool,
) {
    if samples == 0 || rows.is_empty() {
        return;
    }
    let last_col = rows.iter().map(|r| r.col).max().unwrap_or(0);
    let end = (samples - 1) * stride + last_col;
    assert!(end < data.len() && end < mask.len(), "batch too small for the rows");
    assert!(rows.iter().all(|r| r.values.len() >= samples), "row shorter than the samples");
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        assert!(std::arch::is_x86_feature_detected!("avx2"), "AVX2 is present");
        assert!(isa != Isa::Avx512 || avx2::avx512_available(), "AVX-512 is present");
        let avx512 = isa == Isa::Avx512;
        // SAFETY: AVX2 (and where used AVX-512) is present (asserted above); rows and destinations are in
        // bounds (asserted above).
        unsafe { avx2::transpose_rows(rows, samples, stride, fill, (data, mask), mask_cached, avx512) };
        return;
    }
    transpose_scalar(rows, 0..rows.len(), 0..samples, stride, fill, data, mask);
}

/// Runs `make` on a mask to be written to `mask`: where the processor has AVX2 and it fits, a buffer of
/// this thread, which stays in its cache while `make` writes it piece by piece (`true`: the mask is
/// cached), then streamed to `mask` whole cache lines at a time ([`fence`] before another thread reads it);
/// otherwise `mask` itself (`false`). For a batch made in several transposes, each writing a part of every
/// sample's mask row: streamed by each, the parts would begin and end inside cache lines, each such line
/// written to memory in pieces.
pub(crate) fn with_mask_staged<R>(
    mask: &mut [MaybeUninit<u8>],
    make: impl FnOnce(&mut [MaybeUninit<u8>], bool) -> R,
) -> R {
    #[cfg(target_arch = "x86_64")]
    if mask.len() <= avx2::STAGING_BYTES && std::arch::is_x86_feature_detected!("avx2") {
        let mut staging = avx2::STAGING.take();
        staging.resize(staging.len().max(mask.len()), 0);
        let staged = &mut staging[..mask.len()];
        // SAFETY: `u8` and `MaybeUninit<u8>` have one layout; only initialized bytes are written to it.
        let result = make(unsafe { &mut *(std::ptr::from_mut(staged) as *mut [MaybeUninit<u8>]) }, true);
        // SAFETY: AVX2 is present (checked above).
        unsafe { avx2::stream_copy(staged, mask) };
        avx2::STAGING.set(staging);
        return result;
    }
    make(mask, false)
}

/// The same, one value at a time, for `rows[rows_range]` and samples `samples`: the fallback, and the
/// edges the vector path leaves (ragged row groups and sample tails).
fn transpose_scalar(
    rows: &[Row<'_>],
    rows_range: std::ops::Range<usize>,
    samples: std::ops::Range<usize>,
    stride: usize,
    fill: f32,
    data: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<u8>],
) {
    for p0 in samples.clone().step_by(TILE) {
        let tile = p0..(p0 + TILE).min(samples.end);
        for row in &rows[rows_range.clone()] {
            let (mean, inv) = row.affine;
            for p in tile.clone() {
                let o = p * stride + row.col;
                let (value, valid) = prepare(row.values[p], mean, inv, fill);
                data[o].write(value);
                mask[o].write(valid);
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
        __m128i, __m256, __m256i, _CMP_ORD_Q, _CMP_UNORD_Q, _mm_maskz_set1_epi8, _mm_sfence,
        _mm_storeu_si128, _mm_stream_si64, _mm256_blendv_ps, _mm256_cmp_ps, _mm256_cmp_ps_mask,
        _mm256_loadu_ps, _mm256_loadu_si256, _mm256_mask_blend_ps, _mm256_movemask_ps, _mm256_mul_ps,
        _mm256_permute2f128_ps, _mm256_set1_ps, _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_stream_ps,
        _mm256_stream_si256, _mm256_sub_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    use std::cell::RefCell;
    use std::mem::MaybeUninit;

    use super::{Row, TILE, transpose_scalar};

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
    /// cache line of every sample of `out`: each pair then fills whole lines, written by non-temporal stores
    /// (a last group without a pair is written through the cache). Otherwise every group is written through
    /// the cache.
    pub(super) fn fills_lines(rows: &[Row<'_>], vector: &[usize], out: *const f32, stride: usize) -> bool {
        stride.is_multiple_of(LINE)
            && vector.chunks_exact(2).all(|g| {
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

    /// The most bytes of mask staged: a part of a core's cache (a tile of 256-step series of 3 variables
    /// takes 96 KB, of a year of hourly steps of one variable 1.1 MB; the mask of a batch of 256 series of
    /// 672 steps of 3 variables, 504 KiB).
    pub(super) const STAGING_BYTES: usize = 512 << 10;

    thread_local! {
        /// A tile's mask rows, or a batch's mask ([`super::with_mask_staged`]), built here (in this core's
        /// cache) and then streamed to the batch.
        pub(super) static STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
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
                    let (y, bytes) = prepared(x, (mean, inv), fill);
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
    /// AVX2 (and with `avx512`, AVX-512 F, BW and VL) must be available; every row must hold at least
    /// `samples` values and `(samples − 1) · stride + col` must lie inside `data` and `mask` for every row.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose_rows(
        rows: &[Row<'_>],
        samples: usize,
        stride: usize,
        fill: f32,
        (data, mask): (&mut [MaybeUninit<f32>], &mut [MaybeUninit<u8>]),
        mask_cached: bool,
        avx512: bool,
    ) {
        let out = data.as_mut_ptr().cast::<f32>();
        // Groups start where a line does only when lines can be filled at all (every sample's row starting at
        // the same offset within a line); otherwise at the first row, leaving the fewest to the scalar path.
        let start = if stride.is_multiple_of(LINE) { line_start(rows, out) } else { 0 };
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
        let lines = fills_lines(rows, &vector, out, stride);
        let tiles = (0..whole).step_by(TILE);
        let blocks = |p0: usize| (p0..(p0 + TILE).min(whole)).step_by(GROUP);
        // SAFETY (of the loads and `put`s below): s0 + 8 <= samples <= every row's length; each store lands
        // at (s0 + i) · stride + col + j for i, j < 8, the columns col .. col + 8 being those of the rows of
        // the group, all within the bounds the caller guarantees (a mask store, with `staged`, at that place
        // less p0 · stride: inside the staging's TILE · stride bytes, as s0 + i < p0 + TILE and
        // col + j < stride); with `lines`, the first column of each pair starts a 64-byte line of every
        // sample (stride a multiple of 16 floats), so every non-temporal store is 32-byte aligned.
        let load = |k: usize, s0: usize| unsafe { transpose8(load8(rows, k, s0)) };
        // Each tile's mask rows are made in a buffer of this thread (in its cache) and streamed to the batch
        // after: written in place, each of their cache lines would first be read from memory. (Unless the
        // mask is such a buffer already.)
        let staged = !mask_cached && TILE * stride <= STAGING_BYTES && cover_every_column(rows, stride);
        let mut staging = if staged { STAGING.take() } else { Vec::new() };
        if staged && staging.len() < TILE * stride {
            staging = vec![0; TILE * stride];
        }
        // Where value `o` of the batch goes, and its mask byte: in the batch, or in the staging of its tile
        // (whose first sample is `shift / stride`).
        let mask_at = if staged { staging.as_mut_ptr() } else { mask.as_mut_ptr().cast::<u8>() };
        let at = |o: usize, shift: usize| (out.wrapping_add(o), mask_at.wrapping_add(o - shift));
        let pairs =
            Pairs { rows, vector: &vector, affine: &affine, whole, stride, fill: fill_v, out, mask_at };
        let singles = |p0: usize, shift: usize| {
            for (&k, &affine) in vector.iter().zip(&affine) {
                let col = rows[k].col;
                for s0 in blocks(p0) {
                    for (i, x) in load(k, s0).into_iter().enumerate() {
                        let o = (s0 + i) * stride + col;
                        unsafe { put::<false>(at(o, shift), x, affine, fill_v) };
                    }
                }
            }
        };
        for p0 in tiles {
            let shift = if staged { p0 * stride } else { 0 };
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
            if staged {
                let n = (p0 + TILE).min(whole) - p0;
                // SAFETY: the staging holds `TILE · stride` initialized bytes, the tile's rows written
                // through `mask_at` above (not used while this view lives).
                let tile = unsafe { std::slice::from_raw_parts(mask_at, n * stride) };
                unsafe { stream_copy(tile, &mut mask[p0 * stride..(p0 + n) * stride]) };
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
            transpose_scalar(rows, k..k + 1, 0..whole, stride, fill, data, mask);
        }
        transpose_scalar(rows, 0..rows.len(), whole..samples, stride, fill, data, mask);
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
        /// Samples in whole groups of 8.
        whole: usize,
        stride: usize,
        fill: __m256,
        out: *mut f32,
        /// The mask, or the staging of the tile's mask rows.
        mask_at: *mut u8,
    }

    /// The samples `p0 .. p0 + TILE` of every pair of groups: each sample receives 16 consecutive values,
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
        let at = |o: usize| (t.out.wrapping_add(o), t.mask_at.wrapping_add(o - shift));
        for (pair, affine) in t.vector.chunks(2).zip(t.affine.chunks(2)) {
            let col = t.rows[pair[0]].col;
            for s0 in (p0..(p0 + TILE).min(t.whole)).step_by(GROUP) {
                // SAFETY (here and below): as in `transpose_rows`.
                let a = unsafe { transpose8(load8(t.rows, pair[0], s0)) };
                let Some(&second) = pair.get(1) else {
                    for (i, x) in a.into_iter().enumerate() {
                        unsafe { put::<false>(at((s0 + i) * t.stride + col), x, affine[0], t.fill) };
                    }
                    continue;
                };
                let b = unsafe { transpose8(load8(t.rows, second, s0)) };
                for i in 0..GROUP {
                    let o = (s0 + i) * t.stride + col;
                    unsafe {
                        if AVX512 {
                            put_pair_avx512(at(o), (a[i], b[i]), (affine[0], affine[1]), t.fill);
                        } else {
                            put::<true>(at(o), a[i], affine[0], t.fill);
                            put::<true>(at(o + GROUP), b[i], affine[1], t.fill);
                        }
                    }
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

    /// [`pairs_of`] for AVX-512.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    unsafe fn pairs_avx512(t: &Pairs<'_, '_>, p0: usize, shift: usize) {
        // SAFETY: the caller's.
        unsafe { pairs_of::<true>(t, p0, shift) };
    }

    /// Writes two groups' values of one sample, prepared as [`super::prepare`] does, at `out[..16]` with
    /// non-temporal stores, and their validity at `mask[..16]` in one store: the comparisons' bit masks
    /// select the fill and make the mask bytes.
    ///
    /// # Safety
    /// `out` and `mask` must be valid for 16 writes, `out` 32-byte aligned.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    #[inline]
    #[allow(clippy::cast_ptr_alignment)] // the mask's store is unaligned
    unsafe fn put_pair_avx512(
        (out, mask): (*mut f32, *mut u8),
        (a, b): (__m256, __m256),
        ((mean_a, inv_a), (mean_b, inv_b)): ((__m256, __m256), (__m256, __m256)),
        fill: __m256,
    ) {
        let (valid_a, valid_b) =
            (_mm256_cmp_ps_mask::<_CMP_ORD_Q>(a, a), _mm256_cmp_ps_mask::<_CMP_ORD_Q>(b, b));
        let ya = _mm256_mask_blend_ps(valid_a, fill, _mm256_mul_ps(_mm256_sub_ps(a, mean_a), inv_a));
        let yb = _mm256_mask_blend_ps(valid_b, fill, _mm256_mul_ps(_mm256_sub_ps(b, mean_b), inv_b));
        let bytes = _mm_maskz_set1_epi8(u16::from(valid_a) | (u16::from(valid_b) << 8), 1);
        // SAFETY: the caller's bounds and alignment.
        unsafe {
            _mm256_stream_ps(out, ya);
            _mm256_stream_ps(out.add(GROUP), yb);
            _mm_storeu_si128(mask.cast::<__m128i>(), bytes);
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
    /// and their validity at `mask[..8]`.
    ///
    /// # Safety
    /// `out` and `mask` must be valid for 8 writes; with `STREAM`, `out` must be 32-byte aligned.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn put<const STREAM: bool>(
        (out, mask): (*mut f32, *mut u8),
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
            mask.cast::<u64>().write_unaligned(valid);
        }
    }

    /// 8 values prepared as [`super::prepare`] does, and their 8 mask bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn prepared(x: __m256, (mean, inv): (__m256, __m256), fill: __m256) -> (__m256, u64) {
        let missing = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let y = _mm256_blendv_ps(_mm256_mul_ps(_mm256_sub_ps(x, mean), inv), fill, missing);
        (y, BYTES_OF_BITS[(!_mm256_movemask_ps(missing) & 0xff) as usize])
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

    /// `n` floats set to `x`, and where in them a 64-byte boundary is.
    fn aligned(n: usize, x: f32) -> (Vec<MaybeUninit<f32>>, usize) {
        let buffer = vec![MaybeUninit::new(x); n + 16];
        let offset = buffer.as_ptr().cast::<f32>().align_offset(64);
        (buffer, offset)
    }

    /// Every instruction set this processor has (the scalar path, AVX2, AVX-512), with the mask staged or
    /// written in place, gives what the element-by-element definition gives, bit for bit, and writes
    /// nothing else.
    fn assert_as_defined(rows: &[Row<'_>], samples: usize, stride: usize, shift: usize) {
        let fill = -7.5;
        let cells = samples * stride;
        let mut results = Vec::new();
        for isa in Isa::available() {
            // Written in place, then as in a buffer of the thread's (`mask_cached`).
            for mask_cached in [false, true] {
                let (mut data, at) = aligned(cells + shift, f32::INFINITY);
                let at = at + shift;
                let mut mask = vec![MaybeUninit::new(9u8); cells];
                let out = (&mut data[at..at + cells], &mut mask[..]);
                transpose_rows_on(isa, rows, samples, stride, fill, out, mask_cached);
                results.push((
                    format!("{isa:?}, mask cached {mask_cached}"),
                    data[at..at + cells].to_vec(),
                    mask,
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
        for (what, data, mask) in &results {
            assert_eq!(bits(data, mask), expected, "{what}: {samples} samples, {n_rows} rows");
        }
    }

    /// Ragged sample tails, row groups broken by a gap in the columns, a repeated (static) row, missing
    /// values, normalization.
    #[test]
    fn transpose_equals_the_definition() {
        // Up to several tiles of samples, the last one partial.
        for samples in [1, 7, 8, 9, 16, 23, 40, 2 * TILE + 13] {
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
        for samples in [8, 13, 2 * TILE + 5] {
            let chunks: Vec<Vec<f32>> =
                (0..32).map(|r| (0..samples).map(|p| value(r * 31 + p)).collect()).collect();
            let rows: Vec<Row<'_>> = (0..32)
                .map(|r| Row {
                    values: &chunks[r],
                    col: r,
                    affine: if r % 2 == 0 { (0.0, 1.0) } else { (1.0, 2.0) },
                })
                .collect();
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
                        assert!(avx2::fills_lines(&rows, &avx2::groups(&rows, start).0, out, stride));
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
        for samples in [8, 9, TILE, 2 * TILE + 13] {
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
        transpose_rows(&rows, 8, 4, 0.0, &mut data, &mut mask, false);
    }
}
