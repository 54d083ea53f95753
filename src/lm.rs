//! A language model as a user sees it: resolved by name, weights + tokenizer + chat template,
//! with text in and text out. The script layer wraps this; it knows nothing of Rhai itself.

use crate::chat::{self, ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::generate::{generate, GenOptions};
use crate::hooks::{HookPoint, Hooks};
use crate::model::quant::WeightFormat;
use crate::model::weights::{GgufWeights, SafetensorsWeights};
use crate::model::{Input, Logits, Model};
use crate::sources::{self, ModelSource};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Float dtype weights are dequantized/cast to (f32 default; bf16, f16).
    pub dtype: DType,
    pub device: Device,
    /// How linear weights are kept: f32 (default), or quantized (`native`, `q8_0`, `q4_k`).
    pub weights: WeightFormat,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            weights: WeightFormat::F32,
        }
    }
}

impl LoadOptions {
    /// Set the `weights` option by name; `"bf16"` is the dtype option (an explicit dtype
    /// that says otherwise is an error).
    pub fn with_weights(mut self, name: &str, dtype_given: bool) -> Result<Self> {
        let w = WeightFormat::parse(name).ok_or_else(|| {
            Error::invalid(format!(
                "unknown weights `{name}` (expected {})",
                WeightFormat::NAMES
            ))
        })?;
        match w {
            WeightFormat::Bf16 if dtype_given && self.dtype != DType::BF16 => {
                return Err(Error::invalid(format!(
                    "weights: \"bf16\" with dtype {:?}: give one of them",
                    self.dtype
                )))
            }
            WeightFormat::Bf16 => self.dtype = DType::BF16,
            WeightFormat::F32 if dtype_given && self.dtype != DType::F32 => {
                return Err(Error::invalid(format!(
                    "weights: \"f32\" with dtype {:?}: give one of them",
                    self.dtype
                )))
            }
            q if q.is_quantized() && dtype_given && self.dtype != DType::F32 => {
                return Err(Error::invalid(format!(
                    "weights: \"{}\" keeps activations in f32; dtype {:?} does not apply",
                    q.name(),
                    self.dtype
                )))
            }
            _ => {}
        }
        self.weights = w;
        Ok(self)
    }
}

/// Parse a dtype name as users write it.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::invalid(format!(
            "unknown dtype `{other}` (expected f32, bf16 or f16)"
        ))),
    }
}

/// Pick a device by name: `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| Error::invalid(format!("bad device `{s}`")))?
                .unwrap_or(0);
            Ok(Device::new_cuda(n)?)
        }
        other => Err(Error::invalid(format!(
            "unknown device `{other}` (expected cpu or cuda[:N])"
        ))),
    }
}

pub struct LanguageModel {
    /// The name it was loaded by.
    pub name: String,
    /// The GGUF file or model directory.
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl LanguageModel {
    /// Resolve `name` (fetching it if needed) and load it.
    pub fn load(name: &str, opts: &LoadOptions) -> Result<Self> {
        let src = sources::resolve(name)?;
        let lm = Self::from_source(name, &src, opts);
        // the loader's f32 copies, freed once packed, stay in malloc's heap otherwise
        crate::util::release_free_memory();
        lm
    }

    /// [`LanguageModel::load`] as a shared handle: loading the same model (same name, dtype and
    /// device) again while a handle is alive gives the same weights, not a second copy. The
    /// cache is process-wide and holds no model alive by itself.
    pub fn load_shared(name: &str, opts: &LoadOptions) -> Result<Arc<Self>> {
        type Cache = Mutex<HashMap<String, Weak<LanguageModel>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let key = format!(
            "{name}|{:?}|{:?}|{:?}",
            opts.dtype,
            opts.device.location(),
            opts.weights
        );
        let cache = CACHE.get_or_init(Default::default);
        let lock = || cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lm) = lock().get(&key).and_then(Weak::upgrade) {
            return Ok(lm);
        }
        let lm = Arc::new(Self::load(name, opts)?);
        let mut c = lock();
        c.retain(|_, w| w.strong_count() > 0);
        c.insert(key, Arc::downgrade(&lm));
        Ok(lm)
    }

