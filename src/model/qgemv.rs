//! Matrix-vector products straight from quantized blocks, activations kept in f32 (decoding:
//! one row against a whole weight), and the blocks' dequantization for the prefill's f32 path.
//!
//! A block of 32 weights is `d q_i + m` (Q4_1; Q4_0 is `d (q_i - 8)`, i.e. `m = -8 d`; Q8_0 is
//! `d q_i`, `m = 0`), so its share of a dot product with `x` is `d (sum q_i x_i) + m (sum x_i)`:
//! the integers (Q4_0's `q - 8` formed as bytes) are widened to f32 in registers and multiplied
//! into `x` with FMAs, scaled once per block by `d`; Q4_1's block sums of `x` are taken once per
//! product and shared by every row. Nothing is rounded to 8 bits: the result is the f32 product with the dequantized weight
//! up to f32 rounding, whose bound `tests/quantized.rs` states (`2 k eps sum (|w_i| + 2|m|) |x_i|`,
//! `m` a Q4_1 block's offset, at most its largest `|w_i|`).
//! AVX-512F or AVX2+FMA (with F16C for the scales), chosen at run time; `LQA_ISA=avx2` forces
//! the AVX2 kernels on an AVX-512 CPU (`super::isa`), `LQA_QGEMV=0` turns them off (then `super::quant` takes
//! its other paths, as on other CPUs and for other types).
//!
//! Block layouts (ggml's, `repr(C)`): Q4_0 `{d: f16, qs: [u8; 16]}` (value `(q - 8) d`), Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` (value `q d + m`), Q8_0 `{d: f16, qs: [i8; 32]}` (value
//! `q d`); a nibble byte `i` holds element `i` (low) and `i + 16` (high).

use candle_core::quantized::GgmlDType;

/// Elements per block of the types here.
const QK: usize = 32;

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2, FMA and F16C: 8 lanes.
    Avx2,
    /// AVX-512F (and the above): 16 lanes.
    Avx512,
}

/// The kernels' instruction set on this CPU (`LQA_ISA=avx2` lowers it, `LQA_QGEMV=0` turns it off), or
/// `None` where they don't run.
pub fn isa() -> Option<Isa> {
    static S: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *S.get_or_init(|| {
        if std::env::var("LQA_QGEMV").is_ok_and(|v| v == "0") {
            return None;
        }
        if super::isa::avx512() && cpu_has(Isa::Avx512) {
            Some(Isa::Avx512)
        } else {
            cpu_has(Isa::Avx2).then_some(Isa::Avx2)
        }
    })
}

/// Can [`gemv`] run this type on this CPU?
pub fn supported(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) && isa().is_some()
}

/// Rows of `W` per parallel task.
const ROWS: usize = 32;

/// `y = W x` for `W` `[n, k]` given as its blocks (`w`, row-major, a whole number of blocks per
/// row) of type `t`, `x` `[k]`, `y` `[n]`. The caller checks [`supported`].
pub fn gemv(t: GgmlDType, w: &[u8], x: &[f32], y: &mut [f32], k: usize) -> candle_core::Result<()> {
    match isa() {
        Some(isa) => gemv_on(isa, t, w, x, y, k),
        None => candle_core::bail!("qgemv: no kernel on this CPU"),
    }
}

