//! An adapted linear layer as one graph node: `y = x W^T + s (drop(x) A^T) B^T` over
//! `(x, A, B)`, for f32 activations on the CPU.
//!
//! Built from candle's ops, an adapter is five nodes (the dropout mask, `x * mask`, `A^T`,
//! `xm A^T`, `s B`), and candle's backward gives each of them a gradient: it starts every
//! gradient from zeros and adds to it, and the product `x * mask` also gets the mask's
//! (unused) gradient. That is a dozen passes over `[rows, in]` per adapted linear, the larger
//! part of a LIT step's time that is not a matrix product. Here the backward writes `dx`
//! once, and the dropout mask is drawn again from its seed instead of being kept.
//!
//! With `h = drop(x) A^T` `[m, r]`, `g = s dy B` `[m, r]`:
//! - `dB = s dy^T h` `[n, r]`
//! - `dA = g^T drop(x)` `[r, k]`
//! - `dx = dy W + (g A) * mask` `[m, k]` (the frozen product's backward is the wrapped op's)

use super::linear::Dropout;
use super::ops::{f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One operand of [`mm`]: a row-major-or-strided `[rows, cols]` matrix.
struct Mat<'a> {
    data: &'a [f32],
    /// stride between rows
    rs: isize,
    /// stride between columns
    cs: isize,
}

impl<'a> Mat<'a> {
    /// `[rows, cols]` row-major.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major `[cols, rows]` matrix (`rows_of_stored` = its row length).
    fn t(data: &'a [f32], rows_of_stored: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: rows_of_stored as isize,
        }
    }
}

