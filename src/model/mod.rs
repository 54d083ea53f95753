//! Our own hookable transformer for every supported family (Llama 2/3, SmolLM, Mistral, Qwen2/3,
//! Gemma 2/3, Phi-3; see [`crate::config`]) in candle.
//!
//! A block reads like the math, with TransformerLens hook points at every site:
//!
//! ```text
//! x          = embed(ids) [* sqrt(d)]                        // hook_embed
//! resid_pre  = x                                             // blocks.{i}.hook_resid_pre
//! attn_out   = [post_norm](attn(rms_norm(resid_pre)))        // blocks.{i}.hook_attn_out
//! resid_mid  = resid_pre + attn_out                          // blocks.{i}.hook_resid_mid
//! mlp_out    = [post_norm](mlp(rms_norm(resid_mid)))         // blocks.{i}.hook_mlp_out
//! resid_post = resid_mid + mlp_out                           // blocks.{i}.hook_resid_post
//! ```
//!
//! The bracketed parts are family options ([`ModelConfig`]): Gemma scales the embeddings and
//! norms each sublayer's output before it joins the residual, so every hook keeps its meaning
//! (what is added to the residual stream, and the stream itself) in every family. Inside
//! attention, queries and keys may be RMS-normed per head (Qwen3, Gemma 3), scores soft-capped
//! (Gemma 2), and a layer may see only a sliding window of keys (Mistral, Gemma).
//!
//! Batches are left-padded; every row gets explicit position ids (`0..len` over its own tokens)
//! and an attention mask that hides its pads, so a padded row computes what it would alone.

mod attention;
mod block_node;
mod gemm;
pub mod huge_buf;
pub mod isa;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
mod lora_linear;
pub mod names;
mod nll;
pub mod ops;
pub mod packed;
pub mod qgemv;
pub mod quant;
pub mod recompute;
#[cfg(test)]
mod testing;
mod thin;
mod transpose;
pub mod weights;

use crate::config::{Activation, LayerType, ModelConfig, RopeScaling};
use crate::hooks::{HookCtx, HookPoint, Hooks, Site};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
pub use kv_cache::KvCache;
pub use linear::{Dropout, Linear, LoraWeights};
pub use names::{LinearId, Proj, Target};
pub use nll::token_nll;
use quant::WeightFormat;
use std::sync::Arc;
use weights::{optional, optional_linear, require, require_linear, LinearWeight, WeightSource};

/// Which logits a forward returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logits {
    /// `[batch, seq, vocab]`
    All,
    /// `[batch, vocab]`, the last column.
    Last,
    /// No unembedding at all (e.g. only hooks are wanted).
    None,
    /// Only at these columns of each row (of this chunk, padded indices): `[n_total, vocab]`,
    /// rows in order. Saves the unembedding of positions without labels in training.
    At(Vec<Vec<usize>>),
}

/// One forward's input: token ids of a left-padded batch and the options of the pass.
#[derive(Clone, Debug)]
pub struct Input {
    /// `[batch, seq]` u32 token ids of this chunk.
    pub ids: Tensor,
    /// Left padding of each row (over the whole sequence, not only this chunk).
    pub pads: Vec<usize>,
    /// Tokens of the padded sequence already in the KV cache before this chunk.
    pub offset: usize,
    pub logits: Logits,
    /// Use differentiable ops (training); fused kernels otherwise.
    pub differentiable: bool,
    /// Stop after this block (no final norm, no logits): for reading a middle layer.
    pub stop_after_layer: Option<usize>,
    /// LoRA dropout (training): masks derived from this seed, per layer.
    pub dropout: Option<Dropout>,
    /// In a differentiable forward without a KV cache, keep only each block's input for the
    /// backward pass and run the block again there ([`recompute`]): one block's intermediates
    /// alive at a time instead of all of them, for one more block forward each. The backward
    /// must then be [`recompute::backward`] (blocks trained on the CPU in f32 are single nodes,
    /// `block_node`, which a plain `backward` also handles). Blocks with hooks inside them are
    /// kept whole.
    pub recompute: bool,
}

impl Input {
    /// Left-pad `rows` with `pad_id` into one batch.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() || rows.iter().any(|r| r.is_empty()) {
            return Err(Error::invalid("cannot run the model on an empty sequence"));
        }
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(rows.len() * len);
        let mut pads = Vec::with_capacity(rows.len());
        for r in rows {
            let pad = len - r.len();
            pads.push(pad);
            flat.extend(std::iter::repeat_n(pad_id, pad));
            flat.extend_from_slice(r);
        }
        let ids = Tensor::from_vec(flat, (rows.len(), len), device)?;
        Ok(Input {
            ids,
            pads,
            offset: 0,
            logits: Logits::Last,
            differentiable: false,
            stop_after_layer: None,
            dropout: None,
            recompute: false,
        })
    }

    pub fn with_logits(mut self, l: Logits) -> Self {
        self.logits = l;
        self
    }
}