/// Can this CPU run the kernels of `isa` (whatever `LQA_QGEMV` says)?
pub fn cpu_has(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match isa {
            Isa::Avx2 => avx2,
            Isa::Avx512 => avx2 && is_x86_feature_detected!("avx512f"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// [`gemv`] with the kernels of `isa` (tests and benchmarks compare the two on one CPU).
pub fn gemv_on(
    isa: Isa,
    t: GgmlDType,
    w: &[u8],
    x: &[f32],
    y: &mut [f32],
    k: usize,
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    if !cpu_has(isa) {
        candle_core::bail!("qgemv: this CPU has no {isa:?}");
    }
    let known = matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0);
    if !known || !k.is_multiple_of(QK) || x.len() != k {
        candle_core::bail!("qgemv: {t:?} with k = {k}, x of {}", x.len());
    }
    let nb = k / QK;
    let bsize = t.type_size();
    let rb = nb * bsize;
    if w.len() != y.len() * rb {
        candle_core::bail!("qgemv: {} bytes for {} rows of {rb}", w.len(), y.len());
    }
    // sum of x over each block, for Q4_1's `m` term
    let xsum: Vec<f32> = match t {
        GgmlDType::Q4_1 => x.chunks(QK).map(|b| b.iter().sum()).collect(), // [nb]
        _ => Vec::new(),
    };
    #[cfg(target_arch = "x86_64")]
    use x86::{Q4_0, Q4_1, Q8_0};
    crate::threads::install(|| {
        y.par_chunks_mut(ROWS)
            .zip(w.par_chunks(ROWS * rb))
            .for_each(|(ys, ws)| {
                for (yj, row) in ys.iter_mut().zip(ws.chunks(rb)) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `cpu_has` checked the features; `row` holds nb blocks of `t`, `x`
                    // nb blocks of activations and `xsum` nb sums (lengths checked above).
                    unsafe {
                        *yj = match (isa, t) {
                            (Isa::Avx512, GgmlDType::Q4_0) => x86::dot_512::<Q4_0>(row, x, &xsum),
                            (Isa::Avx512, GgmlDType::Q4_1) => x86::dot_512::<Q4_1>(row, x, &xsum),
                            (Isa::Avx512, _) => x86::dot_512::<Q8_0>(row, x, &xsum),
                            (Isa::Avx2, GgmlDType::Q4_0) => x86::dot_256::<Q4_0>(row, x, &xsum),
                            (Isa::Avx2, GgmlDType::Q4_1) => x86::dot_256::<Q4_1>(row, x, &xsum),
                            (Isa::Avx2, _) => x86::dot_256::<Q8_0>(row, x, &xsum),
                        };
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = (row, &xsum, isa);
                        *yj = 0.0;
                    }
                }
            });
    });
    Ok(())
}

/// Dequantize whole blocks `w` of type `t` into `out` (one f32 per element), exactly as
/// candle's `dequantize` does (the same roundings), with AVX2. The caller checks [`supported`].
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
    // SAFETY: `supported` checked AVX2, FMA and F16C; `out` has 32 values per block of `w`.
    unsafe {
        x86::dequantize(t, w, out);
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GgmlDType, QK};
    use std::arch::x86_64::*;

    /// Bytes ahead of the block in use that the kernels ask the cache for: decoding streams
    /// every weight from memory, and the prefetch raised the default model's `native` decode
    /// from 61 to 80 tok/s (1024 bytes: 77, 512: 70; an Intel Xeon with AVX-512, 2 threads).
    const PREFETCH: usize = 2048;

    /// `sum_b share(b)` over `nb` blocks into two accumulators (even and odd blocks, for the
    /// FMA latency), `share!(b, acc)` giving `acc` plus block `b`'s share. A macro, not a
    /// closure: closures are not inlined into `target_feature` functions.
    macro_rules! two_acc {
        ($nb:expr, $zero:expr, |$b:ident, $acc:ident| $share:expr) => {{
            let (mut a0, mut a1) = ($zero, $zero);
            let mut b = 0;
            while b + 2 <= $nb {
                a0 = {
                    let ($b, $acc) = (b, a0);
                    $share
                };
                a1 = {
                    let ($b, $acc) = (b + 1, a1);
                    $share
                };
                b += 2;
            }
            if b < $nb {
                a0 = {
                    let ($b, $acc) = (b, a0);
                    $share
                };
            }
            (a0, a1)
        }};
    }

    /// The little-endian f16 at `p` as f32 (exact: every f16 is an f32).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// A Q4 block's 16 nibble bytes as two registers of signed bytes, elements 0-15 and
    /// 16-31: `q - 8` for Q4_0, `q` for Q4_1 (`MIN`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles<const MIN: bool>(qs: *const u8) -> (__m128i, __m128i) {
        let mask = _mm_set1_epi8(0x0F);
        let qs = _mm_loadu_si128(qs as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        if MIN {
            (lo, hi)
        } else {
            let eight = _mm_set1_epi8(8);
            (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight))
        }
    }

    /// Eight signed bytes (the low 8 of `q`) as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn f8(q: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    /// Sixteen signed bytes as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn f16x(q: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
    }

    /// Blocks of Q4_0, Q4_1 or Q8_0 to f32 as candle's `to_float` forms them (`(q - 8) d`,
    /// `q d + m`, `q d`: the same roundings).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `out` has 32 values per block of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize(t: GgmlDType, w: &[u8], out: &mut [f32]) {
        let bsize = t.type_size();
        for (blk, o) in w.chunks_exact(bsize).zip(out.chunks_exact_mut(QK)) {
            let p = blk.as_ptr();
            let d = _mm256_set1_ps(f16_at(p));
            let o = o.as_mut_ptr();
            let (q0, q1, m) = match t {
                GgmlDType::Q8_0 => (
                    _mm_loadu_si128(p.add(2) as *const __m128i),
                    _mm_loadu_si128(p.add(18) as *const __m128i),
                    None,
                ),
                GgmlDType::Q4_1 => {
                    let (lo, hi) = nibbles::<true>(p.add(4));
                    (lo, hi, Some(_mm256_set1_ps(f16_at(p.add(2)))))
                }
                _ => {
                    let (lo, hi) = nibbles::<false>(p.add(2));
                    (lo, hi, None)
                }
            };
            let w = |q: __m128i| {
                let v = _mm256_mul_ps(f8(q), d);
                match m {
                    Some(m) => _mm256_add_ps(v, m),
                    None => v,
                }
            };
            _mm256_storeu_ps(o, w(q0));
            _mm256_storeu_ps(o.add(8), w(_mm_srli_si128(q0, 8)));
            _mm256_storeu_ps(o.add(16), w(q1));
            _mm256_storeu_ps(o.add(24), w(_mm_srli_si128(q1, 8)));
        }
    }

    /// `sum q_i x_i` over one block of 32 signed integers (`q0`: elements 0-15, `q1`: 16-31)
    /// and `x` (8 lanes).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_256(q0: __m128i, q1: __m128i, x: *const f32) -> __m256 {
        let s0 = _mm256_mul_ps(f8(q0), _mm256_loadu_ps(x));
        let s1 = _mm256_mul_ps(f8(_mm_srli_si128(q0, 8)), _mm256_loadu_ps(x.add(8)));
        let s0 = _mm256_fmadd_ps(f8(q1), _mm256_loadu_ps(x.add(16)), s0);
        let s1 = _mm256_fmadd_ps(f8(_mm_srli_si128(q1, 8)), _mm256_loadu_ps(x.add(24)), s1);
        _mm256_add_ps(s0, s1)
    }

    /// The same with 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_512(q0: __m128i, q1: __m128i, x: *const f32) -> __m512 {
        let s = _mm512_mul_ps(f16x(q0), _mm512_loadu_ps(x));
        _mm512_fmadd_ps(f16x(q1), _mm512_loadu_ps(x.add(16)), s)
    }

    /// Block kinds, as the kernels' const parameter.
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// Bytes per block of kind `K`.
    const fn block_bytes<const K: u8>() -> usize {
        match K {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        }
    }

    /// A block's 32 integers as two registers of signed bytes (elements 0-15, 16-31): Q4_0's
    /// `q - 8`, Q4_1's `q`, Q8_0's `q`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn ints<const K: u8>(blk: *const u8) -> (__m128i, __m128i) {
        match K {
            Q4_0 => nibbles::<false>(blk.add(2)),
            Q4_1 => nibbles::<true>(blk.add(4)),
            _ => (
                _mm_loadu_si128(blk.add(2) as *const __m128i),
                _mm_loadu_si128(blk.add(18) as *const __m128i),
            ),
        }
    }

    /// `sum_b m_b xsum_b` over a Q4_1 row's blocks (zero for the other kinds).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn offsets<const K: u8>(p: *const u8, xsum: &[f32]) -> f32 {
        if K != Q4_1 {
            return 0.0;
        }
        let bsize = block_bytes::<K>();
        let (mut s0, mut s1) = (0f32, 0f32);
        for (b, xs) in xsum.chunks(2).enumerate() {
            s0 += f16_at(p.add(2 * b * bsize + 2)) * xs[0];
            if let Some(x1) = xs.get(1) {
                s1 += f16_at(p.add((2 * b + 1) * bsize + 2)) * x1;
            }
        }
        s0 + s1
    }

    /// One row of blocks of kind `K` against `x`: `sum_b d_b (sum q x)_b (+ m_b xsum_b for
    /// Q4_1)`, 8 lanes.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `row` is whole blocks, `x` has 32 values per block
    /// and, for Q4_1, `xsum` one per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_256<const K: u8>(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bsize = block_bytes::<K>();
        let nb = row.len() / bsize;
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let (acc0, acc1) = two_acc!(nb, _mm256_setzero_ps(), |b, acc| {
            let blk = p.add(b * bsize);
            _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
            let (q0, q1) = ints::<K>(blk);
            let s = block_256(q0, q1, xp.add(b * QK));
            _mm256_fmadd_ps(_mm256_set1_ps(f16_at(blk)), s, acc)
        });
        hsum(_mm256_add_ps(acc0, acc1)) + offsets::<K>(p, xsum)
    }

    /// The same with 16 lanes.
    ///
    /// # Safety
    /// As [`dot_256`], and AVX-512F is available.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_512<const K: u8>(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let bsize = block_bytes::<K>();
        let nb = row.len() / bsize;
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let (acc0, acc1) = two_acc!(nb, _mm512_setzero_ps(), |b, acc| {
            let blk = p.add(b * bsize);
            _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
            let (q0, q1) = ints::<K>(blk);
            let s = block_512(q0, q1, xp.add(b * QK));
            _mm512_fmadd_ps(_mm512_set1_ps(f16_at(blk)), s, acc)
        });
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + offsets::<K>(p, xsum)
    }
}
