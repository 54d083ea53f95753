//! One typed configuration for every supported model family, parsed once from an HF
//! `config.json` (both the hub form with top-level `rope_theta`/`rope_scaling` and the
//! transformers-5 form with `rope_parameters`) or from GGUF metadata (llama.cpp's key names).
//!
//! There is one model ([`crate::model::Model`]); a family is only a set of options here:
//!
//! | family | options |
//! |---|---|
//! | Llama 2/3/3.1/3.2, SmolLM | RoPE scaling (`linear`, `llama3`) |
//! | Mistral | sliding-window attention on every layer |
//! | Qwen2/2.5 | q/k/v bias; sliding window on layers `>= max_window_layers` when enabled |
//! | Qwen3 | per-head q/k RMSNorm, explicit `head_dim` |
//! | Gemma 2 | embeddings scaled by sqrt(d), (1 + w) RMSNorm, norms before and after attention and MLP, GeGLU, attention and final logit soft-capping, `query_pre_attn_scalar`, sliding/full layers alternating |
//! | Gemma 3 (text) | Gemma 2's options without soft-capping, plus q/k norm, 5 sliding : 1 full layers, a separate RoPE base for sliding layers |
//! | Phi-3 | fused `qkv_proj` and `gate_up_proj` (split on load) |

use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value;
use std::path::Path;

/// A supported model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];

    /// The family of an HF `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The HF `model_type` (for Gemma 3 the text-only one).
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// The family of a GGUF `general.architecture` (llama.cpp's names; Mistral files say
    /// `llama`).
    pub fn from_gguf_arch(a: &str) -> Option<Family> {
        Some(match a {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// llama.cpp's architecture name.
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    /// Gemma's norm/MLP/embedding conventions.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Does llama.cpp's converter permute q/k rows for adjacent-pair RoPE in this family?
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral)
    }

    fn supported_model_types() -> String {
        "llama, mistral, qwen2, qwen3, gemma2, gemma3_text (gemma3), phi3".into()
    }

    fn supported_gguf_archs() -> String {
        "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3".into()
    }
}

/// RoPE frequency scaling, as HF's `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama-3.1 style piecewise scaling of the frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Linear position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// Per-frequency divisors as stored in a GGUF `rope_freqs.weight` (llama.cpp writes
    /// Llama-3.1's scaling this way).
    Factors(Vec<f32>),
}

/// One RoPE: base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Inverse frequencies `[head_dim / 2]`, with scaling applied.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let d = head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Factors(div)) => base
                .iter()
                .zip(div.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, &d)| f / d as f64)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// The MLP's gate activation: SwiGLU (`silu`) or GeGLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
    /// Exact (erf) GELU.
    Gelu,
}

/// How a layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Causal attention over the whole prefix, the global RoPE.
    Full,
    /// Causal attention over the last `sliding_window` keys (query included), the local RoPE
    /// where the family has one.
    Sliding,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// The `model_type` or GGUF architecture it was read from: informational.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE of full-attention layers (of every layer, for most families).
    pub rope: Rope,
    /// RoPE of sliding-window layers when it differs (Gemma 3's local base).
    pub rope_local: Option<Rope>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorms after attention and after the MLP, before each is added to the residual
    /// (Gemma 2/3: `post_attention_layernorm`, `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// RMSNorm weights are stored as `w` and applied as `(1 + w)` (Gemma). The loader folds the
    /// 1 in (GGUF files already hold `1 + w`).
    pub norm_unit_offset: bool,
    pub activation: Activation,
    /// Embeddings multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f64>,
    /// Multiplier of `q . k` (1/sqrt(head_dim), or Gemma's 1/sqrt(query_pre_attn_scalar)).
    pub attn_scale: f64,
    /// `cap * tanh(scores / cap)` before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap * tanh(logits / cap)` (Gemma 2).
    pub final_softcap: Option<f64>,
    pub sliding_window: Option<usize>,
    /// One per layer.
    pub layer_types: Vec<LayerType>,
}

