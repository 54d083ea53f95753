//! One typed configuration for the Llama family, parsed once from an HF `config.json` or from
//! GGUF metadata. Everything the model needs to know about shapes lives here.

use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;
use std::path::Path;

/// RoPE frequency scaling, as HF's `rope_scaling`.
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`...: informational.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Parse an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_str(&text).map_err(|e| Error::bad_file(path, e))
    }

    /// Parse the text of an HF `config.json`.
    pub fn from_hf_str(text: &str) -> std::result::Result<Self, String> {
        let c: HfConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch = c.model_type.unwrap_or_else(|| "llama".into());
        let rope_scaling = match &c.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => parse_rope_scaling(v)?,
        };
        if c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads) && c.head_dim.is_none()
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        let cfg = LlamaConfig {
            attention_bias: c.attention_bias.unwrap_or(arch == "qwen2"),
            architecture: arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read the config from GGUF metadata (`{arch}.block_count`, ...). `has_output` tells whether
    /// the file has a separate `output.weight` (otherwise embeddings are tied).
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &ct.metadata;
        let bad = |m: String| Error::bad_file(path, m);
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| bad("missing GGUF metadata `general.architecture`".into()))?;
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(bad(format!(
                "GGUF architecture `{arch}` is not a Llama-family model (llama, mistral, qwen2)"
            )));
        }
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
        let n_kv = get_u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| bad("cannot determine vocab size".into()))?,
        };
        let rope_scaling = match md
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t == "linear" => Some(RopeScaling::Linear {
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            }),
            _ => None,
        };
        let cfg = LlamaConfig {
            attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
            architecture: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_hidden_layers: get_u("block_count")?,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
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
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    /// Inverse frequencies of RoPE, `[head_dim / 2]`, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
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

fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor").ok_or("rope_scaling.factor missing")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor").ok_or("rope_scaling.factor missing")?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        })),
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}
