//! One transformer block as one graph node, for training on the CPU in f32.
//!
//! The block's ops are each one node already (`super::lora_linear`, `super::attention`,
//! `super::ops`), but a block is still about fifteen of them, and candle's backward starts the
//! gradient of every node input from zeros and adds to it: a memset, an allocation and an add
//! of the tensor's size per edge (huggingface/candle#3578 and #3822 would store the first
//! gradient instead; neither is merged). Here the block's backward calls the same ops' backward
//! passes in reverse order and sums the few gradients that meet (the normed input of q/k/v and
//! of gate/up, the residual stream) in place, and candle sees one node per block.
//!
//! The adapters' factors reach the graph through the node's second input, the *token*: the
//! concatenation of every trained factor, flattened. Its gradient is the factors' gradients in
//! the same order, which candle's `cat` and `flatten` backward hand to each factor, so a plain
//! `loss.backward()` works as over any graph.
//!
//! With `recompute` the node keeps only its input, and its backward runs the block's forward
//! again (the dropout masks are drawn again from their seed).
//!
//! ```text
//! n1 = rms_norm(x)        q, k, v = n1 Wq, n1 Wk, n1 Wv     (each + its adapter)
//! y  = attn(q, k, v)      r = x + y Wo
//! n2 = rms_norm(r)        g, u = n2 Wg, n2 Wu
//! h  = silu(g) u          out = r + h Wd
//! ```

use super::attention::CausalAttention;
use super::linear::LayerFns;
use super::ops::{cpu_kernels, rms_norm_dx, sum_f32, with_f32, RmsNorm, SiluMul};
use super::{Block, Ctx};
use crate::config::Activation;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// The layers in the order of `BlockNode::layers` (and of the token).
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Block `blk` on `x` `[b, s, d]` as one node (see the module doc), or `None` where the block
/// cannot be one: not training, not f32 on the CPU, a soft-capped attention, per-head or
/// sublayer-output norms, another activation than SwiGLU, a chunk at an offset, or a layer
/// whose weight or adapter the CPU ops do not take.
pub(super) fn block_node(
    blk: &Block,
    x: &Tensor,
    ctx: &Ctx,
    recompute: bool,
) -> crate::Result<Option<Tensor>> {
    let (att, mlp) = (&blk.attn, &blk.mlp);
    let (b, s, d) = x.dims3()?;
    let eligible = ctx.differentiable
        && x.dtype() == DType::F32
        && cpu_kernels(x.device())
        && att.softcap.is_none()
        && att.q_norm.is_none()
        && att.k_norm.is_none()
        && blk.post_attn_norm.is_none()
        && blk.post_mlp_norm.is_none()
        && matches!(mlp.act, Activation::Silu)
        && ctx.offset == 0
        && ctx.pads.len() == b
        && blk.attn_norm.dtype() == DType::F32
        && blk.mlp_norm.dtype() == DType::F32;
    if !eligible {
        return Ok(None);
    }
    let x2 = x.reshape((b * s, d))?;
    let mut layers = Vec::with_capacity(7);
    for l in [
        &att.q, &att.k, &att.v, &att.o, &mlp.gate, &mlp.up, &mlp.down,
    ] {
        match l.fns(&x2, ctx.dropout)? {
            Some(f) => layers.push((f, l.lora.clone())),
            None => return Ok(None),
        }
    }
    // the trained factors, flattened into the token in the layers' order
    let mut parts = Vec::new();
    let mut trained = Vec::new();
    if ctx.track {
        for (i, (_, lora)) in layers.iter().enumerate() {
            if let Some(l) = lora {
                parts.push(l.a.as_tensor().flatten_all()?);
                parts.push(l.b.as_tensor().flatten_all()?);
                trained.push(i);
            }
        }
    }
    let token = match parts.is_empty() {
        true => Tensor::zeros(1, DType::F32, x.device())?,
        false => Tensor::cat(&parts, 0)?,
    };
    let node = BlockNode {
        layers: layers.into_iter().map(|(f, _)| f).collect(),
        attn: att.causal_node(ctx)?,
        norms: [blk.attn_norm.contiguous()?, blk.mlp_norm.contiguous()?],
        eps: ctx.eps as f32,
        dims: (b, s, d),
        trained,
        out: Mutex::new(None),
        stash: Mutex::new(None),
    };
    let (out, stash) = node.run(&x.detach())?;
    *lock(&node.out)? = Some(out);
    if !recompute {
        *lock(&node.stash)? = Some(stash);
    }
    let y = x.apply_op2(&token, node)?; // [b, s, d]
    Ok(Some(y))
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("block node: a poisoned lock".into()))
}