/// Fields of an HF config object, each error naming the field.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    /// Present and not null.
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn has_key(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    fn usize(&self, k: &str) -> std::result::Result<Option<usize>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| format!("`{k}` must be a non-negative integer, found {v}")),
        }
    }
    fn need_usize(&self, k: &str, family: &str) -> std::result::Result<usize, String> {
        self.usize(k)?
            .ok_or_else(|| format!("missing field `{k}` (needed by the {family} family)"))
    }
    fn f64(&self, k: &str) -> std::result::Result<Option<f64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be a number, found {v}")),
        }
    }
    fn bool(&self, k: &str) -> std::result::Result<Option<bool>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be true or false, found {v}")),
        }
    }
    fn str(&self, k: &str) -> std::result::Result<Option<&str>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be a string, found {v}")),
        }
    }
    /// A number where `null` means "off" and absence means `default` (transformers' config
    /// class default).
    fn f64_or_off(
        &self,
        k: &str,
        default: Option<f64>,
    ) -> std::result::Result<Option<f64>, String> {
        if !self.has_key(k) {
            return Ok(default);
        }
        self.f64(k)
    }
}

/// The most layers a config may declare (the largest open models have about 128).
pub const MAX_LAYERS: usize = 1 << 12;
/// The largest size a config may declare for a dimension (widths, heads, vocabulary): a
/// weight of two such dimensions would be 2^48 elements, so the weights' budget check
/// (`crate::budget`) computes in range; anything real is far below.
pub const MAX_DIM: usize = 1 << 24;

