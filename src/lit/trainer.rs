//! The LIT training loop: a LoRA decoder learns to answer questions about a frozen target's
//! activations (the paper's `lit/train.py`), with length-bucketed batches, a read layer sampled
//! per step, AdamW + cosine schedule with warm-up, gradient accumulation and clipping, optional
//! EMA, evaluation on labels held out by behaviour, atomic checkpoints that resume exactly,
//! metrics as JSONL and a loss-curve SVG.

use crate::latentqa::format::{decoder_prompt, layer_question, read_prompt};
use crate::latentqa::loss::{latentqa_loss, LossConfig, PatchedBatch, PatchedExample};
use crate::latentqa::{DecoderPrompt, Injection, Labels, LayerPlan, ReadPrompt};
use crate::lit::data::{Batcher, DataOptions, Example, LabelSplit, LitData, Position};
use crate::lit::mixture::{self, Kind, MixtureConfig};
use crate::lm::LanguageModel;
use crate::lora::{Adapter, LoraConfig};
use crate::model::{Dropout, Model};
use crate::rng::SplitMix64;
use crate::train::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWParams, Ema, GradAccumulator};
use crate::train::plot::{smooth, Series};
use crate::train::run::{
    check_resume_config, every, run_steps, RunDir, StepRecord, Steps, STATE_FILE,
};
use crate::util::atomic_write_json;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything a run is configured by. Saved in each checkpoint; a resumed run uses the saved one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// A folder of LatentQA data (control.json, stimulus.json, system.json, qa.json).
    pub data_dir: PathBuf,
    /// Where checkpoints, metrics, the plot and the final adapter go.
    pub out_dir: PathBuf,
    /// Items per file (for quick runs); all when `None`.
    pub limit: Option<usize>,
    /// Fraction of behaviour labels held out for evaluation.
    pub eval_fraction: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Total optimizer steps (the schedule's length); `epochs` sets it when `None`.
    pub max_steps: Option<usize>,
    pub epochs: f64,
    pub min_lr_ratio: f64,
    pub clip: f64,
    /// EMA decay of the adapter weights (evaluation and the final adapter use the EMA).
    pub ema: Option<f64>,
    /// The read layer of a step is drawn from `min_read_layer..=max_read_layer` (the paper's
    /// way; the prompts do not name it), unless `read_layers` is set.
    pub min_read_layer: usize,
    pub max_read_layer: usize,
    /// The read layers to train on (a step draws one). With more than one, every decoder
    /// prompt names the layer its activations come from (`"Layer: L"`, Activation Oracles'
    /// form) and the decoder can be asked about any of them. Empty: the range above.
    #[serde(default)]
    pub read_layers: Vec<usize>,
    pub write_layer: usize,
    /// How activations enter the decoder at `write_layer`.
    #[serde(default)]
    pub injection: Injection,
    /// Contrast reading (see [`LayerPlan::contrast`]): masked items give the decoder what the
    /// masked turns changed in the stimulus's activations.
    #[serde(default)]
    pub contrast: bool,
    /// What the training set is drawn from, and at which weights.
    #[serde(default)]
    pub mixture: MixtureConfig,
    pub lora: LoraConfig,
    pub eval_every: usize,
    /// Evaluation batches (all of the held-out split when `None`).
    pub eval_batches: Option<usize>,
    pub checkpoint_every: usize,
    /// Examples whose read + decoder prompts exceed this many tokens are skipped.
    pub max_tokens: usize,
    /// Recompute each block in the backward pass instead of keeping its intermediates
    /// ([`crate::model::recompute`]): less memory, one more block forward each.
    #[serde(default)]
    pub recompute: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data_dir: crate::assets::latentqa_data(),
            out_dir: PathBuf::from("runs/decoder"),
            limit: None,
            eval_fraction: 0.1,
            seed: 42,
            batch_size: 4,
            grad_accum: 1,
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_steps: 50,
            max_steps: None,
            epochs: 1.0,
            min_lr_ratio: 0.0,
            clip: 1.0,
            ema: None,
            min_read_layer: 15,
            max_read_layer: 15,
            read_layers: Vec::new(),
            write_layer: 0,
            injection: Injection::Replace,
            contrast: false,
            mixture: MixtureConfig::default(),
            lora: LoraConfig::paper_decoder(),
            eval_every: 100,
            eval_batches: None,
            checkpoint_every: 100,
            max_tokens: 1024,
            recompute: false,
        }
    }
}

