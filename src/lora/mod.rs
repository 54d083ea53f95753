//! LoRA adapters applied from outside the model (as burn does): an [`Adapter`] owns trainable
//! `A`/`B` variables for chosen modules of chosen layers and plugs them into the model's
//! [`Linear`](crate::model::Linear) slots. Base weights stay frozen constants.
//!
//! Adapters are saved and loaded in PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors` with PEFT's tensor names), so an adapter trained here loads in
//! PEFT, and PEFT adapters (such as the paper's released decoder) load here.

pub mod groups;

use crate::model::{LinearId, LoraWeights, Model, Proj, Target};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
pub use groups::{module_group, module_group_names, MODULE_GROUPS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// PEFT's LoRA config (the subset that matters here; other keys are kept when loading).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// Short module names (`q_proj`, ..., `lm_head`).
    pub target_modules: Vec<String>,
    /// Only these layers (PEFT's `layers_to_transform`); `lm_head` is adapted regardless, as
    /// PEFT does.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The paper's decoder config: r 16, alpha 32, dropout 0.05 on every projection + lm_head.
    pub fn paper_decoder() -> Self {
        LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Target::ALL.map(|t| t.hf_name().to_string()).to_vec(),
            layers_to_transform: None,
            use_rslora: false,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("LoRA rank r must be > 0"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::invalid(format!(
                "LoRA dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        for m in &self.target_modules {
            if Target::parse(m).is_none() {
                let known: Vec<&str> = Target::ALL.iter().map(|t| t.hf_name()).collect();
                return Err(Error::invalid(format!(
                    "unknown LoRA target module `{m}` (known: {})",
                    known.join(", ")
                )));
            }
        }
        if let Some(ls) = &self.layers_to_transform {
            if let Some(l) = ls.iter().find(|&&l| l >= n_layers) {
                return Err(Error::invalid(format!(
                    "LoRA layer {l} is out of range for a model of {n_layers} layers"
                )));
            }
        }
        Ok(())
    }

    /// The targets named in `target_modules` (unknown names are left out; see
    /// [`LoraConfig::validate`]).
    pub fn targets(&self) -> Vec<Target> {
        self.target_modules
            .iter()
            .filter_map(|m| Target::parse(m))
            .collect()
    }

    /// The linear layers this config adapts on a model of `n_layers`, in forward order
    /// (`lm_head` last).
    pub fn modules(&self, n_layers: usize) -> Vec<LinearId> {
        let targets = self.targets();
        let mut v = Vec::new();
        for l in 0..n_layers {
            if let Some(ls) = &self.layers_to_transform {
                if !ls.contains(&l) {
                    continue;
                }
            }
            for p in Proj::ALL {
                if targets.contains(&Target::Proj(p)) {
                    v.push(LinearId::Block(l, p));
                }
            }
        }
        if targets.contains(&Target::LmHead) {
            v.push(LinearId::LmHead);
        }
        v
    }

    /// HF module names this config adapts on a model of `n_layers`.
    pub fn module_names(&self, n_layers: usize) -> Vec<String> {
        self.modules(n_layers)
            .into_iter()
            .map(LinearId::hf_name)
            .collect()
    }
}

/// A set of LoRA weights, keyed by HF module name.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    pub layers: BTreeMap<String, Arc<LoraWeights>>,
}

/// A tiny seeded uniform generator for PEFT's kaiming-uniform init of `A`.
fn uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut g = crate::rng::Lcg64::new(seed ^ 0x0005_DEEC_E66D);
    (0..n)
        .map(|_| (2.0 * g.next_unit_f32() - 1.0) * bound)
        .collect()
}