impl ModelConfig {
    /// Parse an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_str(&text).map_err(|e| Error::bad_file(path, e))
    }

    /// Parse the text of an HF `config.json`.
    pub fn from_hf_str(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let top = v.as_object().ok_or("the config is not a JSON object")?;
        let model_type = Fields(top)
            .str("model_type")?
            .unwrap_or("llama")
            .to_string();
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            format!(
                "model_type `{model_type}` is not supported (supported: {})",
                Family::supported_model_types()
            )
        })?;
        // A multimodal Gemma 3 keeps its language model's config under `text_config`.
        let obj = match (model_type.as_str(), top.get("text_config")) {
            ("gemma3", Some(Value::Object(t))) => t,
            _ => top,
        };
        let f = Fields(obj);
        let fam = family.model_type();
        let hidden_size = f.need_usize("hidden_size", fam)?;
        let num_attention_heads = f.need_usize("num_attention_heads", fam)?;
        if num_attention_heads == 0 {
            return Err("num_attention_heads must be positive".into());
        }
        let head_dim = match f.usize("head_dim")? {
            Some(h) => h,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads \
                         {num_attention_heads} and there is no `head_dim`"
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_hidden_layers = f.need_usize("num_hidden_layers", fam)?;
        // checked before anything is sized by it (a per-layer list); `validate` checks the rest
        if num_hidden_layers > MAX_LAYERS {
            return Err(format!(
                "num_hidden_layers {num_hidden_layers} is out of range (1..={MAX_LAYERS})"
            ));
        }
        let gemma = family.is_gemma();
        let activation = match f
            .str("hidden_activation")?
            .or(f.str("hidden_act")?)
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" })
        {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(format!(
                    "hidden_act `{other}` is not supported (silu, gelu_pytorch_tanh, gelu)"
                ))
            }
        };
        if let Some(p) = f.f64("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(format!(
                    "partial_rotary_factor {p} is not supported (only 1.0)"
                ));
            }
        }
        let (rope, rope_local) = read_hf_rope(&f, family)?;
        let sliding_window = match family {
            Family::Llama => None,
            Family::Qwen2 | Family::Qwen3 if f.bool("use_sliding_window")? != Some(true) => None,
            _ => f.usize("sliding_window")?,
        };
        let layer_types = match f.get("layer_types") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(LayerType::Full),
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    _ => Err(format!(
                        "layer_types: `{t}` is not supported (full_attention, sliding_attention)"
                    )),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(other) => return Err(format!("`layer_types` must be an array, found {other}")),
            None => {
                let max_window_layers = f.usize("max_window_layers")?.unwrap_or(0);
                let pattern = f.usize("sliding_window_pattern")?.unwrap_or(6).max(1);
                (0..num_hidden_layers)
                    .map(|i| {
                        let sliding = sliding_window.is_some()
                            && match family {
                                Family::Gemma2 => i % 2 == 0,
                                Family::Gemma3 => (i + 1) % pattern != 0,
                                Family::Qwen2 | Family::Qwen3 => i >= max_window_layers,
                                _ => true,
                            };
                        if sliding {
                            LayerType::Sliding
                        } else {
                            LayerType::Full
                        }
                    })
                    .collect()
            }
        };
        if layer_types.len() != num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries for num_hidden_layers {num_hidden_layers}",
                layer_types.len()
            ));
        }
        let sliding_window = if layer_types.contains(&LayerType::Sliding) {
            Some(f.usize("sliding_window")?.ok_or_else(|| {
                "missing field `sliding_window` (layer_types has sliding layers)".to_string()
            })?)
        } else {
            sliding_window
        };
        let attn_scale = if gemma {
            let q = f.f64("query_pre_attn_scalar")?.unwrap_or(256.0);
            1.0 / q.sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let cfg = ModelConfig {
            family,
            architecture: model_type.clone(),
            vocab_size: f.need_usize("vocab_size", fam)?,
            hidden_size,
            intermediate_size: f.need_usize("intermediate_size", fam)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: f
                .usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            rope_local,
            max_position_embeddings: f.usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: match f.bool("tie_word_embeddings")? {
                Some(t) => t,
                // transformers' defaults: Gemma ties, the others do not.
                None => gemma || Fields(top).bool("tie_word_embeddings")?.unwrap_or(false),
            },
            attention_bias: f.bool("attention_bias")?.unwrap_or(family == Family::Qwen2),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sandwich_norms: gemma,
            norm_unit_offset: gemma,
            activation,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attn_scale,
            attn_softcap: match family {
                Family::Gemma2 => f.f64_or_off("attn_logit_softcapping", Some(50.0))?,
                Family::Gemma3 => f.f64_or_off("attn_logit_softcapping", None)?,
                _ => None,
            },
            final_softcap: match family {
                Family::Gemma2 => f.f64_or_off("final_logit_softcapping", Some(30.0))?,
                Family::Gemma3 => f.f64_or_off("final_logit_softcapping", None)?,
                _ => None,
            },
            sliding_window,
            layer_types,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read the config from GGUF metadata (llama.cpp's `{arch}.block_count`, ...).
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &ct.metadata;
        let bad = |m: String| Error::bad_file(path, m);
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| bad("missing GGUF metadata `general.architecture`".into()))?;
        let family = Family::from_gguf_arch(&arch).ok_or_else(|| {
            bad(format!(
                "GGUF architecture `{arch}` is not supported (supported: {})",
                Family::supported_gguf_archs()
            ))
        })?;
        let get_u = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            let v = md
                .get(&key)
                .ok_or_else(|| bad(format!("missing GGUF metadata `{key}`")))?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x as u64))
                .map(|x| x as usize)
                .map_err(|e| bad(format!("GGUF metadata `{key}`: {e}")))
        };
        let get_f = |k: &str| -> Option<f64> {
            md.get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
        };
        let hidden_size = get_u("embedding_length")?;
        let n_heads = get_u("attention.head_count")?;
        if n_heads == 0 {
            return Err(bad(format!(
                "GGUF metadata `{arch}.attention.head_count` is 0"
            )));
        }
        let n_kv = get_u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden_size / n_heads);
        let n_layers = get_u("block_count")?;
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| bad("cannot determine vocab size".into()))?,
        };
        let gemma = family.is_gemma();
        let scaling = match md
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => Some(RopeScaling::Linear {
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(bad(format!(
                    "GGUF `{arch}.rope.scaling.type` = `{other}` is not supported (none, linear)"
                )))
            }
        };
        // llama.cpp stores Llama-3.1's frequency scaling as a tensor of divisors.
        let scaling = match ct.tensor_infos.get("rope_freqs.weight") {
            Some(_) => Some(RopeScaling::Factors(Vec::new())), // filled by the loader
            None => scaling,
        };
        let theta = get_f("rope.freq_base").unwrap_or(10000.0);
        let rope = Rope { theta, scaling };
        let rope_local = (family == Family::Gemma3).then(|| Rope {
            theta: get_f("rope.freq_base_swa").unwrap_or(10000.0),
            scaling: None,
        });
        let sliding_window = get_u("attention.sliding_window").ok().filter(|&w| w > 0);
        if n_layers > MAX_LAYERS {
            return Err(Error::invalid(format!(
                "{arch}.block_count {n_layers} is out of range (at most {MAX_LAYERS})"
            )));
        }
        let layer_types = (0..n_layers)
            .map(|i| {
                let sliding = sliding_window.is_some()
                    && match family {
                        // llama.cpp's swa patterns: gemma2 2, gemma3 6 (or the stored one)
                        Family::Gemma2 => i % 2 == 0,
                        Family::Gemma3 => {
                            let p = get_u("attention.sliding_window_pattern")
                                .unwrap_or(6)
                                .max(1);
                            (i + 1) % p != 0
                        }
                        _ => true,
                    };
                if sliding {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect();
        // GGUF does not store query_pre_attn_scalar: llama.cpp uses hidden/heads for the 27B
        // Gemmas (46 and 62 layers) and head_dim otherwise, unless `attention.scale` is given.
        let attn_scale = match get_f("attention.scale") {
            Some(s) => s,
            None if gemma
                && matches!(
                    (family, n_layers),
                    (Family::Gemma2, 46) | (Family::Gemma3, 62)
                ) =>
            {
                1.0 / ((hidden_size / n_heads) as f64).sqrt()
            }
            None => 1.0 / (head_dim as f64).sqrt(),
        };
        let cfg = ModelConfig {
            family,
            architecture: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_hidden_layers: n_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope,
            rope_local,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias")
                || ct.tensor_infos.contains_key("blk.0.attn_qkv.bias"),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sandwich_norms: gemma,
            norm_unit_offset: gemma,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attn_scale,
            attn_softcap: get_f("attn_logit_softcapping").filter(|&c| c > 0.0),
            final_softcap: get_f("final_logit_softcapping").filter(|&c| c > 0.0),
            sliding_window,
            layer_types,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(format!("`{k}` must be positive"));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(format!(
                "num_hidden_layers {} is out of range (at most {MAX_LAYERS})",
                self.num_hidden_layers
            ));
        }
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v > MAX_DIM {
                return Err(format!("`{k}` {v} is out of range (at most {MAX_DIM})"));
            }
        }
        if self.sliding_window == Some(0) {
            return Err("`sliding_window` must be positive".into());
        }
        for (k, c) in [
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if c.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return Err(format!("`{k}` must be a positive number"));
            }
        }
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            return Err("the attention scale (query_pre_attn_scalar) must be positive".into());
        }
        Ok(())
    }

    /// The RoPE a layer uses.
    pub fn rope_for(&self, layer: usize) -> &Rope {
        match (self.layer_types.get(layer), &self.rope_local) {
            (Some(LayerType::Sliding), Some(local)) => local,
            _ => &self.rope,
        }
    }

    /// The window of a layer (`None` = full attention).
    pub fn window_for(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// Inverse frequencies of the global RoPE, `[head_dim / 2]`, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.rope.inv_freq(self.head_dim)
    }
}

