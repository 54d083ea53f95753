//! The few non-matmul ops of a block, each in two forms: fused kernels for inference
//! (candle's, or lqa's own loops in `super::kernels`), and compositions of differentiable
//! primitives for training paths. The SwiGLU gate has one form for both: a fused kernel with its
//! own backward.

use super::kernels;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use std::sync::atomic::{AtomicBool, Ordering};

static GENERIC_OPS: AtomicBool = AtomicBool::new(false);

/// Whether lqa's own CPU kernels (fused ops, packed and frozen matmuls) may run on tensors of
/// `device`: only on the CPU, and not while [`force_generic_ops`] is on. Everywhere else
/// (CUDA, Metal) the model runs candle's ops, which have kernels on every device.
pub fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !GENERIC_OPS.load(Ordering::Relaxed)
}

/// Run the CPU as a GPU runs: candle's generic ops instead of lqa's CPU kernels, for models
/// loaded and forwards run from now on (process-wide; for tests and the GPU check, which
/// compare the two paths on a machine without a GPU).
#[doc(hidden)]
pub fn force_generic_ops(on: bool) {
    GENERIC_OPS.store(on, Ordering::Relaxed);
}

/// The f32 slice of a contiguous CPU tensor's storage.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        candle_core::bail!("{op}: only f32");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&v[a..b])
}

/// A CPU tensor's values as one contiguous f32 slice, for `f` (backward passes of the custom
/// ops, which get tensors rather than storages).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{op}: not a CPU tensor");
    };
    f(f32_slice(s, l, op)?)
}

/// The values of a CPU tensor `[b, h, len, d]` that may be a view of the first `len` positions
/// of a larger buffer `[b, h, cap, d]` (a KV cache), for `f(values, cap)`: position `p` of
/// head block `i` (`i = bi * h + head`) at `values[(i * cap + p) * d..]`. Such a view is read in
/// place; other layouts are copied (`cap == len`).
pub(crate) fn with_f32_heads<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32], usize) -> Result<R>,
) -> Result<R> {
    let (b, h, len, d) = t.dims4()?;
    {
        let (s, l) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*s {
            let st = l.stride();
            if st[3] == 1 && st[2] == d && d > 0 && st[1] % d == 0 && st[0] == h * st[1] {
                let cap = st[1] / d;
                let start = l.start_offset();
                let need = ((b * h).saturating_sub(1) * cap + len) * d;
                if cap >= len && start + need <= v.len() {
                    return f(&v[start..start + need], cap);
                }
            }
        }
    }
    with_f32(t, op, |v| f(v, len))
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, computed in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && cpu_kernels(x.device()) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return match differentiable {
            true => x.apply_op2(&w, RmsNorm(eps as f32)),
            false => x.apply_op2_no_bwd(&w, &RmsNorm(eps as f32)),
        };
    }
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

/// The elementwise sum of CPU f32 tensors of one shape, in one pass on the compute pool
/// (candle's `add` runs on its own thread pool beside the compute pool's threads, and makes one
/// pass per pair).
pub(super) fn sum_f32(parts: &[&Tensor]) -> Result<Tensor> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let Some(first) = parts.first() else {
        candle_core::bail!("sum_f32: nothing to add");
    };
    let parts: Vec<Tensor> = parts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    let mut guards = Vec::with_capacity(parts.len());
    for t in &parts {
        if t.shape() != first.shape() {
            candle_core::bail!("sum_f32: {:?} and {:?}", first.shape(), t.shape());
        }
        guards.push(t.storage_and_layout());
    }
    let mut slices = Vec::with_capacity(parts.len());
    for (s, l) in &guards {
        let candle_core::Storage::Cpu(s) = &**s else {
            candle_core::bail!("sum_f32: not a CPU tensor");
        };
        slices.push(f32_slice(s, l, "sum_f32")?);
    }
    let n = slices[0].len();
    // SAFETY: every chunk of the output is written from the first part, then added to.
    let out = unsafe {
        kernels::filled(n, |out| {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let at = c * CHUNK;
                for (o, &v) in o.iter_mut().zip(&slices[0][at..]) {
                    o.write(v);
                }
                // SAFETY: written just above.
                let o = &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]);
                for s in &slices[1..] {
                    for (o, &v) in o.iter_mut().zip(&s[at..]) {
                        *o += v;
                    }
                }
            })
        })
    };
    Tensor::from_vec(out, first.shape(), first.device())
}

