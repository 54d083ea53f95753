//! Strided f32 matrix products on gemm's kernels, for the training nodes' passes (the adapter's
//! thin factors, each attention head's products).

/// A `[rows, cols]` operand: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of row-major `data` whose rows have `len` values.
    pub fn t(data: &'a [f32], len: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: len,
        }
    }
    /// Rows `stride` apart, columns contiguous (one head's block of a `[s, heads * hd]` row).
    pub fn strided(data: &'a [f32], stride: usize) -> Self {
        Mat {
            data,
            rs: stride,
            cs: 1,
        }
    }
    /// The transpose of [`Mat::strided`].
    pub fn strided_t(data: &'a [f32], stride: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: stride,
        }
    }
    /// Whether every element of a `[rows, cols]` view is inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst [m, n] (+)= beta * lhs [m, k] rhs [k, n]` into a row-major slice, accumulating when
/// `add`; on the threads when `parallel` and the product is large enough.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    add: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallel: bool,
) {
    assert!(
        dst.len() >= m * n,
        "product: dst has {} values, not {m}x{n}",
        dst.len()
    );
    // SAFETY: dst holds m rows of n values at stride n, and is borrowed mutably.
    unsafe {
        product_to(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            add,
            lhs,
            rhs,
            beta,
            parallel,
        )
    }
}

/// `beta * lhs [m, k] rhs [k, n]` as a new row-major `[m, n]` buffer (see [`product`]).
pub(crate) fn matmul(
    dims: (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallel: bool,
) -> Vec<f32> {
    let (m, n, _) = dims;
    // SAFETY: product_to writes all m * n values when it does not add (zeros when k is 0).
    unsafe {
        super::kernels::filled(m * n, |out| {
            product_to(
                dims,
                out.as_mut_ptr() as *mut f32,
                n,
                false,
                lhs,
                rhs,
                beta,
                parallel,
            )
        })
    }
}

/// [`product`] into `m` rows of `n` values at row stride `dst_rs` from `dst`.
///
/// # Safety
/// `dst` must be valid for writes of those rows, and no other reference may use them meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_to(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            for i in 0..m {
                // SAFETY: the caller's contract.
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0) };
            }
        }
        return;
    }
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "product: an operand is smaller than its strides say"
    );
    if n == super::thin::W && super::thin::available() {
        // `[m, 16]` outputs (a rank-16 adapter's thin products): lqa's own kernel, with rhs
        // as `[k, 16]` rows (copied when it is another view, as A^T is: 16 k values)
        let packed: Vec<f32>;
        let r = match (rhs.rs, rhs.cs) {
            (16, 1) => &rhs.data[..k * 16],
            _ => {
                packed = (0..k * 16)
                    .map(|i| rhs.data[(i / 16) * rhs.rs + (i % 16) * rhs.cs])
                    .collect();
                &packed
            }
        };
        // SAFETY: thin kernels are available; lhs covers [m, k] at its strides and r holds
        // k rows of 16 (asserted above); dst is the caller's.
        unsafe {
            super::thin::product16(
                super::isa::avx512(),
                m,
                k,
                dst,
                dst_rs,
                add,
                (lhs.data, lhs.rs, lhs.cs),
                r,
                beta,
                parallel,
            )
        };
        return;
    }
    let par = if parallel && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(crate::threads::num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst is the caller's; each operand's last element is inside its slice (asserted).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            add,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `product` against a naive product, every operand layout and tail size, set and
    /// accumulate, into a strided destination too.
    #[test]
    fn product_matches_a_naive_product() {
        let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 25.0;
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 2),
            (17, 16, 33),
            (64, 16, 576),
            (5, 70, 16),
        ] {
            let l: Vec<f32> = (0..m * k).map(val).collect(); // [m, k]
            let lt: Vec<f32> = (0..m * k).map(|i| val(i + 3)).collect(); // [k, m] stored
            let r: Vec<f32> = (0..k * n).map(|i| val(i + 11)).collect(); // [k, n]
            let rt: Vec<f32> = (0..k * n).map(|i| val(i + 5)).collect(); // [n, k] stored
            let li = |t: bool, i: usize, p: usize| if t { lt[p * m + i] } else { l[i * k + p] };
            let ri = |t: bool, p: usize, j: usize| if t { rt[j * k + p] } else { r[p * n + j] };
            for (tl, tr) in [(false, false), (true, false), (false, true), (true, true)] {
                let lhs = if tl { Mat::t(&lt, m) } else { Mat::rows(&l, k) };
                let rhs = if tr { Mat::t(&rt, k) } else { Mat::rows(&r, n) };
                let want = |before: f32, i: usize, j: usize| {
                    before + 0.5 * (0..k).map(|p| li(tl, i, p) * ri(tr, p, j)).sum::<f32>()
                };
                let close = |got: f32, want: f32| (got - want).abs() <= 1e-4 * (1.0 + want.abs());
                let mut dst: Vec<f32> = (0..m * n).map(|i| val(i + 1)).collect();
                let before = dst.clone();
                product((m, n, k), &mut dst, true, lhs, rhs, 0.5, true);
                // the same product set into every other row of a wider buffer
                let w = n + 3;
                let mut wide = vec![f32::NAN; m * w];
                // SAFETY: m rows of n values at stride w fit in wide.
                unsafe { product_to((m, n, k), wide.as_mut_ptr(), w, false, lhs, rhs, 0.5, false) };
                for i in 0..m {
                    for j in 0..n {
                        let (got, want_acc) = (dst[i * n + j], want(before[i * n + j], i, j));
                        assert!(close(got, want_acc), "{m}x{n}x{k} ({tl},{tr}) [{i},{j}]");
                        let (got, want_set) = (wide[i * w + j], want(0.0, i, j));
                        assert!(
                            close(got, want_set),
                            "strided {m}x{n}x{k} ({tl},{tr}) [{i},{j}]"
                        );
                    }
                }
            }
        }
    }
}
