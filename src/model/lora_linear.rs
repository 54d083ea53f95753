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

use super::gemm::{matmul, product, Mat};
use super::linear::Dropout;
use super::ops::{f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// A linear layer's gradients: its input's, and its adapter's `(dA, dB)`.
pub(super) type Grads = (Option<Tensor>, Option<(Tensor, Tensor)>);

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
    /// The forward's `h = drop(x) A^T` `[m, r]`, taken by the backward (which computes it
    /// again if it is not there: a second backward, or a recomputed block).
    pub h: Mutex<Option<Vec<f32>>>,
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
        let h = matmul((m, r, k), Mat::rows(xm, k), Mat::t(a, k), 1.0, true); // [m, r]
        let (hm, bt) = (Mat::rows(&h, r), Mat::t(b, r));
        product((m, n, r), &mut y, true, hm, bt, self.scale, true); // y += s h B^T
        if let Ok(mut slot) = self.h.lock() {
            *slot = Some(h);
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The input of the first block's projections (the embeddings, or patched activations
        // that are constants) needs no gradient.
        let (dx, dab) = self.grads(x, a, b, dy, x.track_op(), true)?;
        let (da, db) = dab.unzip();
        Ok((dx, da, db))
    }
}

impl LoraLinear {
    /// The gradients of `(x, A, B)` from `dy`: `dx` when `need_dx`, `(dA, dB)` when
    /// `need_factors` (an adapter that is not trained still passes `dx` through itself).
    pub(super) fn grads(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        need_factors: bool,
    ) -> Result<Grads> {
        let (m, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let dy = dy.contiguous()?;
        let base_dx = match need_dx {
            // the frozen product's backward reads only `dy`
            true => match self.base.bwd(x, &dy, &dy)? {
                Some(t) => Some(t),
                None => candle_core::bail!("lora-linear: the frozen product has no input gradient"),
            },
            false => None,
        };
        let (dx, dab) = with_f32(&dy, "lora-linear (dy)", |dy| {
            with_f32(x, "lora-linear (x)", |x| {
                with_f32(a, "lora-linear (A)", |a| {
                    with_f32(b, "lora-linear (B)", |b| {
                        let (dab, g) = self.factor_grads(x, a, b, dy, (m, k, r, n), need_factors);
                        let dx = match &base_dx {
                            Some(t) => Some(with_f32(t, "lora-linear (dy W)", |bx| {
                                Ok(self.input_grad(bx, &g, a, (m, k, r)))
                            })?),
                            None => None,
                        };
                        Ok((dx, dab))
                    })
                })
            })
        })?;
        let dev = x.device();
        let dab = match dab {
            Some((da, db)) => Some((
                Tensor::from_vec(da, (r, k), dev)?,
                Tensor::from_vec(db, (n, r), dev)?,
            )),
            None => None,
        };
        Ok((
            dx.map(|v| Tensor::from_vec(v, (m, k), dev)).transpose()?,
            dab,
        ))
    }
}

impl LoraLinear {
    /// `g = s dy B` `[m, r]`, which the input's gradient needs, and when `factors`
    /// `dA = g^T drop(x)` `[r, k]` and `dB = s dy^T h` `[n, r]` (the dropout mask drawn again).
    #[allow(clippy::type_complexity)]
    fn factor_grads(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        (m, k, r, n): (usize, usize, usize, usize),
        factors: bool,
    ) -> (Option<(Vec<f32>, Vec<f32>)>, Vec<f32>) {
        let s = self.scale;
        let g = matmul((m, r, n), Mat::rows(dy, n), Mat::rows(b, r), s, true); // s dy B [m, r]
        if !factors {
            return (None, g);
        }
        let dropped = dropped(x, &self.drop);
        let xm = dropped.as_deref().unwrap_or(x);
        let kept = self.h.lock().ok().and_then(|mut h| h.take());
        let h = match kept {
            Some(h) if h.len() == m * r => h,
            _ => matmul((m, r, k), Mat::rows(xm, k), Mat::t(a, k), 1.0, true), // drop(x) A^T [m, r]
        };
        let db = matmul((n, r, m), Mat::t(dy, n), Mat::rows(&h, r), s, true); // s dy^T h [n, r]
        let da = matmul((r, k, m), Mat::t(&g, r), Mat::rows(xm, k), 1.0, true); // g^T drop(x) [r, k]
        (Some((da, db)), g)
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
        let mut dx = matmul((m, k, r), Mat::rows(g, r), Mat::rows(a, k), 1.0, true); // g A, then masked, plus dy W
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