impl Adapter {
    /// Fresh adapters as PEFT initialises them: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming
    /// uniform with a = sqrt 5), `B = 0`, so the adapted model starts equal to the base.
    /// Variables are f32 (f64 for an f64 model) on the model's device.
    pub fn new(model: &Model, config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate(model.n_layers())?;
        let dev = model.device().clone();
        let vdt = if model.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut layers = BTreeMap::new();
        for (i, id) in config.modules(model.n_layers()).into_iter().enumerate() {
            let name = id.hf_name();
            let lin = model
                .linear_at(id)
                .ok_or_else(|| Error::invalid(format!("model has no module `{name}`")))?;
            let (out, inp) = (lin.out_features(), lin.in_features());
            let bound = 1.0 / (inp as f32).sqrt();
            let a = Tensor::from_vec(
                uniform(config.r * inp, bound, seed.wrapping_add(i as u64 * 7919)),
                (config.r, inp),
                &dev,
            )?
            .to_dtype(vdt)?;
            let b = Tensor::zeros((out, config.r), vdt, &dev)?;
            layers.insert(
                name,
                Arc::new(LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: config.scale(),
                    dropout: config.lora_dropout,
                }),
            );
        }
        Ok(Adapter { config, layers })
    }

    /// Plug the adapters into a model (replacing any it had). The model's other layers keep
    /// no adapter.
    pub fn attach(&self, model: &mut Model) -> Result<()> {
        Self::detach(model);
        for (name, w) in &self.layers {
            let lin = model
                .linear_mut(name)
                .ok_or_else(|| Error::invalid(format!("model has no module `{name}`")))?;
            let (a, b) = (w.a.dims(), w.b.dims());
            if a[1] != lin.in_features() || b[0] != lin.out_features() {
                return Err(Error::invalid(format!(
                    "LoRA for `{name}` is A {a:?} / B {b:?}, the layer is [{}, {}]",
                    lin.out_features(),
                    lin.in_features()
                )));
            }
            lin.lora = Some(w.clone());
        }
        Ok(())
    }

    /// A copy of `model` with every attached adapter folded into its weights
    /// (`W + scale * B A`) and no adapter left: the same function, run at the base model's
    /// cost, with nothing to differentiate (a frozen decoder in control).
    ///
    /// A quantized weight (`weights: "native"`, `"q8_0"`, ...) keeps its adapter unmerged
    /// (`Wq x + scale * B A x`, as QLoRA runs): folding would quantize `W + scale * B A` again
    /// to the weight's type, and that rounding (up to half a quantization step per weight, e.g.
    /// `(max - min) / 30` of a Q4_1 block of 32) is as large as most of the adapter's delta.
    pub fn merged(model: &Model) -> Result<Model> {
        let mut m = model.clone();
        for id in m.linear_ids() {
            if let Some(l) = m.linear_at_mut(id) {
                if l.quant().is_some() {
                    continue;
                }
                if let Some(w) = l.lora.take() {
                    // detached: a weight computed from variables would carry their graph
                    // into every forward (keeping all activations alive) and keep `delta`
                    let a = w.a.as_tensor().detach().to_dtype(DType::F32)?;
                    let b = w.b.as_tensor().detach().to_dtype(DType::F32)?;
                    let delta = (b.matmul(&a)? * w.scale)?;
                    l.map_weight(|wt| {
                        (wt.to_dtype(DType::F32)? + &delta)?
                            .to_dtype(wt.dtype())
                            .map(|t| t.detach())
                    })?;
                }
            }
        }
        Ok(m)
    }

    /// Remove every adapter from a model.
    pub fn detach(model: &mut Model) {
        for id in model.linear_ids() {
            if let Some(l) = model.linear_at_mut(id) {
                l.lora = None;
            }
        }
    }

    /// The trainable variables, in a stable order (A then B of each module, by name).
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .values()
            .flat_map(|w| [w.a.clone(), w.b.clone()])
            .collect()
    }

    /// Named variables, PEFT names.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(n, w)| {
                [
                    (format!("base_model.model.{n}.lora_A.weight"), w.a.clone()),
                    (format!("base_model.model.{n}.lora_B.weight"), w.b.clone()),
                ]
            })
            .collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Save in PEFT format into `dir` (created if needed), tensors in `dtype` (bf16 to ship,
    /// f32 for checkpoints). Both files are written atomically.
    pub fn save_peft(&self, dir: &Path, base_model: &str, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = serde_json::to_value(&self.config).expect("config serialises");
        let extra = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "revision": null,
        });
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        crate::util::atomic_write(&dir.join("adapter_config.json"), text.as_bytes())?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (n, v) in self.named_vars() {
            tensors.insert(n, v.as_tensor().to_dtype(dtype)?);
        }
        let path = dir.join("adapter_model.safetensors");
        crate::util::atomic_replace(&path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(|e| Error::bad_file(tmp, e))
        })
    }

    /// Load a PEFT adapter directory for `model` (f32 variables on the model's device).
    pub fn load_peft(dir: &Path, model: &Model) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e))?;
        if let Some(t) = raw.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(Error::bad_file(
                    &cfg_path,
                    format!("peft_type `{t}` is not supported (LORA)"),
                ));
            }
        }
        let mut config: LoraConfig =
            serde_json::from_value(raw.clone()).map_err(|e| Error::bad_file(&cfg_path, e))?;
        // PEFT allows target_modules as a string (a regex or a single name).
        config.target_modules.retain(|m| Target::parse(m).is_some());
        config
            .validate(model.n_layers())
            .map_err(|e| Error::bad_file(&cfg_path, e))?;
        let st_path = dir.join("adapter_model.safetensors");
        let dev: Device = model.device().clone();
        let tensors = candle_core::safetensors::load(&st_path, &dev).map_err(|e| {
            Error::bad_file(&st_path, format!("not a readable safetensors file: {e}"))
        })?;
        let mut layers = BTreeMap::new();
        for id in config.modules(model.n_layers()) {
            let name = id.hf_name();
            let get = |ab: &str| -> Result<Tensor> {
                // PEFT writes `...lora_A.weight`; older versions `...lora_A.default.weight`.
                let keys = [
                    format!("base_model.model.{name}.lora_{ab}.weight"),
                    format!("base_model.model.{name}.lora_{ab}.default.weight"),
                ];
                keys.iter()
                    .find_map(|k| tensors.get(k))
                    .ok_or_else(|| {
                        Error::bad_file(&st_path, format!("missing tensor `{}`", keys[0]))
                    })?
                    .to_dtype(DType::F32)
                    .map_err(Error::from)
            };
            let (a, b) = (get("A")?, get("B")?);
            let lin = model.linear_at(id).ok_or_else(|| {
                Error::bad_file(&cfg_path, format!("the model has no module `{name}`"))
            })?;
            if a.dims() != [config.r, lin.in_features()]
                || b.dims() != [lin.out_features(), config.r]
            {
                return Err(Error::bad_file(
                    &st_path,
                    format!(
                        "`{name}`: A {:?} / B {:?} do not fit r {} and the layer [{}, {}]",
                        a.dims(),
                        b.dims(),
                        config.r,
                        lin.out_features(),
                        lin.in_features()
                    ),
                ));
            }
            layers.insert(
                name,
                Arc::new(LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: config.scale(),
                    dropout: config.lora_dropout,
                }),
            );
        }
        Ok(Adapter { config, layers })
    }
}
