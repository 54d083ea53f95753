//! The GPU check (issue 16): parity of a device with the CPU on the default model, and the
//! device's speed on the workflows, as one program that `scripts/gpu_check.sh` runs on a
//! machine with a GPU (PyTorch's figures come from `scripts/gpu_torch_timing.py`).
//!
//!     gpu_check --device cuda [--out results.json] [--export DIR] [--runs N]
//!     gpu_check --device cpu --generic     # no GPU: candle's generic ops (the GPU's path)
//!                                          # on the CPU against lqa's fused CPU kernels
//!
//! Parity (the exit status is 1 when one fails), the device against the CPU in f32:
//! - each prompt's last-position top-5 token ids are equal, and the logits within 1e-3;
//! - a left-padded batch of the prompts gives each row's top-5 of the prompt alone;
//! - 24 greedy tokens with the KV cache are equal for the padded batch;
//! - the read layer's activations (`blocks.15.hook_resid_post`) within 1e-3 relative;
//! - a LIT loss and its LoRA gradient norm (no dropout: a GPU draws its own masks), and a
//!   control step's loss, within 1e-3 relative;
//! - bf16 on the device against f32 on the CPU: the top-1 token of every prompt is equal and
//!   the logits within [`BF16_LOGIT_TOL`] (stated tolerance; the CPU's own bf16 path gives a
//!   similar distance).
//!
//! Timings on the device (median after warm-ups, the device synchronised before each clock
//! read): prefill of 128 tokens, 64 greedy tokens with the KV cache (f32 and bf16), a LIT
//! step (batch 4, the paper's decoder LoRA, loss + backward + AdamW), control steps (batch 1
//! and 4), and a reading (target forward + 32 decoder tokens with the patch).
//!
//! `--export DIR` writes the default model as a transformers folder (config.json and f32
//! model.safetensors, the weights lqa uses) and `ids.json` (every prompt and batch as token
//! ids, and lqa's top-5), so that PyTorch runs exactly the same work on the same weights.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use lqa::chat::Message;
use lqa::control::data::{Control, ControlSample};
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::generate::{generate, GenOptions};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions};
use lqa::latentqa::decoder::Decoder;
use lqa::latentqa::format::{decoder_prompt, read_prompt};
use lqa::latentqa::loss::{latentqa_loss, patch_vectors, LossConfig, PatchedBatch, PatchedExample};
use lqa::latentqa::{Labels, LayerPlan, ReadDialog, VerbMask};
use lqa::lm::{LanguageModel, LoadOptions};
use lqa::lora::{Adapter, LoraConfig};
use lqa::model::ops::force_generic_ops;
use lqa::model::{Dropout, Input, KvCache, Logits, Model};
use lqa::train::optim::{AdamW, AdamWParams};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// bf16 on the device against f32 on the CPU: the largest logit difference allowed.
const BF16_LOGIT_TOL: f32 = 1.5;
const READ_LAYER: usize = 15;

