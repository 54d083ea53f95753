//! The few non-matmul ops of a Llama block, each in two forms: fused kernels for inference
//! (candle's, or lqa's own loops in `super::kernels`), and compositions of differentiable
//! primitives for training paths. The SwiGLU gate has one form for both: a fused kernel with its
//! own backward.

use super::kernels;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, computed in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if !differentiable && x.dtype() == DType::F32 && x.is_contiguous() {
        return candle_nn::ops::rms_norm(x, w, eps as f32);
    }
    let dt = x.dtype();
    let x = if dt == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let d = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(w)
}

/// Attention probabilities from raw scores `[b, heads, s, kv]`: `softmax(scale * scores + mask)`
/// where `mask` (`[b, 1, s, kv]`, additive) hides future keys and each row's left padding
/// (`pads`; the chunk starts at `offset`, so `kv == offset + s`). Inference on f32 CPU tensors
/// runs it as one pass per row that derives the mask from the positions; otherwise the
/// differentiable composition with the mask tensor.
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    pads: &[usize],
    offset: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let fused = !differentiable && scores.dtype() == DType::F32 && scores.device().is_cpu();
    if fused {
        let (b, _, s, kv) = scores.dims4()?;
        if b == pads.len() && kv == offset + s {
            return scores.contiguous()?.apply_op1_no_bwd(&MaskedSoftmax {
                scale: scale as f32,
                pads: pads.to_vec(),
                offset,
            });
        }
    }
    let att = (scores * scale)?;
    let att = match mask {
        Some(m) => att.broadcast_add(&m.to_dtype(att.dtype())?)?,
        None => att,
    };
    softmax_last(&att, differentiable)
}

/// See [`attention_probs`]: the query at chunk row `i` (position `offset + i` of the padded
/// sequence) sees keys `min(pad, q)..=q`: its row's own tokens up to itself, or only itself
/// when it is a pad.
struct MaskedSoftmax {
    scale: f32,
    pads: Vec<usize>,
    offset: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (b, h, s, kv) = layout.shape().dims4()?;
        let (CpuStorage::F32(v), Some((a, e))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("masked-softmax: contiguous f32 scores expected");
        };
        let scores = &v[a..e];
        // SAFETY: the rows of `out` cover it, and masked_softmax_row writes every element of
        // its row.
        let out = unsafe {
            kernels::filled(b * h * s * kv, |out| {
                out.par_chunks_mut(kv)
                    .zip(scores.par_chunks(kv))
                    .enumerate()
                    .for_each(|(r, (o, row))| {
                        let (bi, i) = (r / (h * s), r % s);
                        let q = self.offset + i;
                        kernels::masked_softmax_row(
                            o,
                            row,
                            self.scale,
                            self.pads[bi].min(q),
                            q + 1,
                        );
                    });
            })
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Half-rotation RoPE (HF's `rotate_half`) on `[b, heads, seq, hd]` with `cos`/`sin` of shape
/// `[b, seq, hd/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    if !differentiable {
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        return candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin);
    }
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?; // [b, 1, seq, hd/2]
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// The SwiGLU gate `silu(g) * u`. On f32 CPU tensors it runs as one parallel pass with a
/// vectorised exp (candle would make three passes: silu, then the product), in inference and
/// training alike, so that a forward computes the same numbers whether or not it tracks
/// gradients; otherwise the differentiable composition.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let fused = g.dtype() == DType::F32
        && u.dtype() == DType::F32
        && g.dims() == u.dims()
        && g.device().is_cpu();
    if !fused {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gv), CpuStorage::F32(uv), Some((g0, g1)), Some((u0, u1))) =
            (gs, us, gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous f32 tensors expected");
        };
        let (gv, uv) = (&gv[g0..g1], &uv[u0..u1]);
        if gv.len() != uv.len() {
            candle_core::bail!("silu-mul: {:?} and {:?}", gl.shape(), ul.shape());
        }
        // SAFETY: the chunks of `out` cover it, and silu_mul writes every element of its chunk.
        let out = unsafe {
            kernels::filled(gv.len(), |out| {
                use rayon::prelude::*;
                const CHUNK: usize = 1 << 14;
                out.par_chunks_mut(CHUNK)
                    .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
                    .for_each(|(o, (g, u))| kernels::silu_mul(o, g, u));
            })
        };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    /// `d/dg = u sigma(g) (1 + g (1 - sigma(g)))`, `d/du = g sigma(g)`.
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sig = candle_nn::ops::sigmoid(g)?;
        let silu = (g * &sig)?;
        let dsilu = (&sig * ((g * (1.0 - &sig)?)? + 1.0)?)?;
        Ok((Some(((grad * u)? * dsilu)?), Some((grad * silu)?)))
    }
}