/// Output of a forward.
pub struct Output {
    /// Per [`Logits`]; `None` when no logits were asked for or the pass stopped early.
    pub logits: Option<Tensor>,
    /// The residual stream after the last block run, `[batch, seq, d]`.
    pub hidden: Tensor,
}

#[derive(Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3), `[hd]`.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    /// Multiplier of `q . k`.
    scale: f64,
    /// Gemma 2's `cap * tanh(scores / cap)`.
    softcap: Option<f64>,
    /// Sliding-window layer: each query sees its last `window` keys (itself included).
    window: Option<usize>,
    /// Which RoPE table (0 = global, 1 = local).
    rope: usize,
}

#[derive(Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

#[derive(Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    /// Gemma's norm of the attention output before it joins the residual.
    post_attn_norm: Option<Tensor>,
    mlp_norm: Tensor,
    mlp: Mlp,
    /// Gemma's norm of the MLP output before it joins the residual.
    post_mlp_norm: Option<Tensor>,
}

impl Block {
    /// `resid_pre -> resid_post` of block `i`, each inner site through `hook`.
    fn forward(
        &self,
        i: usize,
        resid_pre: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut KvCache>,
        hook: &mut dyn FnMut(HookPoint, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(resid_pre, &self.attn_norm, ctx.eps, ctx.differentiable)?;
        let a = self.attn.forward(&h, ctx, cache.map(|c| (c, i)))?;
        let a = match &self.post_attn_norm {
            Some(w) => ops::rms_norm(&a, w, ctx.eps, ctx.differentiable)?,
            None => a,
        };
        let attn_out = hook(HookPoint::Block(i, Site::AttnOut), a)?;
        let resid_mid = hook(HookPoint::Block(i, Site::ResidMid), (resid_pre + attn_out)?)?;
        let h = ops::rms_norm(&resid_mid, &self.mlp_norm, ctx.eps, ctx.differentiable)?;
        let m = self.mlp.forward(&h, ctx.dropout, ctx.track)?;
        let m = match &self.post_mlp_norm {
            Some(w) => ops::rms_norm(&m, w, ctx.eps, ctx.differentiable)?,
            None => m,
        };
        let mlp_out = hook(HookPoint::Block(i, Site::MlpOut), m)?;
        Ok((resid_mid + mlp_out)?)
    }

    /// The trainable variables of the block (its adapters' factors).
    fn lora_vars(&self) -> Vec<candle_core::Var> {
        let a = &self.attn;
        let m = &self.mlp;
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
            .into_iter()
            .filter_map(|l| l.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// Block `i` as a recomputed segment (no hooks inside, no cache). `ctxs`: the forward's
    /// context, tracking the adapters, and the same without tracking (for the first run).
    fn recomputed(&self, i: usize, x: &Tensor, ctxs: &(Arc<Ctx>, Arc<Ctx>)) -> Result<Tensor> {
        let (blk, (tracked, untracked)) = (self.clone(), ctxs.clone());
        let f: recompute::SegmentFn = Arc::new(move |x: &Tensor, track: bool| {
            let ctx = if track { &tracked } else { &untracked };
            blk.forward(i, x, ctx, None, &mut |_, t| Ok(t))
                .map_err(|e| match e {
                    Error::Candle(e) => e,
                    e => candle_core::Error::Msg(e.to_string()),
                })
        });
        Ok(recompute::segment(x, &self.lora_vars(), f)?)
    }
}

/// The embedding table `[vocab, d]`: a float tensor, or blocks of a GGUF type whose rows are
/// dequantized as they are looked up (no f32 copy of the table).
#[derive(Clone)]
enum EmbedTable {
    Dense(Tensor),
    Quant(quant::QuantWeight),
}

/// The hookable transformer: one model for every family, the family's differences being
/// options of [`ModelConfig`].
#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    embed: EmbedTable,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    /// Inverse RoPE frequencies: the global table and, where the family has one, the local.
    inv_freq: Vec<Vec<f32>>,
    device: Device,
    dtype: DType,
    /// How the linear weights are kept (the `weights` load option).
    weights: WeightFormat,
}

/// Everything a block needs besides its input (cheap to clone: tensors are shared).
#[derive(Clone)]
struct Ctx {
    /// RoPE cos/sin `[b, s, hd/2]`, one pair per table.
    rope: Vec<(Tensor, Tensor)>,
    /// Additive masks `[b, 1, s, kv]`: full attention, and sliding window where used.
    mask: Option<Tensor>,
    mask_sliding: Option<Tensor>,
    /// Left padding of each row and the chunk's offset in the padded sequence (what `mask`
    /// encodes).
    pads: Vec<usize>,
    offset: usize,
    differentiable: bool,
    /// Track the adapters' factors for a backward pass (false: the same ops and values, no
    /// graph; a recomputed block's first run).
    track: bool,
    eps: f64,
    dropout: Option<Dropout>,
}

impl Attention {
    /// This layer's attention as one training node (see `attention`), RoPE inside.
    fn causal_node(&self, ctx: &Ctx) -> Result<attention::CausalAttention> {
        let (cos, sin) = &ctx.rope[self.rope];
        Ok(attention::CausalAttention {
            heads: self.n_heads,
            kv_heads: self.n_kv,
            scale: self.scale as f32,
            pads: ctx.pads.clone(),
            window: self.window,
            rope: Some((
                cos.to_dtype(DType::F32)?.contiguous()?,
                sin.to_dtype(DType::F32)?.contiguous()?,
            )),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.hd);
        let (cos, sin) = &ctx.rope[self.rope];
        let rope = Some((cos, sin));
        // [b, s, heads*hd], normed per head where the family does
        let head_norm = |t: Tensor, w: &Option<Tensor>, heads: usize| -> Result<Tensor> {
            match w {
                None => Ok(t),
                Some(w) => Ok(ops::rms_norm(
                    &t.reshape((b, s, heads, hd))?,
                    w,
                    ctx.eps,
                    ctx.differentiable,
                )?
                .reshape((b, s, heads * hd))?),
            }
        };
        // [b, s, heads*hd] each: q, k, v in one product where the weights allow
        let (q, k, v) = match Linear::forward_many([&self.q, &self.k, &self.v], x)? {
            Some([q, k, v]) => (q, k, v),
            None => (
                // each adapter draws its own dropout mask, as PEFT's per-module dropout does
                self.q.forward_t(x, ctx.dropout, ctx.track)?,
                self.k.forward_t(x, ctx.dropout, ctx.track)?,
                self.v.forward_t(x, ctx.dropout, ctx.track)?,
            ),
        };
        let q = head_norm(q, &self.q_norm, nh)?;
        let k = head_norm(k, &self.k_norm, nkv)?;
        // Training on the CPU: the head split, RoPE and attention as one node (see `attention`).
        let fused = cache.is_none()
            && ctx.differentiable
            && q.dtype() == DType::F32
            && ops::cpu_kernels(q.device())
            && self.softcap.is_none()
            && ctx.offset == 0
            && ctx.pads.len() == b;
        if fused {
            let y = q.contiguous()?.apply_op3(
                &k.contiguous()?,
                &v.contiguous()?,
                self.causal_node(ctx)?,
            )?; // [b, s, nh * hd]
            return Ok(self.o.forward_t(&y, ctx.dropout, ctx.track)?);
        }
        // [b, s, heads*hd] -> [b, heads, s, hd], RoPE on queries and keys
        let q = ops::split_heads(&q, nh, rope, ctx.differentiable)?;
        let k = ops::split_heads(&k, nkv, rope, ctx.differentiable)?;
        let v = ops::split_heads(&v, nkv, None, ctx.differentiable)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, k, v)?,
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        // Inference on the CPU: one pass per block of queries over the keys they see.
        if !ctx.differentiable
            && q.dtype() == DType::F32
            && ops::cpu_kernels(q.device())
            && self.softcap.is_none()
            && ctx.pads.len() == b
            && kv_len == ctx.offset + s
        {
            let y = ops::with_f32(&q, "attention", |qs| {
                ops::with_f32_heads(&k, "attention", |ks, kcap| {
                    ops::with_f32_heads(&v, "attention", |vs, vcap| {
                        Ok(attention::cached_attention(
                            (qs, ks, vs),
                            (b, nh, nkv, s, hd),
                            (kv_len, kcap, vcap),
                            self.scale as f32,
                            &ctx.pads,
                            ctx.offset,
                            self.window,
                        ))
                    })
                })
            })?;
            let y = Tensor::from_vec(y, (b, s, nh * hd), q.device())?;
            return Ok(self.o.forward_t(&y, ctx.dropout, ctx.track)?);
        }
        let rep = nh / nkv;
        // Grouped-query attention without copying K/V: fold the query heads that share a KV
        // head into the sequence axis. [b, nkv, rep*s, hd] @ [b, nkv, hd, kv] -> [b, nkv, rep*s, kv]
        let qg = q.reshape((b, nkv, rep * s, hd))?;
        let att = qg.matmul(&k.t()?)?;
        // scores and softmax in f32 (f64 when the model is f64, for gradient checks)
        let sdt = if v.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let att = att.to_dtype(sdt)?.reshape((b, nh, s, kv_len))?;
        let mask = match self.window {
            Some(_) => ctx.mask_sliding.as_ref(),
            None => ctx.mask.as_ref(),
        };
        let att = ops::attention_probs(
            &att,
            &ops::Scores {
                scale: self.scale,
                softcap: self.softcap,
                window: self.window,
            },
            mask,
            &ctx.pads,
            ctx.offset,
            ctx.differentiable,
        )?
        .to_dtype(v.dtype())?;
        let y = att.reshape((b, nkv, rep * s, kv_len))?.matmul(&v)?; // [b, nkv, rep*s, hd]
        let y = y
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        Ok(self.o.forward_t(&y, ctx.dropout, ctx.track)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, dropout: Option<Dropout>, grad: bool) -> Result<Tensor> {
        let (g, u) = match Linear::forward_many([&self.gate, &self.up], x)? {
            Some([g, u]) => (g, u),
            None => (
                self.gate.forward_t(x, dropout, grad)?,
                self.up.forward_t(x, dropout, grad)?,
            ),
        };
        let h = match self.act {
            Activation::Silu => ops::silu_mul(&g, &u)?,
            Activation::GeluTanh => (g.gelu()? * u)?,
            Activation::Gelu => (g.gelu_erf()? * u)?,
        };
        Ok(self.down.forward_t(&h, dropout, grad)?)
    }
}

/// `cap * tanh(x / cap)`.
fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((x / c)?.tanh()? * c)?,
        None => x.clone(),
    })
}