    pub fn from_source(name: &str, src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        crate::budget::check_model_fits(src, opts.dtype, opts.weights)?;
        match src {
            ModelSource::Gguf(path) => {
                let mut w = GgufWeights::open(path)?;
                let cfg = ModelConfig::from_gguf(&w.content, path)?;
                crate::budget::check_config(&cfg, w.content.tensor_infos.len(), path)?;
                w.set_family(cfg.family, cfg.num_attention_heads, cfg.num_key_value_heads);
                let (tokenizer, chat_template) = chat::load_gguf(&w.content, path)?;
                let model = Model::load_with(cfg, &mut w, opts.dtype, opts.weights, &opts.device)?;
                Ok(LanguageModel {
                    name: name.to_string(),
                    path: path.clone(),
                    model,
                    tokenizer,
                    chat_template,
                })
            }
            ModelSource::Dir {
                root,
                config,
                tokenizer,
                tokenizer_config,
                weights,
                ..
            } => {
                let cfg = ModelConfig::from_hf_json(config)?;
                crate::budget::check_config(
                    &cfg,
                    crate::budget::declared_tensors(src)?.len(),
                    config,
                )?;
                let (tok, chat_template) =
                    chat::load_files(tokenizer, tokenizer_config.as_deref())?;
                let mut w = SafetensorsWeights::open(weights)?;
                let model = Model::load_with(cfg, &mut w, opts.dtype, opts.weights, &opts.device)?;
                Ok(LanguageModel {
                    name: name.to_string(),
                    path: root.clone(),
                    model,
                    tokenizer: tok,
                    chat_template,
                })
            }
        }
    }

    /// The same language model (tokenizer, template) around other weights, e.g. a steered
    /// copy of this model.
    pub fn with_model(&self, model: Model) -> LanguageModel {
        LanguageModel {
            name: self.name.clone(),
            path: self.path.clone(),
            model,
            tokenizer: self.tokenizer.clone(),
            chat_template: self.chat_template.clone(),
        }
    }

    /// This model with the PEFT adapter in `dir` attached (e.g. a steered target saved by
    /// control).
    pub fn with_adapter(&self, dir: &std::path::Path) -> Result<LanguageModel> {
        let mut model = self.model.clone();
        crate::lora::Adapter::load_peft(dir, &model)?.attach(&mut model)?;
        Ok(self.with_model(model))
    }

    /// The token used to left-pad batches: the tokenizer's pad, else its eos, else 0.
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .pad_id()
            .or_else(|| self.tokenizer.eos_ids().first().copied())
            .unwrap_or(0)
    }

    /// Token ids of a prompt: no special tokens added except the BOS a model requires
    /// (`add_bos`), and only if the text does not already start with it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text)?;
        if self.tokenizer.add_bos() {
            if let Some(bos) = self.tokenizer.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        if ids.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        Ok(ids)
    }

    pub fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "model `{}` has no chat template; set one with set_chat_template",
                self.name
            ))
        })
    }

    /// Render messages with the model's chat template.
    pub fn chat_prompt(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template()?.render(messages, add_generation_prompt)
    }

    /// Generation options with this model's stop tokens filled in.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.tokenizer.eos_ids().to_vec()
    }

    /// Generate from several prompts as one left-padded batch; returns the new text of each.
    pub fn generate(
        &self,
        prompts: &[String],
        opts: &GenOptions,
        hooks: Option<&mut Hooks>,
    ) -> Result<Vec<String>> {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.encode_prompt(p))
            .collect::<Result<_>>()?;
        let out = generate(&self.model, &ids, self.pad_id(), opts, hooks)?;
        out.iter()
            .map(|toks| {
                let toks: &[u32] = match toks.last() {
                    Some(t) if opts.stop_ids.contains(t) => &toks[..toks.len() - 1],
                    _ => toks,
                };
                self.tokenizer.decode(toks)
            })
            .collect()
    }

    /// Last-position logits `[vocab]` of a prompt.
    pub fn logits(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.encode_prompt(prompt)?;
        let input = Input::left_padded(&[ids], self.pad_id(), self.model.device())?
            .with_logits(Logits::Last);
        let out = self.model.forward(&input, None, None)?;
        let logits = out
            .logits
            .ok_or_else(|| Error::Invalid("the forward pass returned no logits".into()))?;
        Ok(logits.get(0)?)
    }

    /// Run prompts as one batch and capture activations at `points`. Returns, per point, a
    /// tensor `[batch, seq, d]` (left-padded) and the pads of each row. The forward stops after
    /// the last block anything needs.
    pub fn run_with_cache(
        &self,
        prompts: &[String],
        points: &[HookPoint],
    ) -> Result<(HashMap<HookPoint, Tensor>, Vec<usize>)> {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.encode_prompt(p))
            .collect::<Result<_>>()?;
        let mut input =
            Input::left_padded(&ids, self.pad_id(), self.model.device())?.with_logits(Logits::None);
        let mut hooks = Hooks::new();
        for p in points {
            hooks = hooks.capture(*p);
        }
        let n = self.model.n_layers();
        if !points.contains(&HookPoint::FinalNorm) {
            input.stop_after_layer = Some(hooks.last_layer_needed(n));
        }
        self.model.forward(&input, None, Some(&mut hooks))?;
        Ok((hooks.captured, input.pads))
    }
}
