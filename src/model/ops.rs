//! The few non-matmul ops of a Llama block, each in two forms: candle's fused kernels (fast, no
//! backward) for inference, and compositions of differentiable primitives for training paths.

use candle_core::{DType, Result, Tensor, D};

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

/// The SwiGLU gate `silu(g) * u`. Inference on contiguous f32 runs it as one parallel pass
/// (candle would make three: silu, then the product, each a full read and write); otherwise
/// the differentiable composition.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let fused = !g.track_op()
        && !u.track_op()
        && g.dtype() == DType::F32
        && u.dtype() == DType::F32
        && g.dims() == u.dims()
        && g.device().is_cpu();
    if !fused {
        return g.silu()? * u;
    }
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let (gs, gl) = g.storage_and_layout();
    let (us, ul) = u.storage_and_layout();
    let (
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(gv)),
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(uv)),
    ) = (&*gs, &*us)
    else {
        candle_core::bail!("silu_mul: f32 CPU tensors expected");
    };
    let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
    else {
        candle_core::bail!("silu_mul: contiguous tensors expected");
    };
    let (gv, uv) = (&gv[g0..g1], &uv[u0..u1]);
    let mut out = vec![0f32; gv.len()];
    {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &x), &y) in o.iter_mut().zip(g).zip(u) {
                    *o = x / (1.0 + (-x).exp()) * y;
                }
            });
    }
    drop((gs, us));
    Tensor::from_vec(out, g.shape(), g.device())
}