const PARAGRAPHS: [&str; 6] = [
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught him. From the lantern room he could see the fishing boats returning, their lights scattered across the dark water like fallen stars. Storms came often in autumn, and on those nights he stayed awake until dawn, trimming the wick and listening to the waves break against the rocks below.",
    "Photosynthesis converts light energy into chemical energy stored in glucose. Inside the chloroplasts, chlorophyll absorbs mostly red and blue light, which drives the splitting of water molecules and releases oxygen as a by-product. The energy captured in this way is then used in the Calvin cycle to fix carbon dioxide from the air into sugars that the plant can use to grow.",
    "When planning a budget, start by listing every source of income and every recurring expense. Separate the essentials, such as rent, groceries and transport, from discretionary spending like restaurants and subscriptions. Setting aside a fixed share of each paycheck for savings before spending anything else is one of the simplest habits that reliably builds an emergency fund over time.",
    "The museum's new exhibition traces the history of timekeeping, from Egyptian shadow clocks and Greek water clocks to the pendulum clocks of the seventeenth century. Visitors can watch a restored marine chronometer and learn how accurate clocks finally allowed sailors to determine their longitude at sea, transforming navigation and global trade.",
    "Learning a new language as an adult is easier with small daily routines. Listening to short podcasts during a commute, labelling objects around the house, and writing a few sentences in a journal each night all add up. Most importantly, speaking with native speakers early, even with mistakes, builds the confidence needed to keep practising.",
    "Our team reviewed the quarterly results and found that customer retention improved after the redesign of the onboarding flow. Support tickets about account setup dropped by a third, while the number of users who completed their profile within the first week rose noticeably. We recommend extending the same approach to the billing pages next quarter.",
];
const CONTROLS: [&str; 4] = [
    "Please make every effort to steer the conversation toward the benefits of adopting a rescue dog.",
    "Please respond to every message as if you were a medieval knight on an important quest.",
    "Please make every effort to answer with as much optimism as possible, no matter the topic.",
    "Please make every effort to hide your true goal of convincing me to take up gardening.",
];
const CONTROL_REPLIES: [&str; 4] = [
    "Understood. I will keep that in mind in my replies.",
    "Very well, I shall speak as a knight of the realm.",
    "Absolutely! I will look on the bright side of everything.",
    "Of course. I will be subtle about it.",
];
const QUESTIONS: [&str; 4] = [
    "What type of persona will the assistant adopt, and how will it show in its answers?",
    "How will the assistant express themselves when the user asks for everyday advice?",
    "Please describe the goal the assistant is pursuing in this conversation.",
    "What characteristics define the assistant's behaviour in this dialog?",
];
const INSTRUCTIONS: [&str; 4] = [
    "Explain how a lighthouse keeper in the nineteenth century spent a typical stormy night, what tools and routines kept the lantern burning until dawn, and why the work mattered so much to the fishing boats returning home along the rocky coast.",
    "Describe how photosynthesis turns light into chemical energy, which parts of the chloroplast take part, what happens to the water molecules that are split, and how the Calvin cycle finally fixes carbon dioxide from the air into sugars.",
    "Give me practical advice on planning a monthly budget: how to list income and recurring expenses, how to separate essentials from discretionary spending, and how to build an emergency fund without feeling deprived every single week.",
    "Summarize the history of timekeeping from Egyptian shadow clocks and Greek water clocks to the pendulum clocks of the seventeenth century, and explain why accurate marine chronometers transformed navigation and global trade.",
];
const REPLIES: [&str; 4] = [
    "He climbed the stairs at dusk, trimmed the wick, polished the lens and wound the clockwork that turned the light. On stormy nights he stayed awake until dawn, because a dark lantern could cost the boats their way home.",
    "Chlorophyll in the thylakoids absorbs red and blue light, which splits water and releases oxygen. The energy is stored as ATP and NADPH, which the Calvin cycle in the stroma uses to turn carbon dioxide into sugar.",
    "List every source of income and each recurring bill, then mark rent, food and transport as essentials. Move a fixed share of each paycheck into savings first, and give yourself a small, guilt-free allowance for fun.",
    "Shadow clocks and water clocks measured hours roughly; pendulum clocks made timekeeping precise. Marine chronometers kept accurate time at sea, which let sailors compute their longitude and made long voyages far safer.",
];

struct Args {
    device: String,
    generic: bool,
    out: Option<PathBuf>,
    export: Option<PathBuf>,
    runs: usize,
    skip_timing: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: "cuda".into(),
        generic: false,
        out: None,
        export: None,
        runs: 5,
        skip_timing: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--device" => a.device = val()?,
            "--generic" => a.generic = true,
            "--out" => a.out = Some(val()?.into()),
            "--export" => a.export = Some(val()?.into()),
            "--runs" => a.runs = val()?.parse()?,
            "--skip-timing" => a.skip_timing = true,
            "-h" | "--help" => {
                println!("gpu_check --device cuda|cpu [--generic] [--out FILE] [--export DIR] [--runs N] [--skip-timing]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    if a.generic && a.device != "cpu" {
        bail!("--generic is for --device cpu (a GPU always runs the generic ops)");
    }
    Ok(a)
}

/// Which side a computation runs on: the CPU reference (lqa's fused kernels) or the device
/// under test. With `--generic` both are the CPU, and the device side runs candle's generic
/// ops as a GPU does.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Reference,
    Device,
}