struct BlockNode {
    /// q, k, v, o, gate, up, down
    layers: Vec<LayerFns>,
    attn: CausalAttention,
    /// The attention's and the MLP's RMSNorm weights `[d]`.
    norms: [Tensor; 2],
    eps: f32,
    /// `(b, s, d)`
    dims: (usize, usize, usize),
    /// The layers whose factors are in the token, in order.
    trained: Vec<usize>,
    /// The forward's output, computed when the node was made `[b * s, d]`.
    out: Mutex<Option<Tensor>>,
    /// The forward's intermediates, for the backward (none when recomputing).
    stash: Mutex<Option<Stash>>,
}

/// What the backward reads of the forward (untracked; `m = b * s` rows).
struct Stash {
    n1: Tensor, // [m, d]
    q: Tensor,  // [m, heads * hd]
    k: Tensor,  // [m, kv_heads * hd]
    v: Tensor,  // [m, kv_heads * hd]
    y: Tensor,  // [m, heads * hd]
    r: Tensor,  // [m, d]
    n2: Tensor, // [m, d]
    g: Tensor,  // [m, ff]
    u: Tensor,  // [m, ff]
    h: Tensor,  // [m, ff]
}

impl BlockNode {
    /// The block's forward on untracked `x` `[b, s, d]`: its output `[b * s, d]` and what the
    /// backward needs.
    fn run(&self, x: &Tensor) -> Result<(Tensor, Stash)> {
        let (b, s, d) = self.dims;
        let m = b * s;
        let l = &self.layers;
        let x = x.reshape((m, d))?.contiguous()?;
        let n1 = x.apply_op2_no_bwd(&self.norms[0], &RmsNorm(self.eps))?;
        let (q, k, v) = (l[Q].forward(&n1)?, l[K].forward(&n1)?, l[V].forward(&n1)?);
        let y = q
            .reshape((b, s, ()))?
            .apply_op3_no_bwd(&k.reshape((b, s, ()))?, &v.reshape((b, s, ()))?, &self.attn)?
            .reshape((m, ()))?;
        let r = sum_f32(&[&x, &l[O].forward(&y)?])?;
        let n2 = r.apply_op2_no_bwd(&self.norms[1], &RmsNorm(self.eps))?;
        let (g, u) = (l[GATE].forward(&n2)?, l[UP].forward(&n2)?);
        let h = g.apply_op2_no_bwd(&u, &SiluMul)?;
        let out = sum_f32(&[&r, &l[DOWN].forward(&h)?])?;
        Ok((
            out,
            Stash {
                n1,
                q,
                k,
                v,
                y,
                r,
                n2,
                g,
                u,
                h,
            },
        ))
    }

