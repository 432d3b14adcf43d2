//! Pixel-series batches from sample-major chunks (`order: shuffled` cubes store each sample's series
//! contiguously): the batch `[B, T, V]` interleaves, sample by sample, the V series of each sample.
//! Done one variable at a time and value by value, every variable's pass wrote one value in V of the whole
//! batch; here each sample is interleaved 8 steps × 4 variables at a time in vector registers (AVX2) into a
//! staging area that stays in L1, then prepared (normalized, missing values filled, mask built) whole
//! registers at a time and written to the batch in one sequential pass of non-temporal stores, as the batch
//! goes to another thread without being read. In `cubeload bench` on the default cube stored shuffled,
//! `ratio_to_ceiling` 0.36 → 0.53–0.67 (batches/s 760–870 → 1140–1500, three alternating runs).

use std::mem::MaybeUninit;

use super::transpose::prepare;

/// One variable of the batch: the value of sample `p` at step `t` is `values[p · per_sample + t ·
/// per_step]` (`per_step` is 1 for a sample-major chunk, 0 for a static variable repeated along time, the
/// sample count for a time-major chunk), prepared by the affine `(mean, inv_std)`.
pub(crate) struct Series<'a> {
    pub values: &'a [f32],
    pub per_sample: usize,
    pub per_step: usize,
    pub affine: (f32, f32),
}