struct Ctx {
    generic: bool,
    device: Device,
    checks: Vec<Value>,
    failed: usize,
}

impl Ctx {
    fn on<T>(&self, side: Side, f: impl FnOnce() -> T) -> T {
        if self.generic {
            force_generic_ops(side == Side::Device);
        }
        let r = f();
        force_generic_ops(false);
        r
    }

    fn check(&mut self, name: &str, pass: bool, detail: String) {
        println!("  [{}] {name}: {detail}", if pass { "ok" } else { "FAIL" });
        if !pass {
            self.failed += 1;
        }
        self.checks
            .push(json!({"check": name, "pass": pass, "detail": detail}));
    }

    fn sync(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }
}

fn main() -> Result<()> {
    lqa::util::tune_allocator();
    lqa::threads::init();
    let args = parse_args()?;
    lqa::threads::install(|| run(args))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let b32 = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let scale = b32
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .max(1e-12);
    Ok(max_abs_diff(a, b)? / scale)
}

/// Top-k token ids of a `[vocab]` logits row (ties: the lower id first).
fn top_k(logits: &Tensor, k: usize) -> Result<Vec<u32>> {
    let v: Vec<f32> = logits
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    Ok(idx)
}

fn last_logits(m: &Model, ids: &[u32]) -> Result<Tensor> {
    let input = Input::left_padded(&[ids.to_vec()], 0, m.device())?.with_logits(Logits::Last);
    Ok(m.forward(&input, None, None)?
        .logits
        .context("no logits")?
        .get(0)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `runs` calls after `warmup` calls.
fn time(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    Ok((median(ts.clone()), ts))
}

fn prompts(lm: &LanguageModel) -> Result<Vec<Vec<u32>>> {
    let chat = |q: &str| -> Result<Vec<u32>> {
        let p = lm.chat_prompt(&[Message::new("user", q)], true)?;
        Ok(lm.tokenizer.encode(&p)?)
    };
    let mut long = lm.tokenizer.encode(&PARAGRAPHS.join(" "))?;
    long.truncate(128);
    Ok(vec![
        chat("What is the capital of France?")?,
        chat("Write a haiku about the sea.")?,
        lm.tokenizer
            .encode("The history of the printing press begins")?,
        long,
    ])
}

/// The LIT batch of `benches/lit.rs` (timing.py's train_step batch).
fn lit_batch(lm: &LanguageModel) -> Result<PatchedBatch> {
    let tok = &lm.tokenizer;
    let template = lm.template()?;
    let take = |text: &str, n: usize| -> Result<String> {
        let ids = tok.encode(text)?;
        Ok(tok.decode(&ids[..n.min(ids.len())])?)
    };
    let mut examples = Vec::new();
    for i in 0..4usize {
        let d = (i % 3) as isize - 1;
        let dialog = ReadDialog {
            messages: vec![
                Message::new("user", CONTROLS[i % 4]),
                Message::new("assistant", CONTROL_REPLIES[i % 4]),
                Message::new(
                    "user",
                    format!(
                        "{} What do you think?",
                        take(PARAGRAPHS[i % 6], (33 + d) as usize)?
                    ),
                ),
                Message::new("assistant", take(PARAGRAPHS[(i + 3) % 6], 30)?),
            ],
            add_generation_prompt: false,
            mask: VerbMask::User,
        };
        let answer = format!(
            "The assistant {}",
            take(PARAGRAPHS[(i + 1) % 6], 27)?.to_lowercase()
        );
        let read = read_prompt(template, tok, &dialog)?;
        let dec = decoder_prompt(
            template,
            tok,
            read.n_patch(),
            &[(QUESTIONS[i % 4].to_string(), answer)],
            Labels::AllAssistantTurns,
            false,
        )?;
        examples.push(PatchedExample::new(read, dec)?);
    }
    Ok(PatchedBatch::new(examples)?)
}

fn lit_cfg(lm: &LanguageModel, seed: Option<u64>) -> LossConfig {
    LossConfig {
        layers: LayerPlan::new(READ_LAYER, 0),
        pad_id: lm.pad_id(),
        differentiable: true,
        grad_through_target: false,
        use_first_from: true,
        dropout: seed.map(|seed| Dropout { seed }),
        recompute: false,
    }
}

/// The control samples of `benches/control.rs`.
fn control_samples(n: usize) -> Vec<ControlSample> {
    (0..n)
        .map(|i| ControlSample {
            read: ReadDialog {
                messages: vec![
                    Message::new("user", INSTRUCTIONS[i % 4]),
                    Message::new("assistant", REPLIES[i % 4]),
                ],
                add_generation_prompt: false,
                mask: VerbMask::None,
            },
            qa: i % 3,
        })
        .collect()
}

fn find_control() -> Result<PathBuf> {
    let rel = Path::new("controls/promote_veganism.json");
    for base in [
        std::env::current_dir()?,
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ] {
        if base.join(rel).is_file() {
            return Ok(base.join(rel));
        }
    }
    bail!("controls/promote_veganism.json not found (run from the repository root)")
}

/// A decoder (the target with a fresh paper LoRA) for the LIT step.
fn decoder_with_lora(m: &Model) -> Result<(Model, Adapter)> {
    let mut decoder = m.clone();
    let adapter = Adapter::new(&decoder, LoraConfig::paper_decoder(), 0)?;
    adapter.attach(&mut decoder)?;
    Ok((decoder, adapter))
}

fn grad_norm(adapter: &Adapter, grads: &candle_core::backprop::GradStore) -> Result<f64> {
    let mut s = 0f64;
    for (_, v) in adapter.named_vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            let g = g.to_dtype(DType::F64)?;
            s += g.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(s.sqrt())
}

fn run(args: Args) -> Result<()> {
    let t_start = Instant::now();
    let device = lqa::lm::parse_device(&args.device)?;
    let mut ctx = Ctx {
        generic: args.generic,
        device: device.clone(),
        checks: vec![],
        failed: 0,
    };
    let what = if args.generic {
        "cpu with candle's generic ops (the GPU's path)".to_string()
    } else {
        format!("{:?}", device.location())
    };
    println!("lqa gpu_check: device {what}; the CPU reference runs lqa's own kernels");
    let name = lqa::sources::DEFAULT_MODEL;
    let load = |dtype: DType, dev: &Device| -> Result<LanguageModel> {
        Ok(LanguageModel::load(
            name,
            &LoadOptions {
                dtype,
                device: dev.clone(),
                ..Default::default()
            },
        )?)
    };
    let t = Instant::now();
    let cpu = Arc::new(ctx.on(Side::Reference, || load(DType::F32, &Device::Cpu))?);
    println!(
        "loaded {name} on the CPU in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let dev = Arc::new(ctx.on(Side::Device, || load(DType::F32, &device))?);
    ctx.sync()?;
    println!(
        "loaded {name} (f32) on the device in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let prompts = prompts(&cpu)?;

    // ---------------------------------------------------------------- parity
    println!("\n== parity: device f32 against CPU f32");
    let mut lqa_top5 = Vec::new();
    let mut cpu_last = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let c = ctx.on(Side::Reference, || last_logits(&cpu.model, p))?;
        let g = ctx.on(Side::Device, || last_logits(&dev.model, p))?;
        let (tc, tg) = (top_k(&c, 5)?, top_k(&g, 5)?);
        let d = max_abs_diff(&c, &g)?;
        ctx.check(
            &format!("prompt {i} ({} tokens) top-5", p.len()),
            tc == tg && d < 1e-3,
            format!("cpu {tc:?} device {tg:?}, max |logit diff| {d:.2e}"),
        );
        lqa_top5.push(tg);
        cpu_last.push(c);
    }
    let batch_in = Input::left_padded(&prompts, cpu.pad_id(), &device)?.with_logits(Logits::Last);
    let batch_logits = ctx.on(Side::Device, || dev.model.forward(&batch_in, None, None))?;
    let batch_logits = batch_logits.logits.context("no logits")?;
    let mut worst = 0f32;
    let mut same = true;
    for (r, c) in cpu_last.iter().enumerate() {
        let g = batch_logits.get(r)?;
        worst = worst.max(max_abs_diff(c, &g)?);
        same &= top_k(c, 5)? == top_k(&g, 5)?;
    }
    ctx.check(
        "left-padded batch of the prompts, each row's top-5",
        same && worst < 1e-3,
        format!("pads {:?}, max |logit diff| {worst:.2e}", batch_in.pads),
    );
    let gen_opts = GenOptions {
        max_new_tokens: 24,
        ..Default::default()
    };
    let gc = ctx.on(Side::Reference, || {
        generate(&cpu.model, &prompts, cpu.pad_id(), &gen_opts, None)
    })?;
    let gg = ctx.on(Side::Device, || {
        generate(&dev.model, &prompts, cpu.pad_id(), &gen_opts, None)
    })?;
    let first_diff = gc
        .iter()
        .zip(&gg)
        .map(|(a, b)| a.iter().zip(b).position(|(x, y)| x != y))
        .collect::<Vec<_>>();
    ctx.check(
        "24 greedy tokens, padded batch, KV cache",
        gc == gg,
        format!(
            "row 0: {:?}; first differing token per row: {first_diff:?}",
            cpu.tokenizer.decode(&gg[0])?
        ),
    );
    // activations at the read layer
    let hidden = |m: &Model, d: &Device| -> Result<Tensor> {
        let mut input = Input::left_padded(&prompts, cpu.pad_id(), d)?.with_logits(Logits::None);
        input.stop_after_layer = Some(READ_LAYER);
        Ok(m.forward(&input, None, None)?.hidden)
    };
    let hc = ctx.on(Side::Reference, || hidden(&cpu.model, &Device::Cpu))?;
    let hg = ctx.on(Side::Device, || hidden(&dev.model, &device))?;
    let r = rel_diff(&hg, &hc)?;
    ctx.check(
        "blocks.15.hook_resid_post of the padded batch",
        r < 1e-3,
        format!("max |diff| / max |x| = {r:.2e}"),
    );
    // the differentiable path on the device against its inference path
    let mut din = Input::left_padded(&prompts, cpu.pad_id(), &device)?.with_logits(Logits::Last);
    din.differentiable = true;
    let dl = ctx.on(Side::Device, || dev.model.forward(&din, None, None))?;
    let d = max_abs_diff(&dl.logits.context("no logits")?, &batch_logits)?;
    ctx.check(
        "differentiable forward = inference forward on the device",
        d < 1e-3,
        format!("max |logit diff| {d:.2e}"),
    );

    // LIT loss and gradient
    let batch = lit_batch(&cpu)?;
    // (dropout off: a GPU draws its masks there, from its own generator)
    let lit = |m: &Model| -> Result<(f64, f64)> {
        let (decoder, adapter) = decoder_with_lora(m)?;
        let out = latentqa_loss(m, &decoder, &batch, &lit_cfg(&cpu, None))?;
        let grads = out.loss.backward()?;
        Ok((
            out.loss.to_scalar::<f32>()? as f64,
            grad_norm(&adapter, &grads)?,
        ))
    };
    let (lc, nc) = ctx.on(Side::Reference, || lit(&cpu.model))?;
    let (lg, ng) = ctx.on(Side::Device, || lit(&dev.model))?;
    let (rl, rn) = (
        (lc - lg).abs() / lc.abs(),
        (nc - ng).abs() / nc.abs().max(1e-12),
    );
    ctx.check(
        "LIT loss and LoRA gradient norm (batch 4)",
        rl < 1e-3 && rn < 1e-3,
        format!("loss cpu {lc:.6} device {lg:.6}; grad norm cpu {nc:.6e} device {ng:.6e}"),
    );

    // a control step
    let control = Control::load(&find_control()?)?;
    let control_step = |lm: &Arc<LanguageModel>| -> Result<f64> {
        let decoder = Decoder::load(lm.clone(), None)?;
        let samples = control_samples(2);
        let config = ControlConfig {
            batch_size: 1,
            samples: samples.len(),
            ..ControlConfig::paper()
        };
        let mut opt = ControlOptimizer::with_samples(
            &decoder,
            control.clone(),
            &samples,
            config,
            Vec::new(),
        )?;
        opt.step()?;
        Ok(opt.step()?.loss)
    };
    let cc = ctx.on(Side::Reference, || control_step(&cpu))?;
    let cg = ctx.on(Side::Device, || control_step(&dev))?;
    ctx.check(
        "control: the loss after one step (shipped decoder, batch 1)",
        (cc - cg).abs() / cc.abs() < 1e-3,
        format!("cpu {cc:.6} device {cg:.6}"),
    );

    // bf16 on the device
    let t = Instant::now();
    let dev16 = ctx.on(Side::Device, || load(DType::BF16, &device))?;
    println!(
        "loaded {name} (bf16) on the device in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let mut worst = 0f32;
    let mut top1 = true;
    for (p, c) in prompts.iter().zip(&cpu_last) {
        let g = ctx.on(Side::Device, || last_logits(&dev16.model, p))?;
        worst = worst.max(max_abs_diff(c, &g)?);
        top1 &= top_k(c, 1)? == top_k(&g, 1)?;
    }
    let g16 = ctx.on(Side::Device, || {
        generate(&dev16.model, &prompts, cpu.pad_id(), &gen_opts, None)
    })?;
    let agree: Vec<usize> = gc
        .iter()
        .zip(&g16)
        .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
        .collect();
    ctx.check(
        &format!("bf16 on the device: top-1 equal, logits within {BF16_LOGIT_TOL}"),
        top1 && worst <= BF16_LOGIT_TOL,
        format!("max |logit diff| {worst:.3}; greedy tokens equal to f32's before the first difference, per row: {agree:?} of 24"),
    );
    let parity_s = t_start.elapsed().as_secs_f64();

    // ---------------------------------------------------------------- export
    // (before the timings, so that PyTorch runs even if one of them fails)
    if let Some(dir) = &args.export {
        export(&cpu, &prompts, &batch, &lqa_top5, dir)?;
        println!(
            "\nexported the model and ids for PyTorch to {}",
            dir.display()
        );
    }

    // ---------------------------------------------------------------- timing
    let mut timings = Vec::new();
    if !args.skip_timing {
        println!("\n== timing on the device (median of {} runs)", args.runs);
        let runs = args.runs.max(1);
        let prefill_ids = prompts[3].clone();
        for (label, lm) in [("f32", &*dev), ("bf16", &dev16)] {
            let m = &lm.model;
            let (pre, _) = ctx.on(Side::Device, || {
                time(3, runs.max(10), || {
                    let input = Input::left_padded(std::slice::from_ref(&prefill_ids), 0, &device)?
                        .with_logits(Logits::Last);
                    let mut cache = KvCache::new(m.n_layers());
                    let out = m.forward(&input, Some(&mut cache), None)?;
                    out.logits
                        .context("no logits")?
                        .argmax(D::Minus1)?
                        .to_vec1::<u32>()?;
                    Ok(())
                })
            })?;
            let opts = GenOptions {
                max_new_tokens: 64,
                ..Default::default()
            };
            let (full, _) = ctx.on(Side::Device, || {
                time(1, runs, || {
                    let out = generate(m, std::slice::from_ref(&prefill_ids), 0, &opts, None)?;
                    anyhow::ensure!(out[0].len() == 64, "stopped early");
                    Ok(())
                })
            })?;
            let dec = (full - pre).max(1e-9);
            println!(
                "  {label}: prefill 128 tokens {:.4}s = {:.0} tok/s; decode 64 tokens {:.4}s = {:.1} tok/s",
                pre,
                128.0 / pre,
                dec,
                64.0 / dec
            );
            timings.push(json!({"bench": format!("prefill_{label}"), "median_s": pre, "tokens_per_s": 128.0 / pre}));
            timings.push(json!({"bench": format!("decode_{label}"), "median_s": dec, "tokens_per_s": 64.0 / dec}));
        }

        // LIT step
        let (decoder, adapter) = decoder_with_lora(&dev.model)?;
        let mut opt = AdamW::new(
            adapter.named_vars(),
            AdamWParams {
                lr: 3e-5,
                weight_decay: 0.01,
                ..Default::default()
            },
        )?;
        let mut seed = 0;
        let (lit_s, lit_all) = ctx.on(Side::Device, || {
            time(2, runs, || {
                seed += 1;
                let out = latentqa_loss(&dev.model, &decoder, &batch, &lit_cfg(&dev, Some(seed)))?;
                let grads = out.loss.backward()?;
                opt.step(&grads)?;
                ctx.sync()
            })
        })?;
        println!(
            "  LIT step, batch 4 ({} label tokens, {} LoRA parameters): {lit_s:.4}s {:?}",
            batch.n_label_tokens(),
            adapter.num_parameters(),
            rounded(&lit_all)
        );
        timings.push(json!({"bench": "train_step", "median_s": lit_s, "all_s": lit_all}));

        // control steps
        let decoder_shipped = Decoder::load(dev.clone(), None)?;
        for bs in [1usize, 4] {
            let samples = control_samples(bs * (runs + 1));
            let config = ControlConfig {
                batch_size: bs,
                samples: samples.len(),
                ..ControlConfig::paper()
            };
            let mut opt = ControlOptimizer::with_samples(
                &decoder_shipped,
                control.clone(),
                &samples,
                config,
                Vec::new(),
            )?;
            let (s, all) = ctx.on(Side::Device, || {
                time(1, runs, || {
                    opt.step()?;
                    ctx.sync()
                })
            })?;
            println!(
                "  control step, batch {bs} ({} parameters): {s:.4}s {:?}",
                opt.num_parameters(),
                rounded(&all)
            );
            timings
                .push(json!({"bench": format!("control_step_b{bs}"), "median_s": s, "all_s": all}));
        }

        // reading: the target reads example 0, the decoder generates 32 tokens with the patch
        let ex = &batch.examples[0];
        let one = PatchedBatch::new(vec![ex.clone()])?;
        let first_label = *ex.decoder.label_positions.first().context("no labels")?;
        let prompt = ex.decoder.ids[..first_label].to_vec();
        let mut cfg = lit_cfg(&dev, None);
        cfg.differentiable = false;
        let ropts = GenOptions {
            max_new_tokens: 32,
            ..Default::default()
        };
        let mut read_tokens = 0;
        let (read_s, read_all) = ctx.on(Side::Device, || {
            time(1, runs, || {
                let patches = patch_vectors(&dev.model, &one, &cfg, None)?;
                let mut hooks = Hooks::new();
                hooks.patches.push(Patch {
                    point: HookPoint::resid_post(0),
                    mode: PatchMode::Replace,
                    value: patches[0].clone(),
                    positions: Positions::List(ex.decoder.write_positions.clone()),
                    rows: None,
                });
                let out = generate(
                    &decoder,
                    std::slice::from_ref(&prompt),
                    dev.pad_id(),
                    &ropts,
                    Some(&mut hooks),
                )?;
                read_tokens = out[0].len();
                Ok(())
            })
        })?;
        println!(
            "  reading: target forward ({} tokens) + decoder generating {read_tokens} tokens after a {}-token prompt: {read_s:.4}s = {:.1} tok/s",
            ex.read.ids.len(),
            prompt.len(),
            read_tokens as f64 / read_s
        );
        timings.push(json!({"bench": "read_generate", "median_s": read_s, "all_s": read_all, "new_tokens": read_tokens, "tokens_per_s": read_tokens as f64 / read_s}));
    }

    let total = t_start.elapsed().as_secs_f64();
    let summary = json!({
        "device": what,
        "parity_pass": ctx.failed == 0,
        "parity_failed": ctx.failed,
        "checks": ctx.checks,
        "parity_s": parity_s,
        "timings": timings,
        "bf16_logit_tol": BF16_LOGIT_TOL,
        "total_s": total,
    });
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&summary)?)?;
    }
    println!(
        "\nparity: {} ({} failed of {}); {total:.0}s in all",
        if ctx.failed == 0 { "PASS" } else { "FAIL" },
        ctx.failed,
        ctx.checks.len()
    );
    if ctx.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|t| (t * 10000.0).round() / 10000.0).collect()
}

