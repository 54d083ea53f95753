//! Causal self-attention of one layer as one graph node, for training on the CPU (f32, no KV
//! cache): `y = softmax(scale q k^T + mask) v`, heads merged, over `(q, k, v)`.
//!
//! Built from candle's ops, attention is a dozen nodes (the grouped-query reshapes, `k^T`, two
//! batched products, the softmax, the transposes back), and candle's backward starts every
//! node's gradient from zeros and adds to it. Here the backward recomputes each head's
//! probabilities (a product of `[s, hd]` by `[hd, s]`, small beside the projections) and writes
//! `dq`, `dk` and `dv` once.
//!
//! Per head `h` (query head `h` reads KV head `h / rep`), with `P = softmax(scale S + mask)`,
//! `S = q k^T`:
//! - `dv = P^T dy`, `dP = dy v^T`
//! - `dS = scale P (dP - rowsum(P dP))`
//! - `dq = dS k`, `dk = dS^T q`
//!
//! The KV heads' gradients are summed over the query heads that share them.

use super::kernels;
use super::ops::{f32_slice, first_key, with_f32};
use super::packed::Shared;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A `[rows, cols]` operand of [`mm`] at `ptr`, with row and column strides.
#[derive(Clone, Copy)]
struct M {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl M {
    fn rows(v: &[f32], cols: usize) -> Self {
        M {
            ptr: v.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of row-major `v` whose rows have `len` values.
    fn t(v: &[f32], len: usize) -> Self {
        M {
            ptr: v.as_ptr(),
            rs: 1,
            cs: len as isize,
        }
    }
}

/// `dst (+)= lhs [m, k] rhs [k, n]`, `dst` with row stride `dst_rs` (columns contiguous), on
/// this thread.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `n` values at row stride `dst_rs`, and each
/// operand valid for reads of every element its strides name.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    lhs: M,
    rhs: M,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            add,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Causal attention of `q` `[b, heads, s, hd]` over `k`, `v` `[b, kv_heads, s, hd]`, with each
/// row's left padding `pads` and an optional sliding `window`; the output `[b, s, heads * hd]`.
pub(super) struct CausalAttention {
    pub scale: f32,
    pub pads: Vec<usize>,
    pub window: Option<usize>,
}

struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    s: usize,
    hd: usize,
}

impl CausalAttention {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (b, nh, s, hd) = q.dims4()?;
        let (bk, nkv, sk, hdk) = k.dims4()?;
        if (bk, sk, hdk) != (b, s, hd)
            || v.dims() != k.dims()
            || nkv == 0
            || nh % nkv != 0
            || self.pads.len() != b
        {
            candle_core::bail!(
                "causal-attention: q {q:?}, k {k:?}, v {v:?} with {} row pads",
                self.pads.len()
            );
        }
        Ok(Dims { b, nh, nkv, s, hd })
    }