/// Writes `data[(p · steps + t) · V + v]` and `mask[…]` for series `v < V` of `series`, every sample `p <
/// samples` and step `t < steps`: the value prepared as [`prepare`] does, or `fill` and 0 where missing.
/// Nothing past `samples · steps · V` is touched.
///
/// # Panics
/// When a series holds too few values for `samples` and `steps`, or `data` or `mask` is too short.
pub(crate) fn interleave(
    series: &[Series<'_>],
    samples: usize,
    steps: usize,
    fill: f32,
    data: &mut [MaybeUninit<f32>],
    mask: &mut [MaybeUninit<u8>],
) {
    let cells = samples * steps * series.len();
    if cells == 0 {
        return;
    }
    assert!(data.len() >= cells && mask.len() >= cells, "batch too small for the series");
    let last = |s: &Series<'_>| (samples - 1) * s.per_sample + (steps - 1) * s.per_step;
    assert!(series.iter().all(|s| last(s) < s.values.len()), "series shorter than the samples and steps");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above); every read and write is in bounds (asserted above).
        unsafe { avx2::interleave(series, samples, steps, fill, data, mask) };
        return;
    }
    let mut o = 0;
    for p in 0..samples {
        for t in 0..steps {
            for s in series {
                let (value, valid) =
                    prepare(s.values[p * s.per_sample + t * s.per_step], s.affine.0, s.affine.1, fill);
                data[o].write(value);
                mask[o].write(valid);
                o += 1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _CMP_UNORD_Q, _mm_sfence, _mm_storeu_ps, _mm256_add_epi8, _mm256_blendv_ps,
        _mm256_castps_si256, _mm256_castps256_ps128, _mm256_cmp_ps, _mm256_extractf128_ps, _mm256_loadu_ps,
        _mm256_mul_ps, _mm256_packs_epi16, _mm256_packs_epi32, _mm256_permutevar8x32_epi32, _mm256_set1_epi8,
        _mm256_set1_ps, _mm256_setr_epi32, _mm256_shuffle_ps, _mm256_stream_ps, _mm256_stream_si256,
        _mm256_sub_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };
    use std::mem::MaybeUninit;

    use super::Series;
    use crate::loader::transpose::prepare;

    /// Variables interleaved together: four floats of one step fill half a vector register.
    const GROUP: usize = 4;
    /// Steps interleaved together: one vector register of each variable.
    const STEPS: usize = 8;
    /// Values staged at most (but always one whole sample): 8 KB, in L1 with the rows being read.
    const STAGED: usize = 2048;

    /// See [`super::interleave`]. Each sample's values are first interleaved as stored into a staging area
    /// that stays in L1, then prepared and written to the batch, and their validity to the mask, whole
    /// registers at a time (with 3 variables, interleaving 4 at a time fills only 3 lanes in 4).
    ///
    /// Interleaving stores a group of 4 variables 4 lanes per step at `t · V + 4g`: with fewer than 4
    /// variables left in the group a store spills into the next step's first variables; the steps are stored
    /// in order and the groups from the last to the first, so every spilled lane is overwritten by its own
    /// before the sample is written out. The staging area has room for the last step's spill.
    ///
    /// # Safety
    /// AVX2 must be available, and the bounds [`super::interleave`] asserts must hold.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave(
        series: &[Series<'_>],
        samples: usize,
        steps: usize,
        fill: f32,
        data: &mut [MaybeUninit<f32>],
        mask: &mut [MaybeUninit<u8>],
    ) {
        let nv = series.len();
        let per_sample = steps * nv;
        // Samples staged together (as many as fit in STAGED values): each pass out of the staging area
        // starts and ends with values written one by one up to the batch's 32-byte boundaries.
        let block = (STAGED / per_sample).max(1);
        let mut staged = vec![0.0f32; block * per_sample + GROUP];
        let groups: Vec<usize> = (0..nv).step_by(GROUP).rev().collect();
        // The affine of staged value `i` is that of variable `i % V`: from `i % V` on, these lanes hold it
        // for 8 consecutive values.
        let lanes =
            |f: fn(&Series<'_>) -> f32| -> Vec<f32> { (0..nv + 8).map(|i| f(&series[i % nv])).collect() };
        let affine = Affine {
            mean: lanes(|s| s.affine.0),
            inv: lanes(|s| s.affine.1),
            identity: series.iter().all(|s| s.affine == (0.0, 1.0)),
            fill,
            nv,
        };
        let whole = steps / STEPS * STEPS;
        // Every row read as contiguous steps: a series that is not (a static, a time-major chunk) is first
        // copied out for the sample; lanes past the last variable read zeros.
        let zeros = vec![0.0f32; steps];
        let mut copied: Vec<Vec<f32>> =
            series.iter().map(|s| if s.per_step == 1 { Vec::new() } else { vec![0.0; steps] }).collect();
        let mut rows: Vec<*const f32> = vec![zeros.as_ptr(); groups.len() * GROUP];
        for first in (0..samples).step_by(block) {
            let block = first..(first + block).min(samples);
            for p in block.clone() {
                for (v, (s, copy)) in series.iter().zip(&mut copied).enumerate() {
                    let at = p * s.per_sample;
                    rows[v] = if s.per_step == 1 {
                        // SAFETY: `at` is within the series (the caller's bounds).
                        unsafe { s.values.as_ptr().add(at) }
                    } else {
                        if s.per_step == 0 {
                            copy.fill(s.values[at]);
                        } else {
                            for (t, x) in copy.iter_mut().enumerate() {
                                *x = s.values[at + t * s.per_step];
                            }
                        }
                        copy.as_ptr()
                    };
                }
                let at = (p - first) * per_sample;
                // SAFETY: every row holds `steps` values; the sample's values and their spill lie within
                // the staging area.
                unsafe { stage_sample(&rows, &groups, whole, nv, staged.as_mut_ptr().add(at)) };
                for t in whole..steps {
                    for (v, s) in series.iter().enumerate() {
                        staged[at + t * nv + v] = s.values[p * s.per_sample + t * s.per_step];
                    }
                }
            }
            let (at, n) = (first * per_sample, block.len() * per_sample);
            // SAFETY: at + n <= samples · steps · V <= the lengths of data and mask.
            unsafe {
                write_values(data.as_mut_ptr().add(at).cast(), &staged[..n], &affine);
                write_mask(mask.as_mut_ptr().add(at).cast(), &staged[..n]);
            }
        }
        // Non-temporal stores are weakly ordered: visible to the thread that receives the batch only after
        // this fence.
        _mm_sfence();
    }

    /// Interleaves steps `0 .. whole` (a multiple of 8) of one sample's rows into `out`, value `(t, v)` at
    /// `t · V + v`, groups of 4 rows (`groups`, the last first) at a time.
    ///
    /// # Safety
    /// Every row must hold `whole` values, and `out` must be valid for `(whole − 1) · V + 4 + the last group`
    /// writes, the spill of the last step included.
    #[target_feature(enable = "avx2")]
    unsafe fn stage_sample(rows: &[*const f32], groups: &[usize], whole: usize, nv: usize, out: *mut f32) {
        for &g in groups {
            let r = &rows[g..g + GROUP];
            for t0 in (0..whole).step_by(STEPS) {
                // SAFETY: every row holds `whole` values from its pointer and t0 + 8 <= whole.
                let [a0, a1, a2, a3]: [__m256; GROUP] =
                    std::array::from_fn(|j| unsafe { _mm256_loadu_ps(r[j].add(t0)) });
                let (t0v, t1v) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
                let (t2v, t3v) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
                // Register k holds step k in its low half and step k + 4 in its high half.
                let u = [
                    _mm256_shuffle_ps::<0x44>(t0v, t2v),
                    _mm256_shuffle_ps::<0xEE>(t0v, t2v),
                    _mm256_shuffle_ps::<0x44>(t1v, t3v),
                    _mm256_shuffle_ps::<0xEE>(t1v, t3v),
                ];
                // Steps in order, each one's spill overwritten by the next: the low halves (steps 0-3), then
                // the high ones (4-7).
                let o = t0 * nv + g;
                // SAFETY: the caller's bounds.
                unsafe {
                    for (k, &x) in u.iter().enumerate() {
                        _mm_storeu_ps(out.add(o + k * nv), _mm256_castps256_ps128(x));
                    }
                    for (k, &x) in u.iter().enumerate() {
                        _mm_storeu_ps(out.add(o + (k + GROUP) * nv), _mm256_extractf128_ps::<1>(x));
                    }
                }
            }
        }
    }

    /// How staged values become model inputs.
    struct Affine {
        /// Mean and inverse std of value `i` at `[i % V]`, and of the 8 following ones after it.
        mean: Vec<f32>,
        inv: Vec<f32>,
        /// Every variable as stored: only missing values change.
        identity: bool,
        fill: f32,
        nv: usize,
    }

    impl Affine {
        /// The 8 staged values from `i` on, prepared as [`prepare`] does.
        #[target_feature(enable = "avx2")]
        #[inline]
        fn prepare8(&self, i: usize, x: __m256) -> __m256 {
            let missing = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
            let y = if self.identity {
                x
            } else {
                let at = i % self.nv;
                // SAFETY: at + 8 <= nv + 8, the lanes' length.
                let (mean, inv) = unsafe {
                    (_mm256_loadu_ps(self.mean.as_ptr().add(at)), _mm256_loadu_ps(self.inv.as_ptr().add(at)))
                };
                _mm256_mul_ps(_mm256_sub_ps(x, mean), inv)
            };
            _mm256_blendv_ps(y, _mm256_set1_ps(self.fill), missing)
        }

        fn prepare1(&self, i: usize, x: f32) -> f32 {
            let at = i % self.nv;
            prepare(x, self.mean[at], self.inv[at], self.fill).0
        }
    }

    /// Writes `staged`, prepared, to `dst`: non-temporal stores from the first 32-byte boundary of `dst`,
    /// plain ones before it and for the tail.
    ///
    /// # Safety
    /// `dst .. dst + staged.len()` must be valid for writes.
    #[target_feature(enable = "avx2")]
    unsafe fn write_values(dst: *mut f32, staged: &[f32], affine: &Affine) {
        let head = dst.align_offset(32).min(staged.len());
        let body = (staged.len() - head) / 8 * 8;
        // SAFETY: every write is below dst + staged.len(); the non-temporal ones are 32-byte aligned.
        unsafe {
            for i in (0..head).chain(head + body..staged.len()) {
                dst.add(i).write(affine.prepare1(i, staged[i]));
            }
            for i in (head..head + body).step_by(8) {
                _mm256_stream_ps(dst.add(i), affine.prepare8(i, _mm256_loadu_ps(staged.as_ptr().add(i))));
            }
        }
    }

    /// Writes the validity of `staged` (1 where a value is present, 0 where it is NaN) to `dst`, as
    /// [`write_values`] writes the values.
    ///
    /// # Safety
    /// `dst .. dst + staged.len()` must be valid for writes.
    #[target_feature(enable = "avx2")]
    unsafe fn write_mask(dst: *mut u8, staged: &[f32]) {
        let head = dst.align_offset(32).min(staged.len());
        let body = (staged.len() - head) / 32 * 32;
        // Packing 4 registers of 8 comparisons into 32 bytes leaves them in 4-byte runs ordered
        // 0 2 4 6 1 3 5 7.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let one = _mm256_set1_epi8(1);
        // SAFETY: every write is below dst + staged.len(); the non-temporal ones are 32-byte aligned.
        unsafe {
            for i in (0..head).chain(head + body..staged.len()) {
                dst.add(i).write(u8::from(!staged[i].is_nan()));
            }
            for i in (head..head + body).step_by(32) {
                let missing = |j: usize| {
                    let x = _mm256_loadu_ps(staged.as_ptr().add(i + 8 * j));
                    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
                };
                let pairs =
                    (_mm256_packs_epi32(missing(0), missing(1)), _mm256_packs_epi32(missing(2), missing(3)));
                // -1 where missing, 0 where present, plus one.
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(pairs.0, pairs.1), order);
                #[allow(clippy::cast_ptr_alignment)] // dst + i is 32-byte aligned: i >= head
                _mm256_stream_si256(dst.add(i).cast::<__m256i>(), _mm256_add_epi8(bytes, one));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(k: usize) -> f32 {
        if k % 7 == 3 { f32::NAN } else { (k as f32).sin() * 40.0 }
    }

    /// The batch against its definition for every count of variables up to 9 (one to three groups, full and
    /// not), step counts that are and are not whole blocks, every kind of series, and a batch that does not
    /// start on a vector boundary.
    #[test]
    fn interleave_equals_the_definition() {
        let fill = -7.5;
        for nv in 1..=9 {
            for (samples, steps) in [(1, 1), (3, 7), (5, 8), (4, 29), (2, 672)] {
                let sample_major: Vec<f32> = (0..samples * steps + 3).map(value).collect();
                let time_major: Vec<f32> = (0..samples * steps).map(|k| value(k + 5)).collect();
                let statics: Vec<f32> = (0..samples).map(|k| value(k + 2)).collect();
                let series: Vec<Series<'_>> = (0..nv)
                    .map(|v| {
                        let affine = if v % 2 == 0 { (0.0, 1.0) } else { (v as f32, 0.5) };
                        match v % 3 {
                            0 => Series {
                                values: &sample_major[v % 4..],
                                per_sample: steps,
                                per_step: 1,
                                affine,
                            },
                            1 => Series { values: &statics, per_sample: 1, per_step: 0, affine },
                            _ => Series { values: &time_major, per_sample: 1, per_step: samples, affine },
                        }
                    })
                    .collect();
                let cells = samples * steps * nv;
                for shift in [0, 1, 5] {
                    let mut data = vec![MaybeUninit::new(f32::INFINITY); cells + shift + 3];
                    let mut mask = vec![MaybeUninit::new(9u8); cells + shift + 3];
                    interleave(&series, samples, steps, fill, &mut data[shift..], &mut mask[shift..]);
                    // SAFETY: every element was initialized before the call.
                    let got = |o: usize| unsafe { (data[o].assume_init().to_bits(), mask[o].assume_init()) };
                    for o in (0..shift).chain(shift + cells..data.len()) {
                        assert_eq!(got(o), (f32::INFINITY.to_bits(), 9), "{o} outside the batch was touched");
                    }
                    for p in 0..samples {
                        for t in 0..steps {
                            for (v, s) in series.iter().enumerate() {
                                let x = s.values[p * s.per_sample + t * s.per_step];
                                let (mean, inv) = s.affine;
                                let expected = if x.is_nan() { (fill, 0) } else { ((x - mean) * inv, 1) };
                                let o = shift + (p * steps + t) * nv + v;
                                assert_eq!(got(o), (expected.0.to_bits(), expected.1), "{nv} {p} {t} {v}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "series shorter")]
    fn short_series_are_refused() {
        let values = [1.0f32; 10];
        let series = [Series { values: &values, per_sample: 5, per_step: 1, affine: (0.0, 1.0) }];
        let (mut data, mut mask) = (vec![MaybeUninit::new(0.0); 15], vec![MaybeUninit::new(0); 15]);
        interleave(&series, 3, 5, 0.0, &mut data, &mut mask);
    }
}