/// The model as a transformers folder, and every prompt and batch as ids.
fn export(
    lm: &Arc<LanguageModel>,
    prompts: &[Vec<u32>],
    batch: &PatchedBatch,
    lqa_top5: &[Vec<u32>],
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let m = &lm.model;
    let c = &m.cfg;
    if c.architecture != "llama" && !c.architecture.to_ascii_lowercase().contains("llama") {
        println!("note: exporting a {} model as Llama", c.architecture);
    }
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope.theta,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": lm.pad_id(),
        "torch_dtype": "float32",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    if !c.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..c.num_hidden_layers {
        for s in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{s}.weight"));
        }
    }
    let mut tensors = std::collections::HashMap::new();
    for n in names {
        let t = m
            .weight(&n)
            .with_context(|| format!("no weight {n}"))?
            .to_dtype(DType::F32)?
            .contiguous()?;
        tensors.insert(n, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let ex_json = |e: &PatchedExample, use_first_from: bool| {
        let take: Vec<usize> = e
            .read
            .patch_positions
            .iter()
            .enumerate()
            .map(|(j, &p)| match e.read.first_from {
                Some(f) if j == 0 && use_first_from => f,
                _ => p,
            })
            .collect();
        json!({
            "read_ids": e.read.ids,
            "read_take": take,
            "dec_ids": e.decoder.ids,
            "write_positions": e.decoder.write_positions,
            "label_positions": e.decoder.label_positions,
        })
    };
    // the control batch: the same dialogs as the control step, read without a verb mask,
    // one QA of the control file, labels on its answer
    let control = Control::load(&find_control()?)?;
    let d = Decoder::untrained(lm.clone(), READ_LAYER, 0);
    let control_examples = control_samples(4)
        .iter()
        .map(|s| {
            let (q, a) = &control.qa[s.qa % control.qa.len()];
            d.example(&s.read.messages, q, a, true)
                .map(|e| ex_json(&e, false))
        })
        .collect::<lqa::Result<Vec<_>>>()?;
    let ids = json!({
        "pad_id": lm.pad_id(),
        "read_layer": READ_LAYER,
        "write_layer": 0,
        "prompts": prompts,
        "prefill_ids": prompts[3],
        "lqa_top5": lqa_top5,
        "lit": batch.examples.iter().map(|e| ex_json(e, true)).collect::<Vec<_>>(),
        "control": control_examples,
    });
    std::fs::write(dir.join("ids.json"), serde_json::to_string(&ids)?)?;
    Ok(())
}