    /// Head `hh` of row `bi`: the probabilities `[s, s]` of `q_h k^T` into `p`.
    fn probs(&self, d: &Dims, q: &[f32], k: &[f32], bi: usize, hh: usize, p: &mut [f32]) {
        let (s, hd) = (d.s, d.hd);
        let qh = &q[(bi * d.nh + hh) * s * hd..][..s * hd];
        let kh = &k[(bi * d.nkv + hh / (d.nh / d.nkv)) * s * hd..][..s * hd];
        let mut scores = vec![0f32; s * s];
        // SAFETY: scores is [s, s]; qh [s, hd] row-major; kh^T reads kh [s, hd] row-major.
        unsafe {
            mm(
                s,
                s,
                hd,
                scores.as_mut_ptr(),
                s,
                false,
                M::rows(qh, hd),
                M::t(kh, hd),
            )
        };
        let pad = self.pads[bi];
        for (i, (row, out)) in scores.chunks(s).zip(p.chunks_mut(s)).enumerate() {
            // SAFETY: f32 and MaybeUninit<f32> have the same layout; every element is written.
            let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
            kernels::masked_softmax_row(
                out,
                row,
                self.scale,
                first_key(pad, i, self.window),
                i + 1,
            );
        }
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(lq.shape(), lk.shape(), lv.shape())?;
        let (q, k, v) = (
            f32_slice(sq, lq, "causal-attention")?,
            f32_slice(sk, lk, "causal-attention")?,
            f32_slice(sv, lv, "causal-attention")?,
        );
        let (s, hd, nh) = (d.s, d.hd, d.nh);
        let rep = nh / d.nkv;
        let mut y = vec![0f32; d.b * s * nh * hd];
        let out = Shared(y.as_mut_ptr());
        (0..d.b * nh).into_par_iter().for_each(|t| {
            let (bi, hh) = (t / nh, t % nh);
            let mut p = vec![0f32; s * s];
            self.probs(&d, q, k, bi, hh, &mut p);
            let vh = &v[(bi * d.nkv + hh / rep) * s * hd..][..s * hd];
            // SAFETY: y is [b, s, nh * hd]; this task writes columns hh*hd..(hh+1)*hd of row
            // bi's s tokens, which no other task writes.
            unsafe {
                let dst = out.at(bi * s * nh * hd + hh * hd);
                mm(
                    s,
                    hd,
                    s,
                    dst,
                    nh * hd,
                    false,
                    M::rows(&p, s),
                    M::rows(vh, hd),
                );
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((d.b, s, nh * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape(), v.shape())?;
        let (s, hd, nh) = (d.s, d.hd, d.nh);
        let rep = nh / d.nkv;
        let head = s * hd;
        let (dq, dk_h, dv_h) = with_f32(q, "causal-attention", |q| {
            with_f32(k, "causal-attention", |k| {
                with_f32(v, "causal-attention", |v| {
                    with_f32(dy, "causal-attention", |dy| {
                        // dq [b, nh, s, hd]; dk, dv per query head, summed over groups below
                        let mut dq = vec![0f32; d.b * nh * head];
                        let mut dk_h = vec![0f32; d.b * nh * head];
                        let mut dv_h = vec![0f32; d.b * nh * head];
                        dq.par_chunks_mut(head)
                            .zip(dk_h.par_chunks_mut(head).zip(dv_h.par_chunks_mut(head)))
                            .enumerate()
                            .for_each(|(t, (dqh, (dkh, dvh)))| {
                                let (bi, hh) = (t / nh, t % nh);
                                let mut p = vec![0f32; s * s];
                                self.probs(&d, q, k, bi, hh, &mut p);
                                let qh = &q[t * head..][..head];
                                let g = (bi * d.nkv + hh / rep) * head;
                                let (kh, vh) = (&k[g..][..head], &v[g..][..head]);
                                // dy_h: [s, hd] at row stride nh * hd
                                let dyh = M {
                                    ptr: dy[bi * s * nh * hd + hh * hd..].as_ptr(),
                                    rs: (nh * hd) as isize,
                                    cs: 1,
                                };
                                let mut dp = vec![0f32; s * s];
                                // SAFETY: every destination is a buffer of the named shape,
                                // row-major; dy_h reads s rows of hd values at stride nh*hd
                                // inside row bi of dy [b, s, nh*hd]; the others read row-major
                                // [s, hd] or [s, s] buffers.
                                unsafe {
                                    // dv = P^T dy_h [s, hd]
                                    mm(s, hd, s, dvh.as_mut_ptr(), hd, false, M::t(&p, s), dyh);
                                    // dP = dy_h v^T [s, s]
                                    mm(s, s, hd, dp.as_mut_ptr(), s, false, dyh, M::t(vh, hd));
                                }
                                let mut ds = vec![0f32; s * s];
                                for ((o, p), dp) in
                                    ds.chunks_mut(s).zip(p.chunks(s)).zip(dp.chunks(s))
                                {
                                    kernels::softmax_row_bwd(o, p, dp, self.scale);
                                }
                                // SAFETY: as above.
                                unsafe {
                                    // dq = dS k [s, hd]
                                    mm(
                                        s,
                                        hd,
                                        s,
                                        dqh.as_mut_ptr(),
                                        hd,
                                        false,
                                        M::rows(&ds, s),
                                        M::rows(kh, hd),
                                    );
                                    // dk = dS^T q [s, hd]
                                    mm(
                                        s,
                                        hd,
                                        s,
                                        dkh.as_mut_ptr(),
                                        hd,
                                        false,
                                        M::t(&ds, s),
                                        M::rows(qh, hd),
                                    );
                                }
                            });
                        Ok((dq, dk_h, dv_h))
                    })
                })
            })
        })?;
        // sum each KV head's gradient over the query heads that read it
        let group = |h: Vec<f32>| -> Vec<f32> {
            if rep == 1 {
                return h;
            }
            let mut out = vec![0f32; d.b * d.nkv * head];
            out.par_chunks_mut(head).enumerate().for_each(|(t, o)| {
                let (bi, g) = (t / d.nkv, t % d.nkv);
                for r in 0..rep {
                    let src = &h[(bi * nh + g * rep + r) * head..][..head];
                    for (o, s) in o.iter_mut().zip(src) {
                        *o += s;
                    }
                }
            });
            out
        };
        let dev = q.device();
        let kv_shape = (d.b, d.nkv, s, hd);
        Ok((
            Some(Tensor::from_vec(dq, (d.b, nh, s, hd), dev)?),
            Some(Tensor::from_vec(group(dk_h), kv_shape, dev)?),
            Some(Tensor::from_vec(group(dv_h), kv_shape, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{attention_probs, Scores};
    use candle_core::{DType, Device, Var};

    fn t(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused op (f32) against candle's composition in f64 (grouped heads, the mask tensor,
    /// the composed softmax): the output and the gradients of q, k and v, with left padding,
    /// with and without a sliding window.
    #[test]
    fn fused_attention_matches_the_composition_and_its_gradients() {
        let (b, nh, nkv, s, hd) = (2, 4, 2, 7, 8);
        let pads = vec![0usize, 3];
        let scale = 0.35;
        let (q, k, v) = (
            t(&[b, nh, s, hd], 1.0),
            t(&[b, nkv, s, hd], 2.0),
            t(&[b, nkv, s, hd], 3.0),
        );
        let c = t(&[b, s, nh * hd], 4.0);
        for window in [None, Some(3)] {
            let run = |dt: DType| {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap())
                    .collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let y = if dt == DType::F32 {
                    let op = CausalAttention {
                        scale: scale as f32,
                        pads: pads.clone(),
                        window,
                    };
                    q.apply_op3(k, v, op).unwrap()
                } else {
                    let mut m = vec![f64::NEG_INFINITY; b * s * s];
                    for (bi, &pad) in pads.iter().enumerate() {
                        for i in 0..s {
                            for j in first_key(pad, i, window)..=i {
                                m[(bi * s + i) * s + j] = 0.0;
                            }
                        }
                    }
                    let mask = Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu).unwrap();
                    let rep = nh / nkv;
                    let att = q
                        .reshape((b, nkv, rep * s, hd))
                        .unwrap()
                        .matmul(&k.t().unwrap())
                        .unwrap()
                        .reshape((b, nh, s, s))
                        .unwrap();
                    let how = Scores {
                        scale,
                        softcap: None,
                        window,
                    };
                    let p = attention_probs(&att, &how, Some(&mask), &pads, 0, true).unwrap();
                    p.reshape((b, nkv, rep * s, s))
                        .unwrap()
                        .matmul(v)
                        .unwrap()
                        .reshape((b, nh, s, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b, s, nh * hd))
                        .unwrap()
                };
                let loss = (&y * c.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let mut out = vec![y.to_dtype(DType::F64).unwrap()];
                for x in &vars {
                    out.push(g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap());
                }
                out
            };
            let (f, c64) = (run(DType::F32), run(DType::F64));
            for (name, (f, c)) in ["y", "dq", "dk", "dv"].iter().zip(f.iter().zip(&c64)) {
                let d: f64 = (f - c)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let m: f64 = c.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    d / m < 1e-5,
                    "window {window:?}: {name} differs by {}",
                    d / m
                );
            }
        }
    }
}
