//! Matrix-vector products straight from quantized blocks, activations kept in f32 (decoding:
//! one row against a whole weight). Each block's integers are widened to f32 in registers,
//! scaled exactly as candle's `dequantize` does (the same roundings) and multiplied into the
//! activations with FMAs, so the result is the f32 path's up to summation order, while the
//! weight is read once in its block form. AVX2+FMA on x86-64, chosen at run
//! time; elsewhere, and for other types, `super::quant` takes its other paths.
//!
//! Block layouts (ggml's, `repr(C)`): Q4_0 `{d: f16, qs: [u8; 16]}` (value `(q - 8) d`), Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` (value `q d + m`), Q8_0 `{d: f16, qs: [i8; 32]}` (value
//! `q d`); a nibble byte `i` holds element `i` (low) and `i + 16` (high).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Elements per block of the types here.
const QK: usize = 32;

/// Can [`gemv`] run this type on this CPU?
pub fn supported(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) && simd()
}

fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static S: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *S.get_or_init(|| {
            std::env::var("LQA_QGEMV").map_or(true, |v| v != "0")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `W` per parallel task.
const ROWS: usize = 32;

/// `y = W x` for `W` `[n, k]` given as its blocks (`w`, row-major, a whole number of blocks per
/// row) of type `t`, `x` `[k]`, `y` `[n]`. The caller checks [`supported`].
pub fn gemv(t: GgmlDType, w: &[u8], x: &[f32], y: &mut [f32], k: usize) -> candle_core::Result<()> {
    use rayon::prelude::*;
    if !supported(t) || !k.is_multiple_of(QK) || x.len() != k {
        candle_core::bail!("qgemv: {t:?} with k = {k}, x of {}", x.len());
    }
    let nb = k / QK;
    let bsize = t.type_size();
    let rb = nb * bsize;
    if w.len() != y.len() * rb {
        candle_core::bail!("qgemv: {} bytes for {} rows of {rb}", w.len(), y.len());
    }
    crate::threads::install(|| {
        y.par_chunks_mut(ROWS)
            .zip(w.par_chunks(ROWS * rb))
            .for_each(|(ys, ws)| {
                for (yj, row) in ys.iter_mut().zip(ws.chunks(rb)) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `supported` checked AVX2 and FMA; `row` holds nb blocks of `t`
                    // and `x` nb blocks of activations (lengths checked above).
                    unsafe {
                        *yj = match t {
                            GgmlDType::Q4_0 => avx2::dot_q4(row, x, false),
                            GgmlDType::Q4_1 => avx2::dot_q4(row, x, true),
                            _ => avx2::dot_q8_0(row, x),
                        };
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = row;
                        *yj = 0.0;
                    }
                }
            });
    });
    Ok(())
}

/// Dequantize whole blocks `w` of type `t` into `out` (one f32 per element), exactly as
/// candle's `dequantize` does, with AVX2. The caller checks [`supported`].
pub fn dequantize(t: GgmlDType, w: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
    let bsize = t.type_size();
    if !supported(t) || !w.len().is_multiple_of(bsize) || out.len() != w.len() / bsize * QK {
        candle_core::bail!(
            "qgemv dequantize: {t:?}, {} bytes into {}",
            w.len(),
            out.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked AVX2 and FMA; `out` has 32 values per block of `w`.
    unsafe {
        avx2::dequantize(t, w, out);
    }
    Ok(())
}

/// The little-endian f16 at byte `at`.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, GgmlDType, QK};
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Blocks of Q4_0, Q4_1 or Q8_0 to f32, as candle's `to_float` (the same roundings).
    ///
    /// # Safety
    /// AVX2 is available; `out` has 32 values per block of `w`.
    /// Eight Q4 weights from the low 8 nibbles in `q` (one per byte): `(q - eight) d`, plus
    /// `m` for Q4_1 (`min`), with candle's roundings. The one place both the dequantizer and
    /// the dot product form them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_weights(q: __m128i, eight: __m256i, d: __m256, m: __m256, min: bool) -> __m256 {
        let v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(q), eight);
        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);
        if min {
            _mm256_add_ps(v, m)
        } else {
            v
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize(t: GgmlDType, w: &[u8], out: &mut [f32]) {
        let bsize = t.type_size();
        let mask = _mm_set1_epi8(0x0F);
        for (blk, o) in w.chunks_exact(bsize).zip(out.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_at(blk, 0));
            let o = o.as_mut_ptr();
            match t {
                GgmlDType::Q8_0 => {
                    let q0 = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(blk.as_ptr().add(18) as *const __m128i);
                    let w =
                        |q: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                    _mm256_storeu_ps(o, w(q0));
                    _mm256_storeu_ps(o.add(8), w(_mm_srli_si128(q0, 8)));
                    _mm256_storeu_ps(o.add(16), w(q1));
                    _mm256_storeu_ps(o.add(24), w(_mm_srli_si128(q1, 8)));
                }
                _ => {
                    let min = t == GgmlDType::Q4_1;
                    let (qoff, off) = if min { (4, 0) } else { (2, 8) };
                    let m = _mm256_set1_ps(if min { f16_at(blk, 2) } else { 0.0 });
                    let eight = _mm256_set1_epi32(off);
                    let qs = _mm_loadu_si128(blk.as_ptr().add(qoff) as *const __m128i);
                    let lo = _mm_and_si128(qs, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                    let w = |q: __m128i| q4_weights(q, eight, d, m, min);
                    _mm256_storeu_ps(o, w(lo));
                    _mm256_storeu_ps(o.add(8), w(_mm_srli_si128(lo, 8)));
                    _mm256_storeu_ps(o.add(16), w(hi));
                    _mm256_storeu_ps(o.add(24), w(_mm_srli_si128(hi, 8)));
                }
            }
        }
    }

    /// One row of Q4_0 (`min == false`: value `(q - 8) d`) or Q4_1 (`min`: `q d + m`) blocks
    /// against `x`. Each weight is formed as candle's `dequantize` forms it (the same
    /// roundings), then multiplied into `x`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `row` is whole blocks and `x` has 32 values per block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4(row: &[u8], x: &[f32], min: bool) -> f32 {
        let bsize = if min { 20 } else { 18 };
        let qoff = if min { 4 } else { 2 };
        let nb = row.len() / bsize;
        let mask = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi32(if min { 0 } else { 8 });
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = &row[b * bsize..(b + 1) * bsize];
            let d = _mm256_set1_ps(f16_at(blk, 0));
            let m = _mm256_set1_ps(if min { f16_at(blk, 2) } else { 0.0 });
            let qs = _mm_loadu_si128(blk.as_ptr().add(qoff) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let xb = x.as_ptr().add(b * QK);
            let w = |q: __m128i| q4_weights(q, eight, d, m, min);
            acc0 = _mm256_fmadd_ps(w(lo), _mm256_loadu_ps(xb), acc0);
            acc1 = _mm256_fmadd_ps(w(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)), acc1);
            acc0 = _mm256_fmadd_ps(w(hi), _mm256_loadu_ps(xb.add(16)), acc0);
            acc1 = _mm256_fmadd_ps(w(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// One row of Q8_0 blocks against `x` (weights formed as candle's `dequantize` does).
    ///
    /// # Safety
    /// AVX2 and FMA are available; `row` is whole blocks and `x` has 32 values per block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 34;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = &row[b * 34..(b + 1) * 34];
            let d = _mm256_set1_ps(f16_at(blk, 0));
            let q0 = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(blk.as_ptr().add(18) as *const __m128i);
            let xb = x.as_ptr().add(b * QK);
            let w = |q: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
            acc0 = _mm256_fmadd_ps(w(q0), _mm256_loadu_ps(xb), acc0);
            acc1 = _mm256_fmadd_ps(w(_mm_srli_si128(q0, 8)), _mm256_loadu_ps(xb.add(8)), acc1);
            acc0 = _mm256_fmadd_ps(w(q1), _mm256_loadu_ps(xb.add(16)), acc0);
            acc1 = _mm256_fmadd_ps(w(_mm_srli_si128(q1, 8)), _mm256_loadu_ps(xb.add(24)), acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }
}