/// The input gradient of RMSNorm over rows of `w.len()`, row by row in parallel
/// ([`kernels::rms_norm_row_bwd`]): written into `dx`, or added to it when `add`.
pub(super) fn rms_norm_dx(dx: &mut [f32], x: &[f32], w: &[f32], dy: &[f32], eps: f32, add: bool) {
    use rayon::prelude::*;
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(o, (x, dy))| kernels::rms_norm_row_bwd(o, x, w, dy, eps, add));
}

/// RMSNorm over the last dimension, one vectorised pass per row (candle's sums each row
/// one value at a time).
pub(super) struct RmsNorm(pub f32);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, w) = (
            f32_slice(xs, xl, "rms-norm")?,
            f32_slice(ws, wl, "rms-norm")?,
        );
        let d = w.len();
        if xl.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: x {:?} with a weight of {d}", xl.shape());
        }
        // SAFETY: the rows of `out` cover it (its length is a multiple of d), and rms_norm_row
        // writes every element of its row.
        let out = unsafe {
            kernels::filled(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .for_each(|(o, x)| kernels::rms_norm_row(o, x, w, self.0));
            })
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    /// `dx` row by row ([`kernels::rms_norm_row_bwd`]); `dw = sum over rows of dy x r` only
    /// when `w` is trained (norm weights are frozen in lqa).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let eps = self.0;
        let (dx, dw) = with_f32(x, "rms-norm", |xv| {
            with_f32(w, "rms-norm", |wv| {
                with_f32(dy, "rms-norm", |dyv| {
                    // the first block's input (embeddings, constant patches) needs none
                    let dx = x.track_op().then(|| {
                        let mut dx = vec![0f32; xv.len()];
                        rms_norm_dx(&mut dx, xv, wv, dyv, eps, false);
                        dx
                    });
                    let dw = w.track_op().then(|| {
                        let mut dw = vec![0f32; d];
                        for (x, dy) in xv.chunks(d).zip(dyv.chunks(d)) {
                            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                            let r = 1.0 / (ms + eps).sqrt();
                            for ((g, &x), &dy) in dw.iter_mut().zip(x).zip(dy) {
                                *g += dy * x * r;
                            }
                        }
                        dw
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
            .transpose()?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// `[b, s, heads * hd]` (a projection's output) to `[b, heads, s, hd]`, rotated by RoPE with
/// `cos`/`sin` (`[b, s, hd/2]`) when given. Inference on f32 CPU tensors does it in one pass;
/// otherwise a transpose and [`rope`].
pub fn split_heads(
    x: &Tensor,
    heads: usize,
    rope_cs: Option<(&Tensor, &Tensor)>,
    differentiable: bool,
) -> Result<Tensor> {
    let (b, s, hh) = x.dims3()?;
    let hd = hh / heads;
    if x.dtype() == DType::F32 && cpu_kernels(x.device()) {
        let x = x.contiguous()?;
        let op = SplitHeads { heads };
        return match (rope_cs, differentiable) {
            (Some((cos, sin)), d) => {
                let cos = cos.to_dtype(DType::F32)?.contiguous()?;
                let sin = sin.to_dtype(DType::F32)?.contiguous()?;
                match d {
                    true => x.apply_op3(&cos, &sin, op),
                    false => x.apply_op3_no_bwd(&cos, &sin, &op),
                }
            }
            (None, true) => x.apply_op1(op),
            (None, false) => x.apply_op1_no_bwd(&op),
        };
    }
    let t = x
        .reshape((b, s, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    match rope_cs {
        Some((cos, sin)) => rope(&t, cos, sin, differentiable),
        None => Ok(t),
    }
}

/// See [`split_heads`].
struct SplitHeads {
    heads: usize,
}

impl SplitHeads {
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cs: Option<(&[f32], &[f32])>,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (b, s, hh) = xl.shape().dims3()?;
        let x = f32_slice(x, xl, "split-heads")?;
        let h = self.heads;
        let hd = hh / h;
        let half = hd / 2;
        if let Some((c, _)) = cs {
            if c.len() != b * s * half {
                candle_core::bail!(
                    "split-heads: cos/sin of {} values for [{b}, {s}, {half}]",
                    c.len()
                );
            }
        }
        // SAFETY: the [s, hd] blocks of `out` cover it, and split_head writes every element of
        // its block.
        let out = unsafe {
            kernels::filled(b * h * s * hd, |out| {
                out.par_chunks_mut(s * hd).enumerate().for_each(|(bh, o)| {
                    let (bi, head) = (bh / h, bh % h);
                    let (c, sn) = match cs {
                        Some((c, sn)) => (
                            &c[bi * s * half..][..s * half],
                            &sn[bi * s * half..][..s * half],
                        ),
                        None => (&[][..], &[][..]),
                    };
                    kernels::split_head(o, &x[bi * s * hh + head * hd..], hh, hd, c, sn);
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((b, h, s, hd))))
    }

    /// The input gradient `[b, s, heads * hd]` of `dy` `[b, heads, s, hd]`: heads merged back,
    /// rotated back where RoPE was applied ([`kernels::merge_token`]).
    fn backward(&self, x: &Tensor, dy: &Tensor, cs: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        use rayon::prelude::*;
        let (b, s, hh) = x.dims3()?;
        let h = self.heads;
        let (hd, half) = (hh / h, hh / h / 2);
        let run = |dy: &[f32], c: &[f32], sn: &[f32]| -> Result<Vec<f32>> {
            let mut dx = vec![0f32; b * s * hh];
            dx.par_chunks_mut(hh).enumerate().for_each(|(r, o)| {
                let (bi, i) = (r / s, r % s);
                let (c, sn) = match c.is_empty() {
                    true => (c, sn),
                    false => (&c[r * half..][..half], &sn[r * half..][..half]),
                };
                kernels::merge_token(o, &dy[bi * h * s * hd + i * hd..], s * hd, hd, c, sn);
            });
            Ok(dx)
        };
        let dx = with_f32(dy, "split-heads", |dyv| match cs {
            Some((c, sn)) => with_f32(c, "split-heads", |c| {
                with_f32(sn, "split-heads", |sn| run(dyv, c, sn))
            }),
            None => run(dyv, &[], &[]),
        })?;
        Tensor::from_vec(dx, (b, s, hh), x.device())
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }
    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(x, xl, None)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, dy, None)?))
    }
}

impl CustomOp3 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads-rope"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        sn: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cs = (
            f32_slice(c, cl, "split-heads")?,
            f32_slice(sn, sl, "split-heads")?,
        );
        self.run(x, xl, Some(cs))
    }
    /// cos/sin are constants of the positions: no gradient.
    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(x, dy, Some((cos, sin)))?), None, None))
    }
}

/// How raw attention scores become logits of the softmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Multiplier of `q . k`.
    pub scale: f64,
    /// `cap * tanh(x / cap)` after scaling, before the mask (Gemma 2).
    pub softcap: Option<f64>,
    /// Each query sees only its last `window` keys, itself included (sliding-window layers).
    pub window: Option<usize>,
}