/// `dst [m, n] (+)= beta * lhs [m, k] rhs [k, n]`, dst row-major; accumulates when `add`.
#[allow(clippy::too_many_arguments)]
fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], add: bool, lhs: Mat, rhs: Mat, beta: f32) {
    assert!(
        dst.len() >= m * n,
        "mm: dst has {} values, not {m}x{n}",
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let last = |a: &Mat, r: usize, c: usize| (r - 1) as isize * a.rs + (c - 1) as isize * a.cs;
    assert!(
        (last(&lhs, m, k) as usize) < lhs.data.len()
            && (last(&rhs, k, n) as usize) < rhs.data.len(),
        "mm: an operand is smaller than its strides say"
    );
    let par = if m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(crate::threads::num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst holds m*n values row-major; the last element each operand's strides reach
    // is inside its slice (asserted above), and the strides are non-negative.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            add,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// The adapter's dropout: its seed, the layer's uid and p.
type Drop = Option<(Dropout, u64, f64)>;

/// `x * mask` where the adapter has dropout, else `None` (use `x`); the mask is drawn block by
/// block into the output, never kept whole.
fn dropped(x: &[f32], drop: &Drop) -> Option<Vec<f32>> {
    let (d, uid, p) = drop.as_ref()?;
    let mut xm = vec![0f32; x.len()];
    xm.par_chunks_mut(Dropout::BLOCK)
        .zip(x.par_chunks(Dropout::BLOCK))
        .enumerate()
        .for_each(|(bi, (o, x))| {
            d.fill_block(*uid, *p, bi, o);
            for (o, x) in o.iter_mut().zip(x) {
                *o *= x;
            }
        });
    Some(xm)
}

/// `x W^T + s (drop(x) A^T) B^T` over `(x [m, k], A [r, k], B [n, r])`, the frozen product by
/// the wrapped op (packed, quantized or HF-layout).
pub(super) struct LoraLinear {
    pub base: Box<dyn CustomOp1 + Send + Sync>,
    pub scale: f32,
    /// The dropout of this forward: its seed, the layer's uid and p.
    pub drop: Drop,
}

impl LoraLinear {
    fn dims(&self, lx: &Layout, la: &Layout, lb: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (m, k) = lx.shape().dims2()?;
        let (r, ka) = la.shape().dims2()?;
        let (n, rb) = lb.shape().dims2()?;
        if ka != k || rb != r {
            candle_core::bail!("lora-linear: x [{m}, {k}], A [{r}, {ka}], B [{n}, {rb}]");
        }
        Ok((m, k, r, n))
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, r, n) = self.dims(lx, la, lb)?;
        let (y, shape) = self.base.cpu_fwd(sx, lx)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("lora-linear: the frozen product is not f32");
        };
        if shape.dims2()? != (m, n) {
            candle_core::bail!("lora-linear: the frozen product is {shape:?}, not [{m}, {n}]");
        }
        let x = f32_slice(sx, lx, "lora-linear (x)")?;
        let a = f32_slice(sa, la, "lora-linear (A)")?;
        let b = f32_slice(sb, lb, "lora-linear (B)")?;
        let xm = dropped(x, &self.drop);
        let xm = xm.as_deref().unwrap_or(x);
        let mut h = vec![0f32; m * r]; // [m, r]
        mm(m, r, k, &mut h, false, Mat::rows(xm, k), Mat::t(a, k), 1.0);
        mm(
            m,
            n,
            r,
            &mut y,
            true,
            Mat::rows(&h, r),
            Mat::t(b, r),
            self.scale,
        );
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let dy = dy.contiguous()?;
        // The input of the first block's projections (the embeddings, or patched activations
        // that are constants) needs no gradient.
        let base_dx = match x.track_op() {
            true => match self.base.bwd(x, res, &dy)? {
                Some(t) => Some(t),
                None => candle_core::bail!("lora-linear: the frozen product has no input gradient"),
            },
            false => None,
        };
        let (dx, da, db) = with_f32(&dy, "lora-linear (dy)", |dy| {
            with_f32(x, "lora-linear (x)", |x| {
                with_f32(a, "lora-linear (A)", |a| {
                    with_f32(b, "lora-linear (B)", |b| {
                        let (da, db, g) = self.factor_grads(x, a, b, dy, (m, k, r, n));
                        let dx = match &base_dx {
                            Some(t) => Some(with_f32(t, "lora-linear (dy W)", |bx| {
                                Ok(self.input_grad(bx, &g, a, (m, k, r)))
                            })?),
                            None => None,
                        };
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (m, k), dev)).transpose()?,
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

impl LoraLinear {
    /// `dA = g^T drop(x)` `[r, k]` and `dB = s dy^T h` `[n, r]`, with `g = s dy B` `[m, r]`,
    /// which the input's gradient needs (the dropout mask drawn again).
    fn factor_grads(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        (m, k, r, n): (usize, usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.scale;
        let dropped = dropped(x, &self.drop);
        let xm = dropped.as_deref().unwrap_or(x);
        let mut h = vec![0f32; m * r]; // drop(x) A^T [m, r]
        mm(m, r, k, &mut h, false, Mat::rows(xm, k), Mat::t(a, k), 1.0);
        let mut g = vec![0f32; m * r]; // s dy B [m, r]
        mm(m, r, n, &mut g, false, Mat::rows(dy, n), Mat::rows(b, r), s);
        let mut db = vec![0f32; n * r]; // s dy^T h [n, r]
        mm(n, r, m, &mut db, false, Mat::t(dy, n), Mat::rows(&h, r), s);
        let mut da = vec![0f32; r * k]; // g^T drop(x) [r, k]
        mm(
            r,
            k,
            m,
            &mut da,
            false,
            Mat::t(&g, r),
            Mat::rows(xm, k),
            1.0,
        );
        (da, db, g)
    }

    /// `dx = dy W + (g A) * mask` `[m, k]` from the frozen product's `dy W` (`bx`), the mask
    /// drawn again block by block.
    fn input_grad(
        &self,
        bx: &[f32],
        g: &[f32],
        a: &[f32],
        (m, k, r): (usize, usize, usize),
    ) -> Vec<f32> {
        const C: usize = Dropout::BLOCK;
        let mut dx = vec![0f32; m * k]; // g A, then masked, plus dy W
        mm(
            m,
            k,
            r,
            &mut dx,
            false,
            Mat::rows(g, r),
            Mat::rows(a, k),
            1.0,
        );
        match &self.drop {
            Some((d, uid, p)) => dx
                .par_chunks_mut(C)
                .zip(bx.par_chunks(C))
                .enumerate()
                .for_each_init(
                    || vec![0f32; C],
                    |mk, (bi, (dx, bx))| {
                        let mk = &mut mk[..dx.len()];
                        d.fill_block(*uid, *p, bi, mk);
                        for ((d, bx), mk) in dx.iter_mut().zip(bx).zip(mk.iter()) {
                            *d = bx + *d * mk;
                        }
                    },
                ),
            None => dx
                .par_chunks_mut(C)
                .zip(bx.par_chunks(C))
                .for_each(|(d, bx)| {
                    for (d, bx) in d.iter_mut().zip(bx) {
                        *d += bx;
                    }
                }),
        }
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mm` against a naive product, every operand layout and tail size, set and accumulate.
    #[test]
    fn mm_matches_a_naive_product() {
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
                let mut dst: Vec<f32> = (0..m * n).map(|i| val(i + 1)).collect();
                let before = dst.clone();
                mm(m, n, k, &mut dst, true, lhs, rhs, 0.5);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = before[i * n + j]
                            + 0.5 * (0..k).map(|p| li(tl, i, p) * ri(tr, p, j)).sum::<f32>();
                        let got = dst[i * n + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k} t=({tl},{tr}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