impl TrainConfig {
    /// The read layers a step draws from, ascending.
    pub fn read_layer_set(&self) -> Vec<usize> {
        if self.read_layers.is_empty() {
            (self.min_read_layer..=self.max_read_layer).collect()
        } else {
            let mut l = self.read_layers.clone();
            l.sort_unstable();
            l.dedup();
            l
        }
    }

    /// Whether decoder prompts name the read layer (more than one in `read_layers`).
    pub fn names_layers(&self) -> bool {
        self.read_layer_set().len() > 1 && !self.read_layers.is_empty()
    }

    /// The read layer evaluation uses and the saved decoder reads by default: the middle of
    /// the set.
    pub fn eval_read_layer(&self) -> usize {
        let l = self.read_layer_set();
        l[(l.len() - 1) / 2]
    }
}

/// One tokenized training example: the read prompt, and its decoder prompt for each read
/// layer (one when the prompts do not name the layer).
#[derive(Clone)]
struct Prepared {
    read: ReadPrompt,
    decoders: Vec<DecoderPrompt>,
    /// Read + decoder tokens (the longest decoder prompt).
    len: usize,
}

impl Prepared {
    /// The example as patched when reading layer slot `slot`.
    fn example(&self, slot: usize) -> Result<PatchedExample> {
        let d = &self.decoders[slot.min(self.decoders.len() - 1)];
        PatchedExample::new(self.read.clone(), d.clone())
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub read_layer: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub epoch: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// Saved alongside the adapter and optimizer state.
#[derive(Serialize, Deserialize)]
struct TrainState {
    step: usize,
    next: Position,
    config: TrainConfig,
    split: LabelSplit,
    base_model: String,
}

pub struct Trainer {
    pub config: TrainConfig,
    target: Arc<LanguageModel>,
    decoder: Model,
    adapter: Adapter,
    opt: AdamW,
    ema: Option<Ema>,
    train: Vec<Prepared>,
    eval: Vec<Prepared>,
    batcher: Batcher,
    split: LabelSplit,
    next: Position,
    step: usize,
    total_steps: usize,
    history: Vec<StepStats>,
    /// Where metrics, the plot and checkpoints go.
    run: RunDir,
    counts: KindCounts,
}

/// How many examples of each kind of data a run trains and evaluates on (by
/// [`mixture::Kind::name`]), before the token limit.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindCounts {
    pub train: BTreeMap<&'static str, usize>,
    pub eval: BTreeMap<&'static str, usize>,
}

/// The mixture's extra examples (context prediction, classification), for the kinds whose
/// weight is above 0. Context passages: the configured files and the LatentQA data's control
/// replies.
fn extra_examples(config: &TrainConfig, data: &LitData) -> Result<Vec<Example>> {
    let m = &config.mixture;
    let mut out = Vec::new();
    if m.context > 0.0 {
        for f in &m.context_files {
            let passages = mixture::load_passages(f)?;
            out.extend(mixture::context_examples(&passages, f, m, config.seed));
        }
        let replies: Vec<String> = data
            .items
            .iter()
            .filter(|i| i.kind == crate::lit::data::ItemKind::Stimulus)
            .filter_map(|i| i.read.messages.get(1).map(|m| m.content.clone()))
            .collect();
        let source = config.data_dir.join("stimulus.json");
        out.extend(mixture::context_examples(&replies, &source, m, config.seed));
    }
    if m.classification > 0.0 {
        out.extend(mixture::classification_examples(
            &m.classification_file,
            config.seed,
        )?);
    }
    Ok(out)
}

/// Tokenize `examples`: one decoder prompt per entry of `named` (the read layer the question
/// names, or `None`); examples longer than `max_tokens` are skipped.
fn prepare(
    lm: &LanguageModel,
    examples: &[Example],
    max_tokens: usize,
    named: &[Option<usize>],
) -> Result<Vec<Prepared>> {
    let template = lm.template()?;
    let tok = &lm.tokenizer;
    let mut cache: std::collections::HashMap<
        *const crate::lit::data::DataItem,
        crate::latentqa::format::ReadPrompt,
    > = Default::default();
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let key = Arc::as_ptr(&e.item);
        let read = match cache.get(&key) {
            Some(r) => r.clone(),
            None => {
                let r = read_prompt(template, tok, &e.item.read).map_err(|err| {
                    Error::bad_file(&e.item.file, format!("item {}: {err}", e.item.index))
                })?;
                cache.insert(key, r.clone());
                r
            }
        };
        let decoders = named
            .iter()
            .map(|&layer| {
                decoder_prompt(
                    template,
                    tok,
                    read.n_patch(),
                    &[(layer_question(layer, &e.question), e.answer.clone())],
                    Labels::AllAssistantTurns,
                    false,
                )
                .map_err(|err| {
                    Error::bad_file(&e.item.file, format!("item {}: {err}", e.item.index))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let len = read.ids.len() + decoders.iter().map(|d| d.ids.len()).max().unwrap_or(0);
        if len > max_tokens {
            continue;
        }
        let p = Prepared {
            read,
            decoders,
            len,
        };
        p.example(0)?; // checked once here
        out.push(p);
    }
    Ok(out)
}

impl Trainer {
    /// A new run writing into `config.out_dir`.
    pub fn new(target: Arc<LanguageModel>, config: TrainConfig) -> Result<Self> {
        Self::open(target, config, false)
    }

    /// The continuation of the run checkpointed in `config.out_dir` (a new run if there is no
    /// checkpoint). The config must be the one the checkpoint was made with, but for
    /// `out_dir`, `checkpoint_every`, `eval_every` and `recompute`: a differing field is an
    /// error naming it.
    pub fn resume(target: Arc<LanguageModel>, config: TrainConfig) -> Result<Self> {
        Self::open(target, config, true)
    }

    /// [`Trainer::new`] or, with `resume`, [`Trainer::resume`].
    pub fn open(target: Arc<LanguageModel>, config: TrainConfig, resume: bool) -> Result<Self> {
        let run = RunDir::new(&config.out_dir);
        let state: Option<TrainState> = if resume {
            let state = run.read_state("LIT")?;
            if state.is_none() {
                tracing::warn!(
                    "no checkpoint in {}: starting a new run",
                    config.out_dir.display()
                );
            }
            state
        } else {
            None
        };
        let ck = run.checkpoint_dir();
        let config = match &state {
            Some(s) => {
                check_resume_config(&ck.join(STATE_FILE), &s.config, &config, RESUME_MAY_CHANGE)?;
                TrainConfig {
                    out_dir: config.out_dir.clone(),
                    checkpoint_every: config.checkpoint_every,
                    eval_every: config.eval_every,
                    recompute: config.recompute,
                    ..s.config.clone()
                }
            }
            None => config,
        };
        let n_layers = target.model.n_layers();
        if config.read_layers.is_empty() && config.min_read_layer > config.max_read_layer {
            return Err(Error::invalid(format!(
                "min_read_layer {} is above max_read_layer {}",
                config.min_read_layer, config.max_read_layer
            )));
        }
        let layers = config.read_layer_set();
        if layers.iter().any(|&l| l >= n_layers) || config.write_layer >= n_layers {
            return Err(Error::invalid(format!(
                "read layers {layers:?} / write layer {} do not fit a model of {n_layers} layers",
                config.write_layer
            )));
        }
        crate::latentqa::layers::check_write_layer(config.write_layer, n_layers)?;
        config.mixture.validate()?;
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::invalid("batch_size and grad_accum must be > 0"));
        }
        let data = LitData::load_dir(
            &config.data_dir,
            &DataOptions {
                limit: config.limit,
                ..Default::default()
            },
        )?;
        let extra = extra_examples(&config, &data)?;
        let split = match &state {
            Some(s) => s.split.clone(),
            None => {
                let mut split = data.split_labels(config.eval_fraction, config.seed)?;
                mixture::split_extra(&extra, config.eval_fraction, config.seed, &mut split);
                split
            }
        };
        if state.is_none() {
            std::fs::create_dir_all(&config.out_dir).map_err(|e| Error::io(&config.out_dir, e))?;
            split.save(&config.out_dir.join("split.json"))?;
        }
        let (lqa_train, mut eval_ex) = data.split_with(&split);
        let mut pools: BTreeMap<Kind, Vec<Example>> = BTreeMap::new();
        pools.insert(Kind::LatentQa, lqa_train);
        for e in extra {
            if split.eval.contains(&e.item.label) {
                eval_ex.push(e);
            } else {
                pools.entry(Kind::of(&e)).or_default().push(e);
            }
        }
        let train_ex = mixture::compose(&pools, &config.mixture, config.seed)?;
        let counts = KindCounts {
            train: mixture::counts(&train_ex),
            eval: mixture::counts(&eval_ex),
        };
        let named: Vec<Option<usize>> = if config.names_layers() {
            layers.iter().map(|&l| Some(l)).collect()
        } else {
            vec![None]
        };
        let train = prepare(&target, &train_ex, config.max_tokens, &named)?;
        let eval = prepare(&target, &eval_ex, config.max_tokens, &named)?;
        if train.is_empty() {
            return Err(Error::invalid(format!(
                "{}: no training examples (after the split and the {}-token limit)",
                config.data_dir.display(),
                config.max_tokens
            )));
        }
        let batcher = Batcher::new(
            train.iter().map(|p| p.len).collect(),
            config.batch_size,
            config.seed,
        )?;
        let per_epoch = batcher.batches_per_epoch().div_ceil(config.grad_accum);
        let total_steps = config
            .max_steps
            .unwrap_or(((per_epoch as f64) * config.epochs).ceil() as usize)
            .max(1);
        let mut decoder = target.model.clone();
        let (adapter, opt_state) = match &state {
            Some(_) => (
                Adapter::load_peft(&ck.join("adapter"), &decoder)?,
                Some(ck.join("optimizer.safetensors")),
            ),
            None => (
                Adapter::new(&decoder, config.lora.clone(), config.seed)?,
                None,
            ),
        };
        adapter.attach(&mut decoder)?;
        let mut opt = AdamW::new(
            adapter.named_vars(),
            AdamWParams {
                lr: config.lr,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        if let Some(p) = opt_state {
            opt.load(&p)?;
        }
        let mut ema = config
            .ema
            .map(|d| Ema::new(&adapter.named_vars(), d))
            .transpose()?;
        if let (Some(e), Some(_)) = (ema.as_mut(), &state) {
            let p = ck.join("ema.safetensors");
            let t = candle_core::safetensors::load(&p, target.model.device())
                .map_err(|e| Error::bad_file(&p, e))?;
            e.load_state(&t)?;
        }
        let step = state.as_ref().map(|s| s.step).unwrap_or(0);
        let history = if state.is_some() {
            run.resume_metrics(step)?
        } else {
            run.start()?;
            Vec::new()
        };
        Ok(Trainer {
            counts,
            next: state.as_ref().map(|s| s.next).unwrap_or_default(),
            split,
            config,
            target,
            decoder,
            adapter,
            opt,
            ema,
            train,
            eval,
            batcher,
            step,
            total_steps,
            history,
            run,
        })
    }

    pub fn step_count(&self) -> usize {
        self.step
    }
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }
    pub fn n_train(&self) -> usize {
        self.train.len()
    }
    pub fn n_eval(&self) -> usize {
        self.eval.len()
    }
    /// Examples per kind of data, in training and in evaluation.
    pub fn kind_counts(&self) -> &KindCounts {
        &self.counts
    }
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
    pub fn decoder(&self) -> &Model {
        &self.decoder
    }
    pub fn history(&self) -> &[StepStats] {
        &self.history
    }
    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps
    }

    fn loss_config(&self, read_layer: usize, dropout: Option<Dropout>) -> LossConfig {
        LossConfig {
            layers: LayerPlan::new(read_layer, self.config.write_layer)
                .injecting(self.config.injection)
                .contrasting(self.config.contrast),
            pad_id: self.target.pad_id(),
            differentiable: dropout.is_some(),
            grad_through_target: false,
            use_first_from: true,
            dropout,
            recompute: self.config.recompute && dropout.is_some(),
        }
    }

    /// The batch of examples `idx` of `set`, its decoder prompts those of layer slot `slot`.
    fn batch(&self, set: &[Prepared], idx: &[usize], slot: usize) -> Result<PatchedBatch> {
        PatchedBatch::new(
            idx.iter()
                .map(|&i| set[i].example(slot))
                .collect::<Result<_>>()?,
        )
    }

    /// One optimizer step (`grad_accum` micro-batches).
    pub fn step(&mut self) -> Result<StepStats> {
        crate::threads::hot(|| self.step_here())
    }

    fn step_here(&mut self) -> Result<StepStats> {
        let t0 = Instant::now();
        let mut rng = SplitMix64::derive(self.config.seed, self.step as u64);
        let layers = self.config.read_layer_set();
        let slot = rng.below(layers.len() as u64) as usize;
        let read_layer = layers[slot];
        let vars = self.adapter.vars();
        let mut acc = GradAccumulator::new(&vars);
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let mut epoch = self.next.epoch;
        for micro in 0..self.config.grad_accum {
            crate::interrupt::check()?;
            let (pos, idx) = self
                .batcher
                .iter_from(self.next)
                .next()
                .ok_or_else(|| Error::invalid("the batcher is empty"))?;
            epoch = pos.epoch;
            self.next = Position {
                epoch: pos.epoch,
                batch: pos.batch + 1,
            };
            let batch = self.batch(&self.train, &idx, slot)?;
            let dropout = Dropout {
                seed: rng.next_u64() ^ micro as u64,
            };
            let out = latentqa_loss(
                &self.target.model,
                &self.decoder,
                &batch,
                &self.loss_config(read_layer, Some(dropout)),
            )?;
            let l = (out.loss / self.config.grad_accum as f64)?;
            loss_sum += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            tokens += idx.iter().map(|&i| self.train[i].len).sum::<usize>();
            acc.add(&crate::model::recompute::backward(&l)?)?;
        }
        crate::train::run::check_finite_loss("LIT", self.step + 1, loss_sum)?;
        let mut grads = acc.finish(1.0)?;
        let grad_norm = clip_grad_norm(&mut grads, &vars, self.config.clip)?;
        let lr = cosine_lr(
            self.step,
            self.config.lr,
            self.config.warmup_steps,
            self.total_steps,
            self.config.min_lr_ratio,
        );
        self.opt.set_lr(lr);
        self.opt.step(&grads)?;
        if let Some(e) = self.ema.as_mut() {
            e.update()?;
        }
        self.step += 1;
        let stats = StepStats {
            step: self.step,
            loss: loss_sum,
            lr,
            grad_norm,
            read_layer,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
            epoch,
            eval_loss: None,
        };
        Ok(stats)
    }

    /// Mean loss per label token on the held-out labels (EMA weights when EMA is on), at the
    /// middle of the read-layer range, no dropout.
    pub fn evaluate(&mut self) -> Result<f64> {
        if self.eval.is_empty() {
            return Err(Error::invalid(
                "no held-out examples to evaluate on (eval_fraction is 0?)",
            ));
        }
        if let Some(e) = self.ema.as_mut() {
            e.swap()?;
        }
        let res = self.eval_loss();
        if let Some(e) = self.ema.as_mut() {
            e.swap()?;
        }
        res
    }

    fn eval_loss(&self) -> Result<f64> {
        let read_layer = self.config.eval_read_layer();
        let slot = self
            .config
            .read_layer_set()
            .iter()
            .position(|&l| l == read_layer)
            .unwrap_or(0);
        let cfg = self.loss_config(read_layer, None);
        let eval_batcher = Batcher::new(
            self.eval.iter().map(|p| p.len).collect(),
            self.config.batch_size,
            0,
        )?;
        let batches = eval_batcher.epoch(0);
        let take = self
            .config
            .eval_batches
            .unwrap_or(batches.len())
            .min(batches.len());
        let (mut sum, mut n) = (0.0, 0usize);
        for idx in batches.iter().take(take) {
            crate::interrupt::check()?;
            let batch = self.batch(&self.eval, idx, slot)?;
            let out = latentqa_loss(&self.target.model, &self.decoder, &batch, &cfg)?;
            let l = out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            sum += l * out.n_label_tokens as f64;
            n += out.n_label_tokens;
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Record a step's stats (JSONL) and keep them for the plot.
    pub fn record(&mut self, stats: &StepStats) -> Result<()> {
        self.run.append_metrics(stats)?;
        self.history.push(stats.clone());
        Ok(())
    }

    /// Write the loss curve (train, smoothed, and eval) as SVG.
    pub fn plot(&self) -> Result<PathBuf> {
        let train: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|s| (s.step as f64, s.loss))
            .collect();
        let eval: Vec<(f64, f64)> = self
            .history
            .iter()
            .filter_map(|s| s.eval_loss.map(|e| (s.step as f64, e)))
            .collect();
        let series = vec![
            Series::new("train", train.clone(), "#9ecae1"),
            Series::new("train (smoothed)", smooth(&train, 25), "#3182bd"),
            Series::new("eval (held-out labels)", eval, "#e6550d"),
        ];
        self.run
            .plot(&series, "LIT: decoder loss", "loss (nats / label token)")
    }

    /// Write a checkpoint atomically: adapter (f32), optimizer, EMA, state. The previous
    /// checkpoint is replaced only once the new one is complete.
    pub fn checkpoint(&self) -> Result<PathBuf> {
        self.run.write_checkpoint(|tmp| {
            self.adapter.save_peft(
                &tmp.join("adapter"),
                &self.target.name,
                candle_core::DType::F32,
            )?;
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            if let Some(e) = &self.ema {
                let p = tmp.join("ema.safetensors");
                candle_core::safetensors::save(&e.state_tensors(), &p)
                    .map_err(|e| Error::bad_file(&p, e))?;
            }
            let state = TrainState {
                step: self.step,
                next: self.next,
                config: self.config.clone(),
                split: self.split.clone(),
                base_model: self.target.name.clone(),
            };
            atomic_write_json(&tmp.join(STATE_FILE), &state)
        })
    }

    /// Save the adapter (EMA weights when EMA is on) in PEFT format, e.g. bf16 to ship.
    pub fn save_adapter(&mut self, dir: &Path, dtype: candle_core::DType) -> Result<()> {
        if let Some(e) = self.ema.as_mut() {
            e.swap()?;
        }
        let res = self.adapter.save_peft(dir, &self.target.name, dtype);
        if let Some(e) = self.ema.as_mut() {
            e.swap()?;
        }
        res?;
        let c = &self.config;
        let read_layers = if c.names_layers() {
            c.read_layer_set()
        } else {
            vec![c.eval_read_layer()]
        };
        let mut meta = crate::latentqa::decoder::DecoderMeta::new(
            &self.target.name,
            &read_layers,
            c.write_layer,
            c.injection,
        );
        meta.layers.contrast = c.contrast;
        atomic_write_json(&dir.join(crate::latentqa::decoder::META_FILE), &meta)?;
        self.save_record(&dir.join("training"))
    }

    /// The training record that ships with a decoder: the config, the label split, the
    /// examples per kind, the metrics and the loss curve (the run folder's copies).
    fn save_record(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        atomic_write_json(&dir.join("config.json"), &self.config)?;
        atomic_write_json(&dir.join("split.json"), &self.split)?;
        atomic_write_json(&dir.join("kinds.json"), &self.counts)?;
        self.plot()?;
        for f in ["metrics.jsonl", "loss.svg"] {
            let from = self.run.path().join(f);
            if from.exists() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::util::atomic_write(&dir.join(f), &bytes)?;
            }
        }
        Ok(())
    }

    /// Train to the end: evaluation, checkpoints, metrics and plot on their schedules.
    /// `on_step` sees every step's stats and may return `false` to stop early (a checkpoint is
    /// written).
    pub fn train(&mut self, on_step: impl FnMut(&StepStats) -> Result<bool>) -> Result<()> {
        run_steps(self, on_step)
    }
}

/// Fields a resumed run may change: where the run is (a moved run folder resumes), how often it
/// checkpoints and evaluates, and whether blocks are recomputed (the same steps with less
/// memory: a run that ran out of memory resumes with it).
const RESUME_MAY_CHANGE: &[&str] = &["out_dir", "checkpoint_every", "eval_every", "recompute"];

impl Steps for Trainer {
    type Stats = StepStats;

    fn is_done(&self) -> bool {
        Trainer::is_done(self)
    }

    fn next_step(&mut self) -> Result<StepStats> {
        let mut stats = self.step()?;
        if every(self.config.eval_every, stats.step) || (self.is_done() && !self.eval.is_empty()) {
            stats.eval_loss = Some(self.evaluate()?);
        }
        self.record(&stats)?;
        Ok(stats)
    }

    fn checkpoint_due(&self, stats: &StepStats) -> bool {
        every(self.config.checkpoint_every, stats.step)
    }

    fn save_point(&mut self) -> Result<()> {
        self.checkpoint()?;
        self.plot()?;
        Ok(())
    }
}

impl StepRecord for StepStats {
    fn step(&self) -> usize {
        self.step
    }
}