/// The first key a query at padded position `q` may see, in a row with `pad` left pads:
/// its row's first token (or itself when it is a pad), and no further back than `window`.
pub fn first_key(pad: usize, q: usize, window: Option<usize>) -> usize {
    let lo = pad.min(q);
    match window {
        Some(w) => lo.max((q + 1).saturating_sub(w)),
        None => lo,
    }
}

/// Attention probabilities from raw scores `[b, heads, s, kv]`:
/// `softmax(softcap(scale * scores) + mask)` where `mask` (`[b, 1, s, kv]`, additive) hides
/// future keys, each row's left padding (`pads`; the chunk starts at `offset`, so
/// `kv == offset + s`) and, for a sliding-window layer, keys out of the window. Inference on
/// f32 CPU tensors runs it as one pass per row that derives the mask from the positions;
/// otherwise the differentiable composition with the mask tensor.
pub fn attention_probs(
    scores: &Tensor,
    how: &Scores,
    mask: Option<&Tensor>,
    pads: &[usize],
    offset: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let fused = scores.dtype() == DType::F32 && cpu_kernels(scores.device());
    let (scores, scale) = match how.softcap {
        Some(c) => ((((scores * (how.scale / c))?.tanh())? * c)?, 1.0),
        None => (scores.clone(), how.scale),
    };
    if fused {
        let (b, _, s, kv) = scores.dims4()?;
        if b == pads.len() && kv == offset + s {
            let op = MaskedSoftmax {
                scale: scale as f32,
                pads: pads.to_vec(),
                offset,
                window: how.window,
            };
            return match differentiable {
                true => scores.contiguous()?.apply_op1(op),
                false => scores.contiguous()?.apply_op1_no_bwd(&op),
            };
        }
    }
    if mask.is_none() && (how.window.is_some() || pads.iter().any(|&p| p > 0)) {
        let (_, _, s, kv) = scores.dims4()?;
        if s > 1 || how.window.is_some_and(|w| w < kv) || pads.iter().any(|&p| p > 0) {
            candle_core::bail!("attention: a mask is needed here but none was given");
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
/// sequence) sees keys `first_key(pad, q, window)..=q`.
struct MaskedSoftmax {
    scale: f32,
    pads: Vec<usize>,
    offset: usize,
    window: Option<usize>,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (b, h, s, kv) = layout.shape().dims4()?;
        let scores = f32_slice(storage, layout, "masked-softmax")?;
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
                            first_key(self.pads[bi], q, self.window),
                            q + 1,
                        );
                    });
            })
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// Row by row from the probabilities ([`kernels::softmax_row_bwd`]); masked keys have
    /// probability 0 and so no gradient.
    fn bwd(&self, scores: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let kv = *scores.dims().last().unwrap_or(&1);
        let ds = with_f32(p, "masked-softmax", |pv| {
            with_f32(dp, "masked-softmax", |dpv| {
                let mut ds = vec![0f32; pv.len()];
                ds.par_chunks_mut(kv)
                    .zip(pv.par_chunks(kv).zip(dpv.par_chunks(kv)))
                    .for_each(|(o, (p, dp))| kernels::softmax_row_bwd(o, p, dp, self.scale));
                Ok(ds)
            })
        })?;
        Ok(Some(Tensor::from_vec(ds, scores.shape(), scores.device())?))
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
        && cpu_kernels(g.device());
    if !fused {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

pub(super) struct SiluMul;

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
        let (gv, uv) = (
            f32_slice(gs, gl, "silu-mul")?,
            f32_slice(us, ul, "silu-mul")?,
        );
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

    /// `d/dg = u sigma(g) (1 + g (1 - sigma(g)))`, `d/du = g sigma(g)`, in one parallel pass
    /// ([`kernels::silu_mul_bwd`]).
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let (dg, du) = with_f32(g, "silu-mul", |gv| {
            with_f32(u, "silu-mul", |uv| {
                with_f32(grad, "silu-mul", |dy| {
                    let (mut dg, mut du) = (vec![0f32; gv.len()], vec![0f32; gv.len()]);
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
                        .zip(dy.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), dy)| {
                            kernels::silu_mul_bwd(dg, du, g, u, dy)
                        });
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{causal_mask, rel_diff, t};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn split_heads_equals_transpose_then_candle_rope() {
        let (b, s, h, hd) = (2, 5, 3, 8);
        let x = t(&[b, s, h * hd], 1.0);
        let (cos, sin) = (t(&[b, s, hd / 2], 2.0), t(&[b, s, hd / 2], 3.0));
        let plain = x.reshape((b, s, h, hd)).unwrap().transpose(1, 2).unwrap();
        let want = candle_nn::rotary_emb::rope(&plain.contiguous().unwrap(), &cos, &sin).unwrap();
        let got = split_heads(&x, h, Some((&cos, &sin)), false).unwrap();
        assert_eq!(got.dims(), [b, h, s, hd]);
        assert_eq!(max_diff(&got, &want), 0.0);
        let got = split_heads(&x, h, None, false).unwrap();
        assert_eq!(max_diff(&got, &plain), 0.0);
        // the differentiable composition agrees too
        let diff = split_heads(&x, h, Some((&cos, &sin)), true).unwrap();
        assert!(max_diff(&diff, &want) < 1e-6);
    }

    /// `f` on a f32 variable (the custom ops) and on its f64 copy (candle's composition), a
    /// fixed weighting of the output summed: the outputs and the input gradients agree.
    fn grads_agree(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f64) {
        let run = |dt: DType| {
            let v = candle_core::Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
            let y = f(v.as_tensor()).unwrap();
            let c = t(y.dims(), 9.0).to_dtype(dt).unwrap();
            let loss = (&y * &c).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let dx = g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
            (y.to_dtype(DType::F64).unwrap(), dx)
        };
        let (y32, g32) = run(DType::F32);
        let (y64, g64) = run(DType::F64);
        let rel = rel_diff;
        assert!(rel(&y32, &y64) < tol, "outputs differ: {}", rel(&y32, &y64));
        assert!(
            rel(&g32, &g64) < tol,
            "input gradients differ: {}",
            rel(&g32, &g64)
        );
    }

    #[test]
    fn fused_rms_norm_matches_the_composition_and_its_gradient() {
        let x = t(&[3, 4, 37], 0.5);
        let w = t(&[37], 7.0);
        let fused = rms_norm(&x, &w, 1e-5, false).unwrap();
        let slow = rms_norm(
            &x.to_dtype(DType::F64).unwrap(),
            &w.to_dtype(DType::F64).unwrap(),
            1e-5,
            true,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        assert!(max_diff(&fused, &slow) < 1e-6);
        grads_agree(
            &x,
            |x| rms_norm(x, &w.to_dtype(x.dtype())?, 1e-5, true),
            1e-5,
        );
    }

    #[test]
    fn split_heads_gradient_matches_the_composition() {
        let (b, s, h, hd) = (2, 5, 3, 8);
        let x = t(&[b, s, h * hd], 1.0);
        let (cos, sin) = (t(&[b, s, hd / 2], 2.0), t(&[b, s, hd / 2], 3.0));
        for rope in [true, false] {
            grads_agree(
                &x,
                |x| {
                    let cs = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
                    split_heads(x, h, rope.then_some((&cs.0, &cs.1)), true)
                },
                1e-5,
            );
        }
    }

    #[test]
    fn silu_mul_gradient_matches_the_composition() {
        let g = t(&[3, 50], 1.0).affine(6.0, 0.0).unwrap();
        let u = t(&[3, 50], 2.0);
        grads_agree(&g, |g| silu_mul(g, &u.to_dtype(g.dtype())?), 1e-5);
        grads_agree(&u, |u| silu_mul(&g.to_dtype(u.dtype())?, u), 1e-5);
    }

    #[test]
    fn masked_softmax_gradient_matches_the_composition() {
        // two rows, the second left-padded by 2; a sliding window of 3 in the second case
        let (b, h, s) = (2, 3, 6);
        let pads = [0usize, 2];
        let scores = t(&[b, h, s, s], 4.0);
        for window in [None, Some(3)] {
            let mask = causal_mask(&pads, s, window);
            let how = Scores {
                scale: 0.7,
                softcap: None,
                window,
            };
            grads_agree(
                &scores,
                |x| attention_probs(x, &how, Some(&mask.to_dtype(x.dtype())?), &pads, 0, true),
                1e-5,
            );
        }
    }
}
