//! Products whose output has 16 columns: `out [rows, 16] (+)= beta * L [rows, l] R [l, 16]`.
//!
//! A LoRA adapter of rank 16 makes three per projection and step: `h = drop(x) A^T`,
//! `g = s dy B` and `dB = s dy^T h`. gemm vectorises along the output's rows of 16 values and
//! runs them in its narrowest microkernel (one vector by six rows, plus packing both operands):
//! 5-7 % of a LIT step. Here each output row is one AVX-512 register (two AVX2 ones), a block of
//! rows accumulates over `l` with `R`'s row loaded once per step and `L`'s values broadcast
//! from where they lie (any strides, so `dy^T` needs no copy), and the threads take blocks of
//! rows.

use super::packed::Shared;
use rayon::prelude::*;

/// The output's width.
pub(crate) const W: usize = 16;

/// Whether [`product16`] runs on this CPU (AVX-512F, or AVX2 with FMA, on x86-64).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa::avx512()
            || (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i, j] (+)= beta * sum_p lhs[i * lrs + p * lcs] * rhs[p * 16 + j]` for `i < rows`,
/// `p < depth`, `j < 16`, `out` rows `out_rs` apart; adds when `add`. On AVX-512 registers when
/// `wide` (pass `isa::avx512()`), AVX2 ones otherwise; on the threads when `parallel` and the
/// product is large enough.
///
/// # Safety
/// [`available`] must be true, and the CPU have AVX-512F when `wide`; `lhs` must be readable
/// at every index named above, `rhs` hold `depth * 16` values, and `out` be writable at
/// `i * out_rs + j` with no other reference using those values meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product16(
    wide: bool,
    rows: usize,
    depth: usize,
    out: *mut f32,
    out_rs: usize,
    add: bool,
    (lhs, lrs, lcs): (&[f32], usize, usize),
    rhs: &[f32],
    beta: f32,
    parallel: bool,
) {
    debug_assert!(rhs.len() >= depth * W);
    let nt = crate::threads::num_threads();
    let block = if parallel && rows * depth * W >= 1 << 16 && nt > 1 {
        // two blocks per thread, whole register blocks each
        rows.div_ceil(2 * nt).div_ceil(ROWS) * ROWS
    } else {
        rows.max(1)
    };
    let dst = Shared(out);
    // Thread block b: rows b * block.., in register blocks of the largest size that fits
    // (AVX-512 12, 8, 4, 1 rows; AVX2 6, 2, 1).
    let run = |b: usize| {
        let end = rows.min((b + 1) * block);
        let mut r = b * block;
        while r < end {
            let left = end - r;
            let n = match wide {
                true => [ROWS, 8, 4, 1].into_iter().find(|&b| b <= left),
                false => [6, 2, 1].into_iter().find(|&b| b <= left),
            }
            .unwrap_or(1);
            // SAFETY: the caller's contract; these are rows r..r + n of this block only.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (o, l) = (dst.at(r * out_rs), lhs.as_ptr().add(r * lrs));
                let a = (depth, o, out_rs, add, l, lrs, lcs, rhs.as_ptr(), beta);
                match (wide, n) {
                    (true, ROWS) => x86::block512::<ROWS>(a),
                    (true, 8) => x86::block512::<8>(a),
                    (true, 4) => x86::block512::<4>(a),
                    (true, _) => x86::block512::<1>(a),
                    (false, 6) => x86::block256::<6>(a),
                    (false, 2) => x86::block256::<2>(a),
                    (false, _) => x86::block256::<1>(a),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("thin::product16 without x86-64 kernels ({add}, {beta}, {lcs})");
            r += n;
        }
    };
    let blocks = rows.div_ceil(block);
    if blocks <= 1 {
        run(0);
    } else {
        (0..blocks).into_par_iter().for_each(run);
    }
}

/// Rows per register block (AVX-512: one register per row; AVX2 runs them as two halves).
const ROWS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::W;
    use std::arch::x86_64::*;

    /// `(depth, out, out_rs, add, lhs, lrs, lcs, rhs, beta)` of a block of rows.
    pub(super) type Args = (
        usize,
        *mut f32,
        usize,
        bool,
        *const f32,
        usize,
        usize,
        *const f32,
        f32,
    );

    /// `R` rows of the product, each one 16-lane register.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block512<const R: usize>(
        (depth, out, out_rs, add, lhs, lrs, lcs, rhs, beta): Args,
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for p in 0..depth {
            let r = _mm512_loadu_ps(rhs.add(p * W));
            let l = lhs.add(p * lcs);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*l.add(i * lrs)), r, *a);
            }
        }
        let b = _mm512_set1_ps(beta);
        for (i, a) in acc.iter().enumerate() {
            let o = out.add(i * out_rs);
            let v = match add {
                true => _mm512_fmadd_ps(*a, b, _mm512_loadu_ps(o)),
                false => _mm512_mul_ps(*a, b),
            };
            _mm512_storeu_ps(o, v);
        }
    }

    /// `R` rows of the product, each two 8-lane registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block256<const R: usize>(
        (depth, out, out_rs, add, lhs, lrs, lcs, rhs, beta): Args,
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for p in 0..depth {
            let (r0, r1) = (
                _mm256_loadu_ps(rhs.add(p * W)),
                _mm256_loadu_ps(rhs.add(p * W + 8)),
            );
            let l = lhs.add(p * lcs);
            for i in 0..R {
                let v = _mm256_set1_ps(*l.add(i * lrs));
                lo[i] = _mm256_fmadd_ps(v, r0, lo[i]);
                hi[i] = _mm256_fmadd_ps(v, r1, hi[i]);
            }
        }
        let b = _mm256_set1_ps(beta);
        for i in 0..R {
            let o = out.add(i * out_rs);
            let (v0, v1) = match add {
                true => (
                    _mm256_fmadd_ps(lo[i], b, _mm256_loadu_ps(o)),
                    _mm256_fmadd_ps(hi[i], b, _mm256_loadu_ps(o.add(8))),
                ),
                false => (_mm256_mul_ps(lo[i], b), _mm256_mul_ps(hi[i], b)),
            };
            _mm256_storeu_ps(o, v0);
            _mm256_storeu_ps(o.add(8), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count to 30 (whole register blocks and every tail, on one thread and split
    /// over the threads), both operand layouts of `L`, set and accumulate, into a strided
    /// output, against the naive product.
    #[test]
    fn product16_matches_the_naive_product_at_every_tail() {
        if !available() {
            eprintln!("no thin kernels on this CPU: nothing to test");
            return;
        }
        let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 25.0;
        // AVX2 always (every CPU that has the kernels has it), AVX-512 where the CPU has it
        let mut widths = vec![false];
        if is_x86_feature_detected!("avx512f") {
            widths.push(true);
        }
        for depth in [1usize, 7, 600] {
            for rows in (1..=30).chain([301]) {
                let l: Vec<f32> = (0..rows * depth).map(val).collect();
                let r: Vec<f32> = (0..depth * W).map(|i| val(i + 7)).collect();
                for transposed in [false, true] {
                    // L[i, p] at i * lrs + p * lcs: row-major, or the transpose of a [depth, rows]
                    let (lrs, lcs) = if transposed { (1, rows) } else { (depth, 1) };
                    let want = |i: usize, j: usize| -> f32 {
                        0.5 * (0..depth)
                            .map(|p| l[i * lrs + p * lcs] * r[p * W + j])
                            .sum::<f32>()
                    };
                    for (wide, parallel) in widths.iter().flat_map(|&w| [(w, false), (w, true)]) {
                        for add in [false, true] {
                            let out_rs = W + 3;
                            let init = |i: usize| if add { val(i + 1) } else { f32::NAN };
                            let mut out: Vec<f32> = (0..rows * out_rs).map(init).collect();
                            let before = out.clone();
                            // SAFETY: available() is true; the operands have the sizes named.
                            unsafe {
                                product16(
                                    wide,
                                    rows,
                                    depth,
                                    out.as_mut_ptr(),
                                    out_rs,
                                    add,
                                    (&l, lrs, lcs),
                                    &r,
                                    0.5,
                                    parallel,
                                )
                            };
                            for i in 0..rows {
                                for j in 0..out_rs {
                                    let (got, was) = (out[i * out_rs + j], before[i * out_rs + j]);
                                    if j >= W {
                                        assert!(
                                            got.to_bits() == was.to_bits(),
                                            "padding written at [{i}, {j}]"
                                        );
                                        continue;
                                    }
                                    let w = want(i, j) + if add { was } else { 0.0 };
                                    assert!(
                                        (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                        "rows {rows}, depth {depth}, transposed {transposed}, wide {wide}, \
                                         parallel {parallel}, add {add}: [{i}, {j}] {got} vs {w}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
