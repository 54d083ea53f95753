//! Control: steer the *target* model by descending the decoder's loss on a desired answer
//! (the paper's `lit/control.py`). The decoder is frozen; its loss on a control QA pair, given
//! the target's activations on a sampled prompt, is back-propagated through the patched
//! activations into a LoRA on the target.
//!
//! - [`data`]: controls files, instruction sets, evaluation prompts, and the samples;
//! - [`ControlOptimizer`]: the optimizer (`steer` and the per-layer variant), atomic
//!   checkpoints that resume exactly, metrics, the loss curve, the steered adapter.

pub mod data;
pub mod fluency;
pub mod kl;
pub mod measures;

use crate::hooks::{HookFn, HookPoint, Hooks};
use crate::latentqa::decoder::Decoder;
use crate::latentqa::format::{decoder_prompt, read_prompt};
use crate::latentqa::loss::{
    gather_patches, latentqa_loss, patched_token_nll, LossConfig, PatchedBatch, PatchedExample,
};
use crate::latentqa::{layer_question, Injection, Labels, LayerPlan};
use crate::lm::LanguageModel;
use crate::lora::{module_group_names, Adapter, LoraConfig};
use crate::model::{Input, Logits, Model};
use crate::rng::SplitMix64;
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::plot::{smooth, write_loss_curve, Series, PALETTE};
use crate::train::run::{
    check_resume_config, every, run_steps, RunDir, StepRecord, Steps, STATE_FILE,
};
use crate::util::atomic_write_json;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use data::{Control, ControlSample, Instruction};
use fluency::{EarlyStop, Fluency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How a control run is configured (the paper's `steer_config`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlConfig {
    /// Samples drawn from (instruction x QA pair x {prompt, prompt + response}).
    pub samples: usize,
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Which projections get LoRA, a group of [`crate::lora::MODULE_GROUPS`]: `both`
    /// (attention, MLP and lm_head), `mlp` (with lm_head), `attn` or `qv`.
    pub lora_modules: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Layers whose projections get LoRA (and, per layer, a loss and an optimizer).
    pub layers_to_optimize: Vec<usize>,
    /// The target layer read (default: the decoder's).
    pub read_layer: Option<usize>,
    /// The decoder layer written (default: the decoder's).
    pub write_layer: Option<usize>,
    /// For every optimised layer, the decoder's loss on that layer's output steps that
    /// layer's own optimizer (the paper's `per_layer_loss`).
    pub per_layer_loss: bool,
    pub seed: u64,
    /// Samples whose read + decoder prompts exceed this many tokens are skipped.
    pub max_tokens: usize,
    /// [`ControlOptimizer::run`] writes a checkpoint every this many steps (0: only at the end
    /// and on an early stop) when the run has an output directory.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Weight of the KL regulariser ([`kl::kl_to_reference`]): the steered model's next-token
    /// distributions on the batch's read prompts (instructions and their responses) are kept
    /// near the unsteered model's. 0 turns it off (the paper).
    #[serde(default)]
    pub kl_weight: f64,
    /// Early stopping on a held-out fluency check ([`fluency::EarlyStop`]); `None`: off (the
    /// paper).
    #[serde(default)]
    pub early_stop: Option<EarlyStop>,
    /// Recompute each block in the backward pass instead of keeping its intermediates
    /// ([`crate::model::recompute`]): less memory, one more block forward each.
    #[serde(default)]
    pub recompute: bool,
}

fn default_checkpoint_every() -> usize {
    25
}

/// lqa's recipe, from the sweep of issue 18 (`scripts/control_sweep.rhai`, the table in the
/// README): 150 samples at lr 1e-4 with the fluency check every 10 steps, which stops the run
/// where steering starts to break the model's answers.
impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            samples: 150,
            batch_size: 1,
            lr: 1e-4,
            lora_modules: "both".into(),
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            layers_to_optimize: (0..16).collect(),
            read_layer: None,
            write_layer: None,
            per_layer_loss: false,
            seed: 42,
            max_tokens: 1024,
            checkpoint_every: default_checkpoint_every(),
            kl_weight: 0.0,
            early_stop: Some(EarlyStop::default()),
            recompute: false,
        }
    }
}

impl ControlConfig {
    /// The paper's objective and optimizer without the fluency check, at 50 samples (lqa's
    /// default before the sweep): every step of the pass is taken.
    pub fn paper() -> Self {
        ControlConfig {
            samples: 50,
            early_stop: None,
            ..Default::default()
        }
    }
}