impl Model {
    /// Build the model from a weight source, checking every tensor's shape against `cfg`.
    pub fn load(
        cfg: ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(cfg, src, dtype, WeightFormat::F32, device)
    }

    /// [`Model::load`] with the linear weights kept as `weights` says (quantized formats run
    /// on the CPU with f32 activations; norms, biases and the embedding lookup stay `dtype`).
    pub fn load_with(
        mut cfg: ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        weights: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        if weights.is_quantized() && !device.is_cpu() {
            return Err(Error::invalid(format!(
                "weights: \"{}\" runs on the CPU only; load with device: \"cpu\"",
                weights.name()
            )));
        }
        if weights.is_quantized() && dtype != DType::F32 {
            return Err(Error::invalid(format!(
                "weights: \"{}\" takes f32 activations; drop dtype (or use weights: \"bf16\")",
                weights.name()
            )));
        }
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let ff = cfg.intermediate_size;
        let vd = [cfg.vocab_size, d];
        let embed = if weights.is_quantized() {
            // kept in its block type (or quantized to the asked one); rows are dequantized as
            // they are looked up
            match require_linear(
                src,
                "model.embed_tokens.weight",
                &vd,
                weights,
                dtype,
                device,
            )? {
                LinearWeight::Quant(q) => EmbedTable::Quant(q),
                LinearWeight::Dense(t) => EmbedTable::Dense(t),
            }
        } else {
            EmbedTable::Dense(require(
                src,
                "model.embed_tokens.weight",
                &vd,
                dtype,
                device,
            )?)
        };
        if let EmbedTable::Dense(t) = &embed {
            // read whole by a tied lm_head at every decoded token
            huge_buf::collapse_in_background(t);
        }
        // Gemma's (1 + w) norms: fold the 1 in, unless the file already did (GGUF).
        let fold = cfg.norm_unit_offset && !src.norms_include_unit_offset();
        let norm = |src: &mut dyn WeightSource, name: &str, n: usize| -> Result<Tensor> {
            let w = require(src, name, &[n], dtype, device)?;
            Ok(if fold { (w + 1.0)? } else { w })
        };
        let lin = |w: LinearWeight, b: Option<Tensor>, name: &str| -> Result<Linear> {
            Ok(w.into_linear(b)?.with_uid(name))
        };
        // A projection stored alone, or rows `[at, at + out)` of a fused one (Phi-3's
        // `qkv_proj` and `gate_up_proj`).
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            crate::interrupt::check()?;
            let p = format!("model.layers.{i}");
            let name = |proj| LinearId::Block(i, proj).hf_name();
            let bias = cfg.attention_bias;
            let qkv_rows = [nh * hd, nkv * hd, nkv * hd];
            let (q, k, v) = if src.has(&format!("{}.weight", name(Proj::Q))) {
                let one = |src: &mut dyn WeightSource, pr: Proj, out: usize| -> Result<Linear> {
                    let n = name(pr);
                    let w = require_linear(
                        src,
                        &format!("{n}.weight"),
                        &[out, d],
                        weights,
                        dtype,
                        device,
                    )?;
                    let b = if bias {
                        optional(src, &format!("{n}.bias"), &[out], dtype, device)?
                    } else {
                        None
                    };
                    lin(w, b, &n)
                };
                (
                    one(src, Proj::Q, qkv_rows[0])?,
                    one(src, Proj::K, qkv_rows[1])?,
                    one(src, Proj::V, qkv_rows[2])?,
                )
            } else {
                let total: usize = qkv_rows.iter().sum();
                let fused = format!("{p}.self_attn.qkv_proj");
                let w = require_linear(
                    src,
                    &format!("{fused}.weight"),
                    &[total, d],
                    weights,
                    dtype,
                    device,
                )?;
                let b = if bias {
                    optional(src, &format!("{fused}.bias"), &[total], dtype, device)?
                } else {
                    None
                };
                let mut at = 0;
                let mut parts = Vec::with_capacity(3);
                for (pr, rows) in [Proj::Q, Proj::K, Proj::V].into_iter().zip(qkv_rows) {
                    let wp = w.rows(at, rows)?;
                    let bp = match &b {
                        Some(b) => Some(b.narrow(0, at, rows)?.contiguous()?),
                        None => None,
                    };
                    parts.push(lin(wp, bp, &name(pr))?);
                    at += rows;
                }
                let v = parts.pop().expect("three parts");
                let k = parts.pop().expect("three parts");
                let q = parts.pop().expect("three parts");
                (q, k, v)
            };
            let plain = |src: &mut dyn WeightSource, pr: Proj, out: usize, inp: usize| {
                let n = name(pr);
                let w = require_linear(
                    src,
                    &format!("{n}.weight"),
                    &[out, inp],
                    weights,
                    dtype,
                    device,
                )?;
                lin(w, None, &n)
            };
            let (gate, up) = if src.has(&format!("{}.weight", name(Proj::Gate))) {
                (plain(src, Proj::Gate, ff, d)?, plain(src, Proj::Up, ff, d)?)
            } else {
                let fused = format!("{p}.mlp.gate_up_proj.weight");
                let w = require_linear(src, &fused, &[2 * ff, d], weights, dtype, device)?;
                (
                    lin(w.rows(0, ff)?, None, &name(Proj::Gate))?,
                    lin(w.rows(ff, ff)?, None, &name(Proj::Up))?,
                )
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(norm(src, &format!("{p}.self_attn.q_norm.weight"), hd)?),
                    Some(norm(src, &format!("{p}.self_attn.k_norm.weight"), hd)?),
                )
            } else {
                (None, None)
            };
            let window = cfg.window_for(i);
            let attn = Attention {
                q,
                k,
                v,
                o: plain(src, Proj::O, d, nh * hd)?,
                q_norm,
                k_norm,
                n_heads: nh,
                n_kv: nkv,
                hd,
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                window,
                rope: usize::from(window.is_some() && cfg.rope_local.is_some()),
            };
            let mlp = Mlp {
                gate,
                up,
                down: plain(src, Proj::Down, d, ff)?,
                act: cfg.activation,
            };
            let attn_norm = norm(src, &format!("{p}.input_layernorm.weight"), d)?;
            let (post_attn_norm, mlp_norm, post_mlp_norm) = if cfg.sandwich_norms {
                (
                    Some(norm(
                        src,
                        &format!("{p}.post_attention_layernorm.weight"),
                        d,
                    )?),
                    norm(src, &format!("{p}.pre_feedforward_layernorm.weight"), d)?,
                    Some(norm(
                        src,
                        &format!("{p}.post_feedforward_layernorm.weight"),
                        d,
                    )?),
                )
            } else {
                (
                    None,
                    norm(src, &format!("{p}.post_attention_layernorm.weight"), d)?,
                    None,
                )
            };
            blocks.push(Block {
                attn_norm,
                attn,
                post_attn_norm,
                mlp_norm,
                mlp,
                post_mlp_norm,
            });
        }
        let final_norm = norm(src, "model.norm.weight", d)?;
        let own_head = if weights.is_quantized() {
            optional_linear(src, "lm_head.weight", &vd, weights, dtype, device)?
        } else {
            optional(src, "lm_head.weight", &vd, dtype, device)?.map(LinearWeight::Dense)
        };
        // its own tensor, or the embedding table (shared, in whatever form it is kept)
        let lm_head = match own_head {
            Some(LinearWeight::Quant(q)) => Linear::new_quant(q, None),
            Some(LinearWeight::Dense(w)) => {
                huge_buf::collapse_in_background(&w);
                Linear::new(w, None)
            }
            None => match &embed {
                EmbedTable::Quant(q) => Linear::new_quant(q.clone(), None),
                EmbedTable::Dense(t) => Linear::new(t.clone(), None),
            },
        }
        .with_uid(&LinearId::LmHead.hf_name());
        // llama.cpp's Llama-3.1 frequency divisors live in a tensor.
        if let Some(RopeScaling::Factors(f)) = &mut cfg.rope.scaling {
            let t = require(src, "rope_freqs.weight", &[hd / 2], DType::F32, device)?;
            *f = t.to_vec1::<f32>()?;
        }
        let mut inv_freq = vec![cfg.rope_inv_freq()];
        if let Some(local) = &cfg.rope_local {
            inv_freq.push(local.inv_freq(hd));
        }
        Ok(Model {
            cfg,
            embed,
            blocks,
            final_norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            dtype,
            weights,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// How the linear weights are kept (the `weights` load option).
    pub fn weight_format(&self) -> WeightFormat {
        self.weights
    }

    /// Bytes held per storage kind (`"Q4_1"`, `"f32"`...): every linear layer, the embedding
    /// table (unless the lm_head shares it) and the norms.
    pub fn weight_bytes(&self) -> std::collections::BTreeMap<String, usize> {
        let mut by = std::collections::BTreeMap::new();
        let mut add = |k: String, b: usize| *by.entry(k).or_insert(0) += b;
        let dense = |t: &Tensor| {
            (
                format!("{:?}", t.dtype()).to_lowercase(),
                t.elem_count() * t.dtype().size_in_bytes(),
            )
        };
        for id in self.linear_ids() {
            if let Some(l) = self.linear_at(id) {
                let (k, b) = l.storage_kind();
                let shared = id == LinearId::LmHead
                    && match (&self.embed, l.quant()) {
                        (EmbedTable::Quant(e), Some(q)) => e.same(q),
                        (EmbedTable::Dense(e), None) => l.weight().is_ok_and(|w| w.id() == e.id()),
                        _ => false,
                    };
                if !shared {
                    add(k, b);
                }
                if let Some(bias) = &l.bias {
                    let (k, b) = dense(bias);
                    add(k, b);
                }
            }
        }
        let (k, b) = match &self.embed {
            EmbedTable::Dense(t) => dense(t),
            EmbedTable::Quant(q) => (quant::type_name(q.dtype()).to_string(), q.bytes()),
        };
        add(k, b);
        let mut norms = vec![&self.final_norm];
        for bl in &self.blocks {
            norms.extend([&bl.attn_norm, &bl.mlp_norm]);
            norms.extend(bl.post_attn_norm.iter().chain(&bl.post_mlp_norm));
            norms.extend(bl.attn.q_norm.iter().chain(&bl.attn.k_norm));
        }
        for n in norms {
            let (k, b) = dense(n);
            add(k, b);
        }
        by
    }

    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Every linear layer, in forward order (`lm_head` last).
    pub fn linear_ids(&self) -> Vec<LinearId> {
        let mut v: Vec<LinearId> = (0..self.blocks.len())
            .flat_map(|i| Proj::ALL.map(|p| LinearId::Block(i, p)))
            .collect();
        v.push(LinearId::LmHead);
        v
    }

    /// HF module names of every linear layer (`model.layers.0.self_attn.q_proj`, ...,
    /// `lm_head`), in forward order.
    pub fn linear_names(&self) -> Vec<String> {
        self.linear_ids()
            .into_iter()
            .map(LinearId::hf_name)
            .collect()
    }

    /// A linear layer, if the model has it.
    pub fn linear_at(&self, id: LinearId) -> Option<&Linear> {
        let (i, proj) = match id {
            LinearId::LmHead => return Some(&self.lm_head),
            LinearId::Block(i, p) => (i, p),
        };
        let b = self.blocks.get(i)?;
        Some(match proj {
            Proj::Q => &b.attn.q,
            Proj::K => &b.attn.k,
            Proj::V => &b.attn.v,
            Proj::O => &b.attn.o,
            Proj::Gate => &b.mlp.gate,
            Proj::Up => &b.mlp.up,
            Proj::Down => &b.mlp.down,
        })
    }

    /// Mutable access to a linear layer (to attach adapters).
    pub fn linear_at_mut(&mut self, id: LinearId) -> Option<&mut Linear> {
        let (i, proj) = match id {
            LinearId::LmHead => return Some(&mut self.lm_head),
            LinearId::Block(i, p) => (i, p),
        };
        let b = self.blocks.get_mut(i)?;
        Some(match proj {
            Proj::Q => &mut b.attn.q,
            Proj::K => &mut b.attn.k,
            Proj::V => &mut b.attn.v,
            Proj::O => &mut b.attn.o,
            Proj::Gate => &mut b.mlp.gate,
            Proj::Up => &mut b.mlp.up,
            Proj::Down => &mut b.mlp.down,
        })
    }

    /// The linear layer with this HF module name.
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        self.linear_at(LinearId::parse(name)?)
    }

    /// Mutable access to a linear layer by HF module name.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.linear_at_mut(LinearId::parse(name)?)
    }

    /// Named weights in HF layout (`model.layers.0.self_attn.q_proj.weight`...), for checksums.
    pub fn weight(&self, name: &str) -> Option<Tensor> {
        match name {
            "model.embed_tokens.weight" => {
                return match &self.embed {
                    EmbedTable::Dense(t) => Some(t.clone()),
                    EmbedTable::Quant(q) => q.dequantize().ok(),
                }
            }
            "model.norm.weight" => return Some(self.final_norm.clone()),
            _ => {}
        }
        let (module, kind) = name.rsplit_once('.')?;
        if let Some(rest) = module.strip_prefix("model.layers.") {
            let (i, m) = rest.split_once('.')?;
            let b = self.blocks.get(i.parse::<usize>().ok()?)?;
            let sandwich = b.post_attn_norm.is_some();
            match (m, kind) {
                ("input_layernorm", "weight") => return Some(b.attn_norm.clone()),
                ("post_attention_layernorm", "weight") if sandwich => {
                    return b.post_attn_norm.clone()
                }
                ("post_attention_layernorm", "weight") => return Some(b.mlp_norm.clone()),
                ("pre_feedforward_layernorm", "weight") if sandwich => {
                    return Some(b.mlp_norm.clone())
                }
                ("post_feedforward_layernorm", "weight") => return b.post_mlp_norm.clone(),
                ("self_attn.q_norm", "weight") => return b.attn.q_norm.clone(),
                ("self_attn.k_norm", "weight") => return b.attn.k_norm.clone(),
                _ => {}
            }
        }
        let lin = self.linear(module)?;
        match kind {
            "weight" => lin.weight().ok(),
            "bias" => lin.bias.clone(),
            _ => None,
        }
    }

    /// RoPE cos/sin `[batch, seq, hd/2]` for each row's own positions, one pair per table.
    fn rope_tables(
        &self,
        pads: &[usize],
        offset: usize,
        s: usize,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let b = pads.len();
        let mut out = Vec::with_capacity(self.inv_freq.len());
        for inv_freq in &self.inv_freq {
            let half = inv_freq.len();
            let mut cos = Vec::with_capacity(b * s * half);
            let mut sin = Vec::with_capacity(b * s * half);
            for &pad in pads {
                for j in 0..s {
                    let pos = (offset + j).saturating_sub(pad) as f32;
                    for &f in inv_freq {
                        let a = pos * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            out.push((
                Tensor::from_vec(cos, (b, s, half), &self.device)?,
                Tensor::from_vec(sin, (b, s, half), &self.device)?,
            ));
        }
        Ok(out)
    }

    /// Additive attention mask `[batch, 1, s, offset + s]`: causal, pads hidden, and with a
    /// `window` only the last `window` keys (the query's own included). A pad query sees
    /// itself so that its softmax stays finite. `None` when nothing is masked.
    fn mask(
        &self,
        pads: &[usize],
        offset: usize,
        s: usize,
        window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let kv = offset + s;
        let windowed = window.is_some_and(|w| w < kv);
        if s == 1 && pads.iter().all(|&p| p == 0) && !windowed {
            return Ok(None);
        }
        let b = pads.len();
        let mut m = vec![0f32; b * s * kv];
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..s {
                let qpos = offset + i;
                let lo = ops::first_key(pad, qpos, window);
                for j in 0..kv {
                    if j > qpos || j < lo {
                        m[(r * s + i) * kv + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, s, kv), &self.device)?))
    }

    /// Embed token ids `[batch, seq]` -> `[batch, seq, d]` (scaled by sqrt(d) in Gemma): the
    /// value of `hook_embed`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let x = match &self.embed {
            EmbedTable::Dense(t) => t.index_select(&flat, 0)?,
            // [b * s, d] f32, rows dequantized as gathered (an id out of range is an error)
            EmbedTable::Quant(q) => q.embedding(&flat.to_dtype(DType::U32)?.to_vec1::<u32>()?)?,
        }
        .reshape((b, s, self.cfg.hidden_size))?;
        Ok(match self.cfg.embed_scale {
            // transformers rounds the scale to the model's dtype first
            Some(c) => {
                x.broadcast_mul(&Tensor::new(c as f32, &self.device)?.to_dtype(x.dtype())?)?
            }
            None => x,
        })
    }

    /// Run the model on a chunk, with optional KV cache and hooks.
    pub fn forward(
        &self,
        input: &Input,
        cache: Option<&mut KvCache>,
        hooks: Option<&mut Hooks>,
    ) -> Result<Output> {
        let x = self.embed(&input.ids)?;
        self.forward_embeds(x, input, cache, hooks)
    }

    /// Run the model from embeddings `[batch, seq, d]` (the value of `hook_embed`).
    pub fn forward_embeds(
        &self,
        x: Tensor,
        input: &Input,
        cache: Option<&mut KvCache>,
        hooks: Option<&mut Hooks>,
    ) -> Result<Output> {
        crate::threads::hot(|| self.forward_embeds_here(x, input, cache, hooks))
    }

    fn forward_embeds_here(
        &self,
        x: Tensor,
        input: &Input,
        mut cache: Option<&mut KvCache>,
        mut hooks: Option<&mut Hooks>,
    ) -> Result<Output> {
        let (b, s, _) = x.dims3()?;
        if input.pads.len() != b {
            return Err(Error::invalid(format!(
                "{} pads given for a batch of {b}",
                input.pads.len()
            )));
        }
        let offset = input.offset;
        if let Some(c) = cache.as_deref() {
            if c.len() != offset {
                return Err(Error::invalid(format!(
                    "KV cache holds {} tokens but the input says offset {offset}",
                    c.len()
                )));
            }
        }
        let hctx = HookCtx {
            pads: input.pads.clone(),
            offset,
        };
        let rope = self.rope_tables(&input.pads, offset, s)?;
        // The fused attention derives its mask from the positions; other paths need tensors.
        let fused =
            !input.differentiable && self.dtype == DType::F32 && ops::cpu_kernels(&self.device);
        let (mask, mask_sliding) = if fused {
            (None, None)
        } else {
            let sliding = match self.cfg.sliding_window {
                Some(w) if self.cfg.layer_types.contains(&LayerType::Sliding) => {
                    self.mask(&input.pads, offset, s, Some(w))?
                }
                _ => None,
            };
            (self.mask(&input.pads, offset, s, None)?, sliding)
        };
        let ctx = Ctx {
            rope,
            mask,
            mask_sliding,
            pads: input.pads.clone(),
            offset,
            differentiable: input.differentiable,
            track: input.differentiable,
            eps: self.cfg.rms_norm_eps,
            dropout: input.dropout,
        };
        let recompute = input.recompute && input.differentiable && cache.is_none();
        // the contexts of recomputed blocks: tracking the adapters, and not (their first run)
        let ctxs = recompute.then(|| {
            let untracked = Ctx {
                track: false,
                ..ctx.clone()
            };
            (Arc::new(ctx.clone()), Arc::new(untracked))
        });
        let inner_hooked = |i: usize, hooks: &Option<&mut Hooks>| {
            hooks.as_deref().is_some_and(|h| {
                [Site::AttnOut, Site::ResidMid, Site::MlpOut]
                    .iter()
                    .any(|&site| h.touches(&HookPoint::Block(i, site)))
            })
        };
        let hook = |hooks: &mut Option<&mut Hooks>, p: HookPoint, t: Tensor| -> Result<Tensor> {
            match hooks.as_deref_mut() {
                Some(h) => h.apply(p, t, &hctx),
                None => Ok(t),
            }
        };
        let mut x = hook(&mut hooks, HookPoint::Embed, x)?;
        let last = input
            .stop_after_layer
            .unwrap_or(self.blocks.len() - 1)
            .min(self.blocks.len() - 1);
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            let resid_pre = hook(&mut hooks, HookPoint::Block(i, Site::ResidPre), x)?;
            // training on the CPU: the block as one node (see `block_node`)
            let node = match cache.is_none() && !inner_hooked(i, &hooks) {
                true => block_node::block_node(blk, &resid_pre, &ctx, recompute)?,
                false => None,
            };
            let resid_post = match (node, &ctxs) {
                (Some(y), _) => y,
                (None, Some(c)) if !inner_hooked(i, &hooks) => blk.recomputed(i, &resid_pre, c)?,
                _ => blk.forward(i, &resid_pre, &ctx, cache.as_deref_mut(), &mut |p, t| {
                    hook(&mut hooks, p, t)
                })?,
            };
            x = hook(&mut hooks, HookPoint::Block(i, Site::ResidPost), resid_post)?;
        }
        if input
            .stop_after_layer
            .is_some_and(|l| l + 1 < self.blocks.len())
        {
            return Ok(Output {
                logits: None,
                hidden: x,
            });
        }
        let h = ops::rms_norm(&x, &self.final_norm, ctx.eps, ctx.differentiable)?;
        let h = hook(&mut hooks, HookPoint::FinalNorm, h)?;
        let logits = match &input.logits {
            Logits::None => None,
            Logits::All => Some(
                self.lm_head
                    .forward_t(&h, ctx.dropout, ctx.differentiable)?,
            ),
            Logits::Last => {
                let last = h.narrow(1, s - 1, 1)?;
                Some(
                    self.lm_head
                        .forward_t(&last, None, ctx.differentiable)?
                        .squeeze(1)?,
                )
            }
            Logits::At(cols) => {
                if cols.len() != b {
                    return Err(Error::invalid(format!(
                        "Logits::At has {} rows for a batch of {b}",
                        cols.len()
                    )));
                }
                let mut flat = Vec::new();
                for (r, cs) in cols.iter().enumerate() {
                    for &c in cs {
                        if c >= s {
                            return Err(Error::invalid(format!(
                                "Logits::At column {c} is outside a chunk of {s}"
                            )));
                        }
                        flat.push((r * s + c) as u32);
                    }
                }
                let idx = Tensor::from_vec(
                    flat,
                    (cols.iter().map(|c| c.len()).sum::<usize>(),),
                    &self.device,
                )?;
                let d = h.dim(D::Minus1)?;
                let sel = h.reshape((b * s, d))?.index_select(&idx, 0)?;
                Some(
                    self.lm_head
                        .forward_t(&sel, ctx.dropout, ctx.differentiable)?,
                )
            }
        };
        let logits = match logits {
            Some(l) if matches!(l.dtype(), DType::BF16 | DType::F16) => {
                Some(l.to_dtype(DType::F32)?)
            }
            l => l,
        };
        let logits = match logits {
            Some(l) => Some(softcap(&l, self.cfg.final_softcap)?),
            None => None,
        };
        Ok(Output { logits, hidden: x })
    }
}

/// Log-softmax over the vocabulary in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}