/// RoPE settings of an HF config: `rope_parameters` (transformers 5; one entry per layer type
/// for Gemma 3) or top-level `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`).
/// Returns the global RoPE and, for Gemma 3, the local one.
fn read_hf_rope(f: &Fields, family: Family) -> std::result::Result<(Rope, Option<Rope>), String> {
    // transformers' config-class defaults
    let default_theta = if family == Family::Gemma3 {
        1_000_000.0
    } else {
        10000.0
    };
    if let Some(p) = f.get("rope_parameters") {
        let obj = p
            .as_object()
            .ok_or_else(|| format!("`rope_parameters` must be an object, found {p}"))?;
        let per_type = obj.contains_key("full_attention") || obj.contains_key("sliding_attention");
        if per_type {
            let one = |k: &str| -> std::result::Result<Option<Rope>, String> {
                match obj.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => {
                        rope_from(v, &format!("rope_parameters.{k}"), default_theta).map(Some)
                    }
                }
            };
            let full =
                one("full_attention")?.ok_or("`rope_parameters.full_attention` is missing")?;
            let local = one("sliding_attention")?;
            let local = match local {
                Some(l) => Some(l),
                None if family == Family::Gemma3 => Some(full.clone()),
                None => None,
            };
            return Ok((full, local));
        }
        let rope = rope_from(p, "rope_parameters", default_theta)?;
        let local = (family == Family::Gemma3).then_some(Rope {
            theta: 10000.0,
            scaling: None,
        });
        return Ok((rope, local));
    }
    let theta = f.f64("rope_theta")?.unwrap_or(default_theta);
    let scaling = match f.get("rope_scaling") {
        None => None,
        Some(v) => parse_rope_scaling(v, "rope_scaling")?,
    };
    let local = if family == Family::Gemma3 {
        Some(Rope {
            theta: f.f64("rope_local_base_freq")?.unwrap_or(10000.0),
            scaling: None,
        })
    } else {
        None
    };
    Ok((Rope { theta, scaling }, local))
}