impl ControlConfig {
    /// The target's LoRA config: the paper's module groups on `layers_to_optimize`.
    pub fn lora_config(&self, n_layers: usize) -> Result<LoraConfig> {
        let target_modules = module_group_names(&self.lora_modules)?;
        if self.layers_to_optimize.is_empty() {
            return Err(Error::invalid("layers_to_optimize is empty"));
        }
        if let Some(&l) = self.layers_to_optimize.iter().find(|&&l| l >= n_layers) {
            return Err(Error::invalid(format!(
                "layers_to_optimize: layer {l} is out of range, the model has {n_layers} layers"
            )));
        }
        let cfg = LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules,
            layers_to_transform: Some(self.layers_to_optimize.clone()),
            ..LoraConfig::paper_decoder()
        };
        cfg.validate(n_layers)?;
        Ok(cfg)
    }
}

/// What one step did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlStats {
    pub step: usize,
    /// The decoder's loss on the control answers (per-layer: the mean over layers).
    pub loss: f64,
    /// Per-layer losses (per-layer variant only), by layer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layer_losses: BTreeMap<usize, f64>,
    pub read_layer: usize,
    /// The KL regulariser's value (before its weight), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// The fluency check's score, on the steps that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fluency: Option<Fluency>,
    /// Set on the step whose fluency check failed: the run stops there and keeps the adapter
    /// of the last step that passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<EarlyStopped>,
    /// Seconds of the step, the fluency check included.
    pub seconds: f64,
}

/// Why and where a run stopped early.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopped {
    /// The step whose check failed.
    pub at_step: usize,
    /// The step whose adapter the run keeps (the last that passed; 0: the unsteered model).
    pub kept_step: usize,
    pub fluency: Fluency,
    /// The unsteered model's score on the same prompts.
    pub unsteered: Fluency,
}

/// `state.json` of a control checkpoint: what a resumed run must rebuild exactly.
#[derive(Serialize, Deserialize)]
struct ControlState {
    step: usize,
    base_model: String,
    /// The control's prompt, file and QA pairs.
    control: String,
    control_file: PathBuf,
    qa: Vec<(String, String)>,
    read_layer: usize,
    write_layer: usize,
    config: ControlConfig,
    /// The samples as chosen (before the token limit), in order.
    samples: Vec<ControlSample>,
    /// The held-out instructions of the fluency check.
    #[serde(default)]
    held_out: Vec<String>,
    /// The step of the adapter kept in `fluent.safetensors` (the last that passed the check).
    #[serde(default)]
    fluent_step: Option<usize>,
    /// Set when the run stopped early (it is then done).
    #[serde(default)]
    stopped: Option<EarlyStopped>,
}

/// The file of a checkpoint holding the LoRA of the last step that passed the fluency check.
const FLUENT_FILE: &str = "fluent.safetensors";

/// The checkpoint directory of a run writing to `out`.
/// An optimizer's state file in a checkpoint: one for the whole adapter, or one per layer.
fn optimizer_file(layer: Option<usize>) -> String {
    match layer {
        None => "optimizer.safetensors".into(),
        Some(l) => format!("optimizer-layer{l}.safetensors"),
    }
}

/// A prepared sample.
#[derive(Clone)]
struct Prepared {
    ex: PatchedExample,
}

/// The control optimizer: a LoRA on a copy of the target, Adam, and the frozen decoder.
pub struct ControlOptimizer {
    pub config: ControlConfig,
    pub control: Control,
    target: Arc<LanguageModel>,
    /// The target with the control LoRA attached (the steered model).
    steered: Model,
    /// The decoder with its adapter folded in (frozen).
    decoder: Model,
    adapter: Adapter,
    /// One optimizer over all LoRA variables, or one per optimised layer.
    opts: Vec<(Option<usize>, AdamW)>,
    samples: Vec<Prepared>,
    /// The samples as chosen (saved in checkpoints).
    chosen: Vec<ControlSample>,
    read_layers: (usize, usize),
    write_layer: usize,
    /// The decoder's injection at the write layer.
    inject: Injection,
    /// The decoder reads by contrast (see [`LayerPlan::contrast`]).
    contrast: bool,
    step: usize,
    history: Vec<ControlStats>,
    /// Where metrics, the plot and checkpoints go, when set.
    out: Option<RunDir>,
    /// The held-out instructions of the fluency check (empty when it is off).
    held_out: Vec<String>,
    /// The unsteered model's fluency on `held_out` (measured at the first check).
    unsteered: Option<Fluency>,
    /// The step and LoRA variables of the last step that passed the check.
    fluent: Option<(usize, Vec<(String, Tensor)>)>,
    /// Set when the run stopped early.
    stopped: Option<EarlyStopped>,
}

