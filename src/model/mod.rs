//! Our own hookable Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) in candle.
//!
//! A block reads like the math, with TransformerLens hook points at every site:
//!
//! ```text
//! resid_pre = x                                   // blocks.{i}.hook_resid_pre
//! attn_out  = attn(rms_norm(resid_pre))           // blocks.{i}.hook_attn_out
//! resid_mid = resid_pre + attn_out                // blocks.{i}.hook_resid_mid
//! mlp_out   = mlp(rms_norm(resid_mid))            // blocks.{i}.hook_mlp_out
//! resid_post = resid_mid + mlp_out                // blocks.{i}.hook_resid_post
//! ```
//!
//! Batches are left-padded; every row gets explicit position ids (`0..len` over its own tokens)
//! and an attention mask that hides its pads, so a padded row computes what it would alone.

pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod names;
pub mod ops;
pub mod packed;
pub mod weights;

use crate::config::LlamaConfig;
use crate::hooks::{HookCtx, HookPoint, Hooks, Site};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
pub use kv_cache::KvCache;
pub use linear::{Dropout, Linear, LoraWeights};
pub use names::{LinearId, Proj, Target};
use weights::{optional, require, WeightSource};

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
    n_heads: usize,
    n_kv: usize,
    hd: usize,
}

#[derive(Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
}

/// A Llama-family model with hook points.
#[derive(Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