    /// `x`'s gradient when `need_dx`, and each trained layer's `(dA, dB)` when `need_factors`.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        dout: &Tensor,
        need_dx: bool,
        need_factors: bool,
    ) -> Result<(Option<Tensor>, Vec<Option<(Tensor, Tensor)>>)> {
        let (b, s, d) = self.dims;
        let m = b * s;
        let l = &self.layers;
        let st = match lock(&self.stash)?.take() {
            Some(st) => st,
            // recomputing, or a second backward over the same graph
            None => self.run(x)?.1,
        };
        let mut grads: Vec<Option<(Tensor, Tensor)>> = (0..l.len()).map(|_| None).collect();
        let nf = need_factors;
        let dout = dout.reshape((m, d))?.contiguous()?;
        // the MLP: dh, then dg and du, then dn2 from both projections
        let (dh, gd) = l[DOWN].backward(&st.h, &dout, true, nf)?;
        grads[DOWN] = gd;
        let (dg, du) = SiluMul.bwd(&st.g, &st.u, &st.h, &need(dh)?)?;
        let (dn2, gg) = l[GATE].backward(&st.n2, &need(dg)?, true, nf)?;
        let (dn2u, gu) = l[UP].backward(&st.n2, &need(du)?, true, nf)?;
        (grads[GATE], grads[UP]) = (gg, gu);
        let dn2 = sum_f32(&[&need(dn2)?, &need(dn2u)?])?;
        // dr = dout + the MLP norm's input gradient
        let mut dr = dout.flatten_all()?.to_vec1::<f32>()?;
        with_f32(&st.r, "block node (r)", |r| {
            with_f32(&self.norms[1], "block node (norm)", |w| {
                with_f32(&dn2, "block node (dn2)", |dn2| {
                    rms_norm_dx(&mut dr, r, w, dn2, self.eps, true);
                    Ok(())
                })
            })
        })?;
        let dr = Tensor::from_vec(dr, (m, d), x.device())?;
        // attention: dy, then dq, dk, dv, then dn1 from the three projections
        let (dy, go) = l[O].backward(&st.y, &dr, true, nf)?;
        grads[O] = go;
        let bsd = |t: &Tensor| t.reshape((b, s, ()));
        let (dq, dk, dv) = self.attn.bwd(
            &bsd(&st.q)?,
            &bsd(&st.k)?,
            &bsd(&st.v)?,
            &bsd(&st.y)?,
            &bsd(&need(dy)?)?,
        )?;
        let rows = |t: Option<Tensor>| need(t)?.reshape((m, ()));
        // the first block's input (embeddings, constant patches) needs no gradient, nor do
        // its q/k/v inputs then
        let (dn1, gq) = l[Q].backward(&st.n1, &rows(dq)?, need_dx, nf)?;
        let (dn1k, gk) = l[K].backward(&st.n1, &rows(dk)?, need_dx, nf)?;
        let (dn1v, gv) = l[V].backward(&st.n1, &rows(dv)?, need_dx, nf)?;
        (grads[Q], grads[K], grads[V]) = (gq, gk, gv);
        if !need_dx {
            return Ok((None, grads));
        }
        let dn1 = sum_f32(&[&need(dn1)?, &need(dn1k)?, &need(dn1v)?])?;
        // dx = dr + the attention norm's input gradient
        let mut dx = dr.flatten_all()?.to_vec1::<f32>()?;
        with_f32(x, "block node (x)", |xv| {
            with_f32(&self.norms[0], "block node (norm)", |w| {
                with_f32(&dn1, "block node (dn1)", |dn1| {
                    rms_norm_dx(&mut dx, xv, w, dn1, self.eps, true);
                    Ok(())
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), grads))
    }
}

/// A gradient the backward asked for.
fn need(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("block node: an op returned no gradient".into()))
}

impl CustomOp2 for BlockNode {
    fn name(&self) -> &'static str {
        "block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, d) = self.dims;
        if xl.shape().dims() != [b, s, d] {
            candle_core::bail!("block node: input {:?}, not [{b}, {s}, {d}]", xl.shape());
        }
        let Some(out) = lock(&self.out)?.take() else {
            candle_core::bail!("block node: the forward ran twice");
        };
        let v = out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(v), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        let need_factors = token.track_op() && !self.trained.is_empty();
        if !need_dx && !need_factors {
            return Ok((None, None));
        }
        let (dx, grads) = self.backward(x, dout, need_dx, need_factors)?;
        if !need_factors {
            return Ok((dx, None));
        }
        let mut parts = Vec::with_capacity(2 * self.trained.len());
        for &i in &self.trained {
            let (da, db) = grads[i]
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("block node: no adapter gradient".into()))?;
            parts.push(da.flatten_all()?);
            parts.push(db.flatten_all()?);
        }
        Ok((dx, Some(Tensor::cat(&parts, 0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::lora::{Adapter, LoraConfig};
    use crate::model::testing::{rel_diff, t};
    use crate::model::weights::SafetensorsWeights;
    use crate::model::{Dropout, Model};
    use candle_core::{Device, Var};
    use std::path::Path;

    /// A fixture of `../shared/reference/arch` with an adapter on every projection (B non-zero,
    /// dropout 0.25).
    fn adapted(family: &str) -> (Model, Adapter) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/reference/arch")
            .join(family);
        let cfg = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
        let mut src = SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
        let mut m = Model::load(cfg, &mut src, DType::F32, &Device::Cpu).unwrap();
        let lcfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.25,
            ..LoraConfig::paper_decoder()
        };
        let ad = Adapter::new(&m, lcfg, 5).unwrap();
        for (i, w) in ad.layers.values().enumerate() {
            w.b.set(&t(w.b.dims(), i as f32).affine(0.05, 0.0).unwrap())
                .unwrap();
        }
        ad.attach(&mut m).unwrap();
        (m, ad)
    }

    fn ctx(m: &Model, pads: &[usize], s: usize) -> Ctx {
        Ctx {
            rope: m.rope_tables(pads, 0, s).unwrap(),
            mask: None,
            mask_sliding: None,
            pads: pads.to_vec(),
            offset: 0,
            differentiable: true,
            track: true,
            eps: m.cfg.rms_norm_eps,
            dropout: Some(Dropout { seed: 11 }),
        }
    }

    /// Block 1 as one node, kept or recomputed, against the same block as a composition of its
    /// ops' nodes (`Block::forward`, whose ops are each tested against candle's composition in
    /// f64): the output, the input's gradient and every adapter factor's gradient, through a
    /// plain `loss.backward()`. Qwen2 has q/k/v biases, Mistral a sliding window (8, shorter
    /// than the rows); both have grouped-query attention; one row is left-padded.
    #[test]
    fn the_block_node_equals_the_composition_of_its_ops() {
        for family in ["qwen2", "mistral"] {
            let (m, ad) = adapted(family);
            let (pads, s, d) = (vec![0, 3], 13, m.cfg.hidden_size);
            let c = ctx(&m, &pads, s);
            let x = Var::from_tensor(&t(&[2, s, d], 1.0)).unwrap();
            let w = t(&[2, s, d], 2.0);
            let run = |how: &str| {
                let blk = &m.blocks[1];
                let y = match how {
                    "composition" => blk.forward(1, x.as_tensor(), &c, None, &mut |_, t| Ok(t)),
                    _ => block_node(blk, x.as_tensor(), &c, how == "recomputed")
                        .map(|y| y.expect("a node")),
                }
                .unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![("y".to_string(), y.clone())];
                out.push(("dx".into(), g.get(x.as_tensor()).unwrap().clone()));
                for (name, v) in ad.named_vars() {
                    if name.contains("layers.1.") {
                        out.push((name, g.get(v.as_tensor()).expect("a gradient").clone()));
                    }
                }
                out
            };
            let want = run("composition");
            assert_eq!(
                want.len(),
                2 + 14,
                "{family}: every factor of block 1 has a gradient"
            );
            for how in ["kept", "recomputed"] {
                let got = run(how);
                for ((name, a), (_, b)) in got.iter().zip(&want) {
                    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let r = rel_diff(&f64(a), &f64(b));
                    assert!(r < 1e-5, "{family}, {how}: {name} differs by {r}");
                }
            }
        }
    }

    /// A block the node does not take (here: not differentiated) is left to the composition.
    #[test]
    fn inference_is_not_a_node() {
        let (m, _) = adapted("llama3");
        let mut c = ctx(&m, &[0], 4);
        c.differentiable = false;
        let x = t(&[1, 4, m.cfg.hidden_size], 1.0);
        assert!(block_node(&m.blocks[0], &x, &c, false).unwrap().is_none());
    }
}