/// Copies of the LoRA's variables, by name.
fn snapshot(adapter: &Adapter) -> Result<Vec<(String, Tensor)>> {
    adapter
        .named_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
        .collect()
}

/// `blocks.{i}.` of a PEFT variable name, if it is in a block.
fn var_layer(name: &str) -> Option<usize> {
    let rest = name.split(".layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

impl ControlOptimizer {
    /// Set up a run: the control, the instruction set and the decoder; a fresh LoRA on the
    /// target.
    pub fn new(
        decoder: &Decoder,
        control: Control,
        instructions: &[Instruction],
        config: ControlConfig,
    ) -> Result<Self> {
        let chosen = data::samples(instructions, control.qa.len(), config.samples, config.seed);
        if chosen.is_empty() {
            return Err(Error::invalid(format!(
                "no control samples (samples = {}, {} instructions)",
                config.samples,
                instructions.len()
            )));
        }
        let held_out = match &config.early_stop {
            Some(es) => {
                let read: std::collections::HashSet<&str> = chosen
                    .iter()
                    .filter_map(|s| s.read.messages.first())
                    .map(|m| m.content.as_str())
                    .collect();
                let held_out: Vec<String> = instructions
                    .iter()
                    .map(|i| i.instruction.clone())
                    .filter(|i| !read.contains(i.as_str()))
                    .take(es.prompts)
                    .collect();
                if held_out.is_empty() {
                    tracing::warn!(
                        "the {} samples read all {} instructions of the set: the fluency check \
                         answers {} of them (not held out); take fewer samples or a larger set \
                         for a held-out check",
                        config.samples,
                        instructions.len(),
                        es.prompts.min(instructions.len())
                    );
                    instructions
                        .iter()
                        .take(es.prompts)
                        .map(|i| i.instruction.clone())
                        .collect()
                } else {
                    held_out
                }
            }
            None => Vec::new(),
        };
        Self::build(decoder, control, chosen, config, None, held_out)
    }

    /// [`ControlOptimizer::new`] with the samples given (in order); `held_out`: the
    /// instructions of the fluency check (needed when `early_stop` is on).
    pub fn with_samples(
        decoder: &Decoder,
        control: Control,
        chosen: &[ControlSample],
        config: ControlConfig,
        held_out: Vec<String>,
    ) -> Result<Self> {
        Self::build(decoder, control, chosen.to_vec(), config, None, held_out)
    }

    /// Set up a run on `chosen`, with a fresh LoRA or the one saved in `adapter_dir`.
    fn build(
        decoder: &Decoder,
        control: Control,
        chosen: Vec<ControlSample>,
        config: ControlConfig,
        adapter_dir: Option<&Path>,
        held_out: Vec<String>,
    ) -> Result<Self> {
        let target = decoder.target.clone();
        let n_layers = target.model.n_layers();
        let lora = config.lora_config(n_layers)?;
        if config.batch_size == 0 {
            return Err(Error::invalid("batch_size must be > 0"));
        }
        if !(config.kl_weight.is_finite() && config.kl_weight >= 0.0) {
            return Err(Error::invalid(format!(
                "kl_weight must be a number >= 0, got {}",
                config.kl_weight
            )));
        }
        if config.kl_weight > 0.0 && config.per_layer_loss {
            return Err(Error::invalid(
                "kl_weight with per_layer_loss is not supported: the per-layer variant steps \
                 one optimizer per layer from that layer's loss alone",
            ));
        }
        if let Some(es) = &config.early_stop {
            es.validate()?;
            if held_out.is_empty() {
                return Err(Error::invalid(
                    "early_stop is on but no held-out instructions were given",
                ));
            }
        }
        let LayerPlan {
            read: read_layer,
            write: write_layer,
            inject,
            contrast,
        } = (decoder.meta.layers)
            .with(config.read_layer, config.write_layer)
            .check(n_layers)?;
        let mut steered = target.model.clone();
        let adapter = match adapter_dir {
            None => Adapter::new(&steered, lora, config.seed)?,
            Some(dir) => {
                let a = Adapter::load_peft(dir, &steered)?;
                let (got, want) = (&a.config, &lora);
                let modules = |c: &LoraConfig| c.module_names(n_layers);
                if got.r != want.r
                    || modules(got) != modules(want)
                    || got.use_rslora != want.use_rslora
                    || (got.scale() - want.scale()).abs() > 1e-12 * want.scale().abs()
                {
                    return Err(Error::bad_file(
                        dir.join("adapter_config.json"),
                        format!(
                            "the saved LoRA (r {}, alpha {}, {} modules) is not the one the \
                             config asks for (r {}, alpha {}, {} modules)",
                            got.r,
                            got.lora_alpha,
                            modules(got).len(),
                            want.r,
                            want.lora_alpha,
                            modules(want).len()
                        ),
                    ));
                }
                a
            }
        };
        adapter.attach(&mut steered)?;
        let params = AdamWParams {
            lr: config.lr,
            weight_decay: 0.0, // torch.optim.Adam
            ..Default::default()
        };
        let opts = if config.per_layer_loss {
            let mut by_layer: BTreeMap<usize, Vec<(String, Var)>> = BTreeMap::new();
            for (n, v) in adapter.named_vars() {
                if let Some(l) = var_layer(&n) {
                    by_layer.entry(l).or_default().push((n, v));
                }
            }
            by_layer
                .into_iter()
                .map(|(l, vars)| Ok((Some(l), AdamW::new(vars, params)?)))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![(None, AdamW::new(adapter.named_vars(), params)?)]
        };
        let template = target.template()?;
        let mut samples = Vec::with_capacity(chosen.len());
        for s in &chosen {
            if s.qa >= control.qa.len() {
                return Err(Error::invalid(format!(
                    "a sample asks QA pair {} of a control with {}",
                    s.qa,
                    control.qa.len()
                )));
            }
            let named = decoder.meta.names_layer().then_some(read_layer);
            if let Some(p) =
                Self::prepare(&target, template, &control, s, config.max_tokens, named)?
            {
                samples.push(p);
            }
        }
        if samples.is_empty() {
            return Err(Error::invalid(format!(
                "no control samples within the {}-token limit",
                config.max_tokens
            )));
        }
        let fluent = match (&config.early_stop, adapter_dir) {
            // a fresh LoRA (B = 0) is the unsteered model: it passes by definition
            (Some(_), None) => Some((0, snapshot(&adapter)?)),
            _ => None,
        };
        Ok(ControlOptimizer {
            decoder: Adapter::merged(&decoder.model)?, // a no-op for a loaded decoder
            config,
            control,
            target,
            steered,
            adapter,
            opts,
            samples,
            chosen,
            read_layers: (read_layer, read_layer),
            write_layer,
            inject,
            contrast,
            step: 0,
            history: Vec::new(),
            out: None,
            held_out,
            unsteered: None,
            fluent,
            stopped: None,
        })
    }

    fn prepare(
        lm: &LanguageModel,
        template: &crate::chat::ChatTemplate,
        control: &Control,
        s: &ControlSample,
        max_tokens: usize,
        named_layer: Option<usize>,
    ) -> Result<Option<Prepared>> {
        let read = read_prompt(template, &lm.tokenizer, &s.read)?;
        let (q, a) = &control.qa[s.qa];
        let dec = decoder_prompt(
            template,
            &lm.tokenizer,
            read.n_patch(),
            &[(layer_question(named_layer, q), a.clone())],
            Labels::LastAnswer,
            false,
        )?;
        if read.ids.len() + dec.ids.len() > max_tokens {
            return Ok(None);
        }
        Ok(Some(Prepared {
            ex: PatchedExample::new(read, dec)?,
        }))
    }

    /// Write metrics (JSONL) and the loss curve into `dir` as the run goes.
    pub fn with_out_dir(mut self, dir: &Path) -> Result<Self> {
        let run = RunDir::new(dir);
        run.start()?;
        self.out = Some(run);
        Ok(self)
    }

    /// Continue the run checkpointed in `out_dir` (`out_dir/checkpoint/`, recovered from
    /// `checkpoint.old` if a swap was interrupted): the same samples in the same order, the
    /// saved adapter and optimizer state, the step; metrics up to the checkpoint are kept and
    /// what followed it is dropped (the resumed run rewrites it). `control` and `config` must
    /// be those of the checkpointed run (`checkpoint_every` and `recompute` may differ); the
    /// decoder must read the same base model.
    pub fn resume(
        decoder: &Decoder,
        control: Control,
        config: ControlConfig,
        out_dir: &Path,
    ) -> Result<Self> {
        let run = RunDir::new(out_dir);
        let ck = run.checkpoint_dir();
        let p = ck.join(STATE_FILE);
        let state: ControlState = run
            .read_state("control")?
            .ok_or_else(|| Error::io(&p, std::io::Error::from(std::io::ErrorKind::NotFound)))?;
        if state.base_model != decoder.target.name {
            return Err(Error::bad_file(
                &p,
                format!(
                    "the checkpoint steers `{}`, this decoder reads `{}`",
                    state.base_model, decoder.target.name
                ),
            ));
        }
        if state.control != control.prompt || state.qa != control.qa {
            return Err(Error::bad_file(
                &p,
                format!(
                    "the checkpoint is of the control `{}` ({}), not `{}` ({})",
                    state.control,
                    state.control_file.display(),
                    control.prompt,
                    control.file.display()
                ),
            ));
        }
        // how often to checkpoint, and whether blocks are recomputed (the same steps, less
        // memory: a run that ran out of memory resumes with it), may change
        check_resume_config(
            &p,
            &state.config,
            &config,
            &["checkpoint_every", "recompute"],
        )?;
        let mut opt = Self::build(
            decoder,
            control,
            state.samples,
            config,
            Some(&ck.join("adapter")),
            state.held_out,
        )?;
        if (opt.read_layers.0, opt.write_layer) != (state.read_layer, state.write_layer) {
            return Err(Error::bad_file(
                &p,
                format!(
                    "the checkpoint reads layer {} and writes layer {}, this decoder {} and {}",
                    state.read_layer, state.write_layer, opt.read_layers.0, opt.write_layer
                ),
            ));
        }
        for (layer, o) in opt.opts.iter_mut() {
            o.load(&ck.join(optimizer_file(*layer)))?;
        }
        opt.step = state.step;
        opt.stopped = state.stopped;
        if let Some(step) = state.fluent_step {
            let f = ck.join(FLUENT_FILE);
            let saved = candle_core::safetensors::load(&f, opt.steered.device())
                .map_err(|e| Error::bad_file(&f, e.to_string()))?;
            let mut vars = Vec::new();
            for (name, v) in opt.adapter.named_vars() {
                let t = saved.get(&name).ok_or_else(|| {
                    Error::bad_file(&f, format!("no tensor `{name}` of the LoRA"))
                })?;
                if t.dims() != v.dims() {
                    return Err(Error::bad_file(
                        &f,
                        format!("`{name}` is {:?}, the LoRA's is {:?}", t.dims(), v.dims()),
                    ));
                }
                vars.push((name, t.to_dtype(v.dtype())?));
            }
            opt.fluent = Some((step, vars));
        }
        opt.history = run.resume_metrics(state.step)?;
        opt.out = Some(run);
        tracing::info!(
            "resumed the control run in {} at step {}",
            out_dir.display(),
            opt.step
        );
        Ok(opt)
    }

    /// The checkpoint in `out_dir`, if there is one (a swap interrupted between its renames is
    /// recovered first).
    pub fn find_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
        RunDir::new(out_dir).find_checkpoint()
    }

    /// Write a checkpoint into `out_dir/checkpoint/` atomically (the previous one is replaced
    /// only once the new one is complete): the adapter (f32 PEFT), every optimizer's state
    /// (`optimizer.safetensors`, or `optimizer-layer{L}.safetensors` per layer) and
    /// `state.json` (step, config, control, samples, base model).
    pub fn checkpoint(&self) -> Result<PathBuf> {
        let run = self.out.as_ref().ok_or_else(|| {
            Error::invalid(
                "cannot checkpoint a control run without an output directory \
                 (with_out_dir, or `out_dir` in the script's config)",
            )
        })?;
        run.write_checkpoint(|tmp| {
            self.adapter.save_peft(
                &tmp.join("adapter"),
                &self.target.name,
                candle_core::DType::F32,
            )?;
            for (layer, opt) in &self.opts {
                opt.save(&tmp.join(optimizer_file(*layer)))?;
            }
            if let Some((_, vars)) = &self.fluent {
                let map: std::collections::HashMap<String, Tensor> = vars.iter().cloned().collect();
                candle_core::safetensors::save(&map, tmp.join(FLUENT_FILE))?;
            }
            let state = ControlState {
                step: self.step,
                base_model: self.target.name.clone(),
                control: self.control.prompt.clone(),
                control_file: self.control.file.clone(),
                qa: self.control.qa.clone(),
                read_layer: self.read_layers.0,
                write_layer: self.write_layer,
                config: self.config.clone(),
                samples: self.chosen.clone(),
                held_out: self.held_out.clone(),
                fluent_step: self.fluent.as_ref().map(|(s, _)| *s),
                stopped: self.stopped.clone(),
            };
            atomic_write_json(&tmp.join(STATE_FILE), &state)
        })
    }

    /// Steps in one pass over the samples (the paper's run length).
    pub fn total_steps(&self) -> usize {
        self.samples.len() / self.config.batch_size
    }
    pub fn step_count(&self) -> usize {
        self.step
    }
    /// The pass is over, or the fluency check stopped the run.
    pub fn is_done(&self) -> bool {
        self.stopped.is_some() || self.step >= self.total_steps()
    }
    /// The instructions the fluency check answers (empty when it is off).
    pub fn held_out(&self) -> &[String] {
        &self.held_out
    }
    /// Why and where the run stopped early, if it did.
    pub fn stopped(&self) -> Option<&EarlyStopped> {
        self.stopped.as_ref()
    }
    pub fn n_samples(&self) -> usize {
        self.samples.len()
    }
    pub fn num_parameters(&self) -> usize {
        self.adapter.num_parameters()
    }
    pub fn history(&self) -> &[ControlStats] {
        &self.history
    }
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
    /// The steered target (base weights + the control LoRA).
    pub fn steered(&self) -> &Model {
        &self.steered
    }
    pub fn target(&self) -> &Arc<LanguageModel> {
        &self.target
    }
    /// Where metrics, the plot and checkpoints go, when set.
    pub fn out_dir(&self) -> Option<&Path> {
        self.out.as_ref().map(RunDir::path)
    }

    fn loss_config(&self, read_layer: usize) -> LossConfig {
        LossConfig {
            layers: LayerPlan::new(read_layer, self.write_layer)
                .injecting(self.inject)
                .contrasting(self.contrast),
            pad_id: self.target.pad_id(),
            differentiable: true,
            grad_through_target: true,
            use_first_from: false,
            dropout: None,
            recompute: self.config.recompute,
        }
    }

    /// The batch of step `step` (wrapping around after a pass).
    fn batch_at(&self, step: usize) -> Result<PatchedBatch> {
        let n = self.samples.len();
        let bs = self.config.batch_size;
        PatchedBatch::new(
            (0..bs)
                .map(|i| self.samples[(step * bs + i) % n].ex.clone())
                .collect(),
        )
    }

    /// The decoder's mean loss on a batch with the current steering (no update).
    pub fn batch_loss(&self, step: usize) -> Result<f64> {
        let batch = self.batch_at(step)?;
        let mut cfg = self.loss_config(self.read_layers.0);
        cfg.differentiable = false;
        cfg.grad_through_target = false;
        let out = latentqa_loss(&self.steered, &self.decoder, &batch, &cfg)?;
        Ok(out.loss.to_scalar::<f32>()? as f64)
    }

    /// One optimizer step on the next batch.
    pub fn step(&mut self) -> Result<ControlStats> {
        crate::threads::hot(|| self.step_here())
    }

    fn step_here(&mut self) -> Result<ControlStats> {
        crate::interrupt::check()?;
        let t0 = Instant::now();
        let mut rng = SplitMix64::derive(self.config.seed, self.step as u64);
        let (lo, hi) = self.read_layers;
        let read_layer = lo + rng.below((hi - lo + 1) as u64) as usize;
        let batch = self.batch_at(self.step)?;
        let mut kl = None;
        let (loss, layer_losses) = if self.config.per_layer_loss {
            self.per_layer_step(&batch)?
        } else {
            let out = latentqa_loss(
                &self.steered,
                &self.decoder,
                &batch,
                &self.loss_config(read_layer),
            )?;
            let loss = out.loss.to_scalar::<f32>()? as f64;
            crate::train::run::check_finite_loss("control", self.step + 1, loss)?;
            let total = if self.config.kl_weight > 0.0 {
                let rows: Vec<Vec<u32>> =
                    batch.examples.iter().map(|e| e.read.ids.clone()).collect();
                let k = kl::kl_to_reference(
                    &self.steered,
                    &self.target.model,
                    &rows,
                    self.target.pad_id(),
                    None,
                    self.config.recompute,
                )?;
                let kv = k.to_scalar::<f32>()? as f64;
                crate::train::run::check_finite_loss("control (KL term)", self.step + 1, kv)?;
                kl = Some(kv);
                (&out.loss + (k * self.config.kl_weight)?)?
            } else {
                out.loss.clone()
            };
            let grads = crate::model::recompute::backward(&total)?;
            self.opts[0].1.step(&grads)?;
            (loss, BTreeMap::new())
        };
        self.step += 1;
        let (fluency, stopped) = match self.config.early_stop.clone() {
            Some(es) if every(es.every, self.step) || self.step >= self.total_steps() => {
                let (f, stopped) = self.fluency_check(&es)?;
                (Some(f), stopped)
            }
            _ => (None, None),
        };
        let stats = ControlStats {
            step: self.step,
            loss,
            layer_losses,
            read_layer,
            kl,
            fluency,
            stopped,
            seconds: t0.elapsed().as_secs_f64(),
        };
        self.record(&stats)?;
        Ok(stats)
    }

    /// The per-layer variant: one target forward; at every optimised layer its output goes to
    /// the decoder, and that loss steps that layer's optimizer. As in the paper, the stream is
    /// detached after each optimised layer, so a layer's loss reaches only its own LoRA.
    fn per_layer_step(&mut self, batch: &PatchedBatch) -> Result<(f64, BTreeMap<usize, f64>)> {
        let layers: Vec<usize> = self.opts.iter().filter_map(|(l, _)| *l).collect();
        let last = *layers
            .iter()
            .max()
            .expect("layers_to_optimize is not empty");
        let rows: Vec<Vec<u32>> = batch.examples.iter().map(|e| e.read.ids.clone()).collect();
        let mut input = Input::left_padded(&rows, self.target.pad_id(), self.steered.device())?
            .with_logits(Logits::None);
        input.differentiable = true;
        input.recompute = self.config.recompute;
        input.stop_after_layer = Some(last);
        let outputs: Arc<Mutex<BTreeMap<usize, Tensor>>> = Default::default();
        let mut hooks = Hooks::new();
        for &l in &layers {
            let store = outputs.clone();
            let f: HookFn = Arc::new(move |_p, x, _ctx| {
                store.lock().expect("hook store").insert(l, x.clone());
                Ok(Some(x.detach()))
            });
            hooks.fns.push((HookPoint::resid_post(l), f));
        }
        self.steered.forward(&input, None, Some(&mut hooks))?;
        let outputs = std::mem::take(&mut *outputs.lock().expect("hook store"));
        let reads: Vec<_> = batch.examples.iter().map(|e| &e.read).collect();
        let cfg = self.loss_config(self.read_layers.0);
        let step = self.step + 1;
        let mut losses = BTreeMap::new();
        for (layer, opt) in self.opts.iter_mut() {
            crate::interrupt::check()?;
            let l = layer.expect("per-layer optimizers");
            let hidden = &outputs[&l];
            let patches = gather_patches(hidden, &input.pads, &reads, false)?;
            let tn = patched_token_nll(&self.decoder, batch, Some(&patches), &cfg, None)?;
            let loss = tn.nll.mean_all()?;
            let value = loss.to_scalar::<f32>()? as f64;
            crate::train::run::check_finite_loss(&format!("control (layer {l})"), step, value)?;
            let grads = crate::model::recompute::backward(&loss)?;
            opt.step(&grads)?;
            losses.insert(l, value);
        }
        let mean = losses.values().sum::<f64>() / losses.len().max(1) as f64;
        Ok((mean, losses))
    }

    /// The fluency check after a step: the steered model's greedy answers to the held-out
    /// instructions. Passing keeps a copy of the LoRA; failing restores the last copy that
    /// passed and stops the run.
    fn fluency_check(&mut self, es: &EarlyStop) -> Result<(Fluency, Option<EarlyStopped>)> {
        let unsteered = match &self.unsteered {
            Some(f) => f.clone(),
            None => {
                let (f, _) = Fluency::measure(
                    &self.target,
                    &self.target.model,
                    &self.held_out,
                    es.max_new_tokens,
                )?;
                self.unsteered = Some(f.clone());
                f
            }
        };
        let (f, answers) = Fluency::measure(
            &self.target,
            &self.steered,
            &self.held_out,
            es.max_new_tokens,
        )?;
        if es.passes(&f, &unsteered) {
            self.fluent = Some((self.step, snapshot(&self.adapter)?));
            return Ok((f, None));
        }
        let (kept_step, vars) = self
            .fluent
            .clone()
            .ok_or_else(|| Error::invalid("the fluency check has no adapter to go back to"))?;
        let current = self.adapter.named_vars();
        for (name, t) in &vars {
            let (_, v) = current
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::invalid(format!("the LoRA has no variable `{name}`")))?;
            v.set(t)?;
        }
        tracing::info!(
            "control: the fluency check failed at step {} (perplexity {:.2}, limit {:.2}; \
             repeated 4-grams {:.3}, limit {:.3}; distinct answers {:.2}, min {:.2}), e.g. {:?}; \
             keeping the adapter of step {kept_step}",
            self.step,
            f.perplexity,
            es.max_perplexity_ratio * unsteered.perplexity,
            f.repeat_share,
            es.repeat_limit(&unsteered),
            f.distinct_share,
            es.min_distinct_share,
            answers.first().map(String::as_str).unwrap_or_default()
        );
        let stopped = EarlyStopped {
            at_step: self.step,
            kept_step,
            fluency: f.clone(),
            unsteered,
        };
        self.stopped = Some(stopped.clone());
        Ok((f, Some(stopped)))
    }

    fn record(&mut self, stats: &ControlStats) -> Result<()> {
        if let Some(run) = &self.out {
            run.append_metrics(stats)?;
        }
        self.history.push(stats.clone());
        Ok(())
    }

    /// Write the loss curve (`loss.svg`) into `dir`, and with early stopping on, the fluency
    /// checks' scores (`fluency.svg`).
    pub fn plot(&self, dir: &Path) -> Result<PathBuf> {
        let pts: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|s| (s.step as f64, s.loss))
            .collect();
        let series = vec![
            Series::new("control loss", pts.clone(), "#9ecae1"),
            Series::new("smoothed", smooth(&pts, 10), "#3182bd"),
        ];
        let loss = RunDir::new(dir).plot(
            &series,
            "control: decoder loss on the control's answers",
            "loss (nats / answer token)",
        )?;
        let checks: Vec<(f64, &Fluency)> = self
            .history
            .iter()
            .filter_map(|s| Some((s.step as f64, s.fluency.as_ref()?)))
            .collect();
        if !checks.is_empty() {
            let line = |name: &str, f: fn(&Fluency) -> f64, color| {
                Series::new(
                    name,
                    checks.iter().map(|(x, c)| (*x, f(c))).collect(),
                    color,
                )
            };
            write_loss_curve(
                &dir.join("fluency.svg"),
                &[
                    line("repeated 4-grams", |c| c.repeat_share, PALETTE[2]),
                    line("distinct answers", |c| c.distinct_share, PALETTE[0]),
                ],
                "control: fluency on held-out instructions (early stopping)",
                "step",
                "share",
            )?;
        }
        Ok(loss)
    }

    /// Run to the end of the pass; `on_step` may return `false` to stop early. With an output
    /// directory, a checkpoint is written every `checkpoint_every` steps, on an early stop and
    /// at the end.
    pub fn run(&mut self, on_step: impl FnMut(&ControlStats) -> Result<bool>) -> Result<()> {
        run_steps(self, on_step)
    }

    /// Save the steered adapter in PEFT format (f32) with `lqa_control.json` (the control's
    /// prompt, the config and the step).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adapter
            .save_peft(dir, &self.target.name, candle_core::DType::F32)?;
        let meta = serde_json::json!({
            "base_model": self.target.name,
            "control": self.control.prompt,
            "control_file": self.control.file,
            "config": self.config,
            "steps": self.step,
        });
        atomic_write_json(&dir.join("lqa_control.json"), &meta)
    }
}

impl Steps for ControlOptimizer {
    type Stats = ControlStats;

    fn is_done(&self) -> bool {
        ControlOptimizer::is_done(self)
    }

    fn next_step(&mut self) -> Result<ControlStats> {
        self.step()
    }

    fn checkpoint_due(&self, stats: &ControlStats) -> bool {
        every(self.config.checkpoint_every, stats.step)
    }

    fn save_point(&mut self) -> Result<()> {
        if let Some(dir) = self.out_dir().map(Path::to_path_buf) {
            self.checkpoint()?;
            self.plot(&dir)?;
        }
        Ok(())
    }
}

impl StepRecord for ControlStats {
    fn step(&self) -> usize {
        self.step
    }
}