/// Everything a block needs besides its input.
struct Ctx<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    /// Left padding of each row and the chunk's offset in the padded sequence (what `mask`
    /// encodes).
    pads: &'a [usize],
    offset: usize,
    differentiable: bool,
    eps: f64,
    dropout: Option<Dropout>,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.hd);
        // [b, s, heads*hd] -> [b, heads, s, hd], RoPE on queries and keys
        let rope = Some((ctx.cos, ctx.sin));
        let q = ops::split_heads(&self.q.forward(x)?, nh, rope, ctx.differentiable)?;
        let k = ops::split_heads(&self.k.forward(x)?, nkv, rope, ctx.differentiable)?;
        let v = ops::split_heads(&self.v.forward(x)?, nkv, None, ctx.differentiable)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, k, v)?,
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        let rep = nh / nkv;
        // Grouped-query attention without copying K/V: fold the query heads that share a KV
        // head into the sequence axis. [b, nkv, rep*s, hd] @ [b, nkv, hd, kv] -> [b, nkv, rep*s, kv]
        let qg = q.reshape((b, nkv, rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = qg.matmul(&k.t()?)?;
        // scores and softmax in f32 (f64 when the model is f64, for gradient checks)
        let sdt = if v.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let att = att.to_dtype(sdt)?.reshape((b, nh, s, kv_len))?;
        let att = ops::attention_probs(
            &att,
            scale,
            ctx.mask,
            ctx.pads,
            ctx.offset,
            ctx.differentiable,
        )?
        .to_dtype(v.dtype())?;
        let y = att.reshape((b, nkv, rep * s, kv_len))?.matmul(&v)?; // [b, nkv, rep*s, hd]
        let y = y
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        Ok(self.o.forward_t(&y, ctx.dropout)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, dropout: Option<Dropout>) -> Result<Tensor> {
        let g = self.gate.forward_t(x, dropout)?;
        let u = self.up.forward_t(x, dropout)?;
        Ok(self.down.forward_t(&ops::silu_mul(&g, &u)?, dropout)?)
    }
}

impl Llama {
    /// Build the model from a weight source, checking every tensor's shape against `cfg`.
    pub fn load(
        cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let ff = cfg.intermediate_size;
        let embed = require(
            src,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, d],
            dtype,
            device,
        )?;
        let lin = |src: &mut dyn WeightSource,
                   name: &str,
                   out: usize,
                   inp: usize,
                   bias: bool|
         -> Result<Linear> {
            let w = require(src, &format!("{name}.weight"), &[out, inp], dtype, device)?;
            let b = if bias {
                optional(src, &format!("{name}.bias"), &[out], dtype, device)?
            } else {
                None
            };
            Ok(Linear::new_packed(w, b)?.with_uid(name))
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            crate::interrupt::check()?;
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            let name = |proj| LinearId::Block(i, proj).hf_name();
            let attn = Attention {
                q: lin(src, &name(Proj::Q), nh * hd, d, bias)?,
                k: lin(src, &name(Proj::K), nkv * hd, d, bias)?,
                v: lin(src, &name(Proj::V), nkv * hd, d, bias)?,
                o: lin(src, &name(Proj::O), d, nh * hd, false)?,
                n_heads: nh,
                n_kv: nkv,
                hd,
            };
            let mlp = Mlp {
                gate: lin(src, &name(Proj::Gate), ff, d, false)?,
                up: lin(src, &name(Proj::Up), ff, d, false)?,
                down: lin(src, &name(Proj::Down), d, ff, false)?,
            };
            let attn_norm = require(
                src,
                &format!("{p}.input_layernorm.weight"),
                &[d],
                dtype,
                device,
            )?;
            let mlp_norm = require(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                &[d],
                dtype,
                device,
            )?;
            blocks.push(Block {
                attn_norm,
                attn,
                mlp_norm,
                mlp,
            });
        }
        let final_norm = require(src, "model.norm.weight", &[d], dtype, device)?;
        let lm_head = match optional(src, "lm_head.weight", &[cfg.vocab_size, d], dtype, device)? {
            Some(w) => Linear::new(w, None),
            None => Linear::new(embed.clone(), None),
        }
        .with_uid(&LinearId::LmHead.hf_name());
        let inv_freq = cfg.rope_inv_freq();
        Ok(Llama {
            cfg,
            embed,
            blocks,
            final_norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
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
            "model.embed_tokens.weight" => return Some(self.embed.clone()),
            "model.norm.weight" => return Some(self.final_norm.clone()),
            _ => {}
        }
        let (module, kind) = name.rsplit_once('.')?;
        if let Some(rest) = module.strip_prefix("model.layers.") {
            let (i, m) = rest.split_once('.')?;
            let b = self.blocks.get(i.parse::<usize>().ok()?)?;
            match (m, kind) {
                ("input_layernorm", "weight") => return Some(b.attn_norm.clone()),
                ("post_attention_layernorm", "weight") => return Some(b.mlp_norm.clone()),
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

    /// RoPE cos/sin `[batch, seq, hd/2]` for each row's own positions.
    fn rope_tables(&self, pads: &[usize], offset: usize, s: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let b = pads.len();
        let mut cos = Vec::with_capacity(b * s * half);
        let mut sin = Vec::with_capacity(b * s * half);
        for &pad in pads {
            for j in 0..s {
                let pos = (offset + j).saturating_sub(pad) as f32;
                for &f in &self.inv_freq {
                    let a = pos * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, s, half), &self.device)?;
        let sin = Tensor::from_vec(sin, (b, s, half), &self.device)?;
        Ok((cos, sin))
    }

    /// Additive attention mask `[batch, 1, s, offset + s]`: causal, pads hidden. A pad query
    /// sees itself so that its softmax stays finite. `None` when nothing is masked.
    fn mask(&self, pads: &[usize], offset: usize, s: usize) -> Result<Option<Tensor>> {
        let kv = offset + s;
        if s == 1 && pads.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let b = pads.len();
        let mut m = vec![0f32; b * s * kv];
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..s {
                let qpos = offset + i;
                for j in 0..kv {
                    let hidden = j > qpos || (j < pad && j != qpos);
                    if hidden {
                        m[(r * s + i) * kv + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, s, kv), &self.device)?))
    }

    /// Embed token ids `[batch, seq]` -> `[batch, seq, d]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, s, self.cfg.hidden_size))?)
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
        crate::threads::install(|| self.forward_embeds_here(x, input, cache, hooks))
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
        let (cos, sin) = self.rope_tables(&input.pads, offset, s)?;
        let mask = self.mask(&input.pads, offset, s)?;
        let ctx = Ctx {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            pads: &input.pads,
            offset,
            differentiable: input.differentiable,
            eps: self.cfg.rms_norm_eps,
            dropout: input.dropout,
        };
        let mut hook = |p: HookPoint, t: Tensor| -> Result<Tensor> {
            match hooks.as_deref_mut() {
                Some(h) => h.apply(p, t, &hctx),
                None => Ok(t),
            }
        };
        let mut x = hook(HookPoint::Embed, x)?;
        let last = input
            .stop_after_layer
            .unwrap_or(self.blocks.len() - 1)
            .min(self.blocks.len() - 1);
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            let resid_pre = hook(HookPoint::Block(i, Site::ResidPre), x)?;
            let h = ops::rms_norm(&resid_pre, &blk.attn_norm, ctx.eps, ctx.differentiable)?;
            let c = cache.as_deref_mut().map(|c| (c, i));
            let attn_out = hook(
                HookPoint::Block(i, Site::AttnOut),
                blk.attn.forward(&h, &ctx, c)?,
            )?;
            let resid_mid = hook(
                HookPoint::Block(i, Site::ResidMid),
                (&resid_pre + attn_out)?,
            )?;
            let h = ops::rms_norm(&resid_mid, &blk.mlp_norm, ctx.eps, ctx.differentiable)?;
            let mlp_out = hook(
                HookPoint::Block(i, Site::MlpOut),
                blk.mlp.forward(&h, ctx.dropout)?,
            )?;
            x = hook(HookPoint::Block(i, Site::ResidPost), (resid_mid + mlp_out)?)?;
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
        let h = hook(HookPoint::FinalNorm, h)?;
        let logits = match &input.logits {
            Logits::None => None,
            Logits::All => Some(self.lm_head.forward(&h)?),
            Logits::Last => {
                let last = h.narrow(1, s - 1, 1)?;
                Some(self.lm_head.forward(&last)?.squeeze(1)?)
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
                Some(self.lm_head.forward(&sel)?)
            }
        };
        let logits = match logits {
            Some(l) if matches!(l.dtype(), DType::BF16 | DType::F16) => {
                Some(l.to_dtype(DType::F32)?)
            }
            l => l,
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