/// One `rope_parameters` entry: `rope_theta` plus the scaling fields.
fn rope_from(v: &Value, what: &str, default_theta: f64) -> std::result::Result<Rope, String> {
    let theta = match v.get("rope_theta") {
        None | Some(Value::Null) => default_theta,
        Some(t) => t
            .as_f64()
            .ok_or_else(|| format!("`{what}.rope_theta` must be a number, found {t}"))?,
    };
    Ok(Rope {
        theta,
        scaling: parse_rope_scaling(v, what)?,
    })
}

fn parse_rope_scaling(v: &Value, what: &str) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor").ok_or(format!("`{what}.factor` is missing"))?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor").ok_or(format!("`{what}.factor` is missing"))?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        })),
        other => Err(format!(
            "`{what}` type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut v = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "vocab_size": 270
        });
        edit(v.as_object_mut().unwrap());
        v.to_string()
    }

    /// Found by the fuzzer in a release build: a huge `num_hidden_layers` sized a per-layer
    /// list before any check (an allocation of isize::MAX bytes: an abort, not an error).
    #[test]
    fn huge_sizes_are_errors_before_anything_is_allocated() {
        ModelConfig::from_hf_str(&llama(|_| {})).unwrap();
        for n in [u64::MAX, i64::MAX as u64, 1 << 40, MAX_LAYERS as u64 + 1] {
            let err = ModelConfig::from_hf_str(&llama(|m| {
                m.insert("num_hidden_layers".into(), n.into());
            }))
            .unwrap_err();
            assert!(err.contains("num_hidden_layers"), "{err}");
        }
        for k in ["hidden_size", "intermediate_size", "vocab_size"] {
            let err = ModelConfig::from_hf_str(&llama(|m| {
                m.insert(k.into(), (1u64 << 40).into());
            }))
            .unwrap_err();
            assert!(err.contains(k), "{k}: {err}");
        }
    }
}
