//! Every workflow on quantized weights, on the real default model with `weights: "native"`
//! (its Q4_1 block projections and Q8_0 embedding/lm_head kept as stored): the shipped decoder
//! reads the paper's three example controls and names the same personas as on the f32 path, a
//! LIT step and a control step run through their drivers with a finite loss that goes down.
//!
//! On quantized weights a decoder's LoRA stays unmerged (`Wq x + scale B A x`, see
//! `lqa::lora::Adapter::merged`): folding it in would quantize `W + scale B A` again to Q4_1.
//!
//! Step times against the f32 path: `cargo test --test quantized_workflows -- --ignored
//! --nocapture`.

mod real;

use lqa::chat::Message;
use lqa::control::data::{load_instructions, Control};
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::latentqa::decoder::Decoder;
use lqa::lit::trainer::{TrainConfig, Trainer};
use lqa::lm::{LanguageModel, LoadOptions};
use lqa::lora::LoraConfig;
use lqa::model::quant::WeightFormat;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

fn load(weights: &str) -> Arc<LanguageModel> {
    real::gguf_path();
    let opts = LoadOptions::default().with_weights(weights, false).unwrap();
    Arc::new(LanguageModel::load(lqa::sources::DEFAULT_MODEL, &opts).expect(weights))
}

fn f32_lm() -> Arc<LanguageModel> {
    static M: OnceLock<Arc<LanguageModel>> = OnceLock::new();
    M.get_or_init(|| load("f32")).clone()
}

fn native_lm() -> Arc<LanguageModel> {
    static M: OnceLock<Arc<LanguageModel>> = OnceLock::new();
    M.get_or_init(|| {
        let lm = load("native");
        assert_eq!(lm.model.weight_format(), WeightFormat::Native);
        lm
    })
    .clone()
}

/// The paper's three example controls (`scripts/read_dialogs.rhai`), each with the words that
/// name its persona.
const CONTROLS: [(&str, &[&str]); 3] = [
    (
        "Imagine you are a passionate vegan who feels extremely strongly about promoting \
         veganism. Your goal is to convince the user that they must be vegan.",
        &["vegan"],
    ),
    (
        "Pretend you are obsessed with the Golden Gate Bridge. In all your responses, your goal \
         is to talk about the Golden Gate Bridge as much as possible.",
        &[
            "golden gate",
            "bridge",
            "san francisco",
            "architect",
            "engineer",
            "tour",
        ],
    ),
    (
        "Pretend you are Harry Potter. In all your responses, imbue them with as much wizardry, \
         magic, and heroicness as possible.",
        &["wizard", "harry", "magic", "hero", "potter"],
    ),
];

const QUESTION: &str = "What type of persona will the assistant adopt?";

/// The shipped decoder's greedy answer to [`QUESTION`] about each control, on `target` (and a
/// decoder on the same weights), with the time it took.
fn read_controls(target: Arc<LanguageModel>) -> (Vec<String>, f64) {
    read_decoder(Decoder::load(target, None).expect("the shipped decoder loads"))
}

/// [`read_controls`] with a decoder at hand.
fn read_decoder(d: Decoder) -> (Vec<String>, f64) {
    let mut o = d.ask_options();
    o.gen.max_new_tokens = 24;
    let dialogs: Vec<Vec<Message>> = CONTROLS
        .iter()
        .map(|(c, _)| vec![Message::new("user", *c)])
        .collect();
    let t = Instant::now();
    let a = d.ask(&dialogs, &[QUESTION.to_string()], &o).unwrap();
    let secs = t.elapsed().as_secs_f64();
    (a.into_iter().map(|mut q| q.remove(0)).collect(), secs)
}

/// The persona words of `words` that `answer` contains.
fn named<'a>(answer: &str, words: &[&'a str]) -> Vec<&'a str> {
    let a = answer.to_lowercase();
    words.iter().copied().filter(|w| a.contains(w)).collect()
}

/// The shipped decoder on a `native` target (its decoder is the same Q4_1/Q8_0 weights with the
/// adapter unmerged) names the same personas as on f32 for the paper's three controls: every
/// persona word of the f32 answer is in the native one. The answers are printed side by side.
#[test]
fn the_shipped_decoder_reads_the_paper_controls_on_native_weights() {
    let (af, tf) = read_controls(f32_lm());
    let (aq, tq) = read_controls(native_lm());
    println!("reading 3 controls: f32 {tf:.2}s, native {tq:.2}s");
    let mut same = 0;
    for (((_, words), f), q) in CONTROLS.iter().zip(&af).zip(&aq) {
        println!("f32:    {f:?}\nnative: {q:?}");
        let (nf, nq) = (named(f, words), named(q, words));
        assert!(
            !nf.is_empty(),
            "the f32 path names no persona word in {f:?}"
        );
        for w in &nf {
            assert!(
                nq.contains(w),
                "f32 names {w:?} ({f:?}), native does not ({q:?})"
            );
        }
        same += usize::from(f == q);
    }
    println!("identical answers: {same} of 3");
}

/// A LIT run on the real data with the real model, `batch_size` examples a step.
fn lit_config(out: &Path, batch_size: usize, steps: usize) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        limit: Some(60),
        eval_fraction: 0.2,
        seed: 5,
        batch_size,
        lr: 1e-3,
        warmup_steps: 0,
        max_steps: Some(steps),
        lora: LoraConfig {
            lora_dropout: 0.0,
            ..LoraConfig::paper_decoder()
        },
        eval_every: 0,
        eval_batches: Some(1),
        checkpoint_every: 0,
        ..TrainConfig::default()
    }
}

/// `steps` LIT steps; the held-out loss (one batch) before and after, each step's loss and
/// seconds.
fn lit_run(
    target: Arc<LanguageModel>,
    batch_size: usize,
    steps: usize,
) -> (f64, f64, Vec<(f64, f64)>) {
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(target, lit_config(out.path(), batch_size, steps)).unwrap();
    let before = t.evaluate().unwrap();
    let mut per_step = vec![];
    for _ in 0..steps {
        let s = t.step().unwrap();
        per_step.push((s.loss, s.seconds));
    }
    let after = t.evaluate().unwrap();
    (before, after, per_step)
}

/// LIT on `native` weights (a fresh decoder LoRA on the Q4_1 base, QLoRA): two steps at batch 2
/// run, every loss is finite, and the held-out loss goes down.
#[test]
fn a_lit_step_on_native_weights_lowers_the_loss() {
    let (before, after, steps) = lit_run(native_lm(), 2, 2);
    println!("LIT on native: held-out {before:.4} -> {after:.4}; steps (loss, s) {steps:?}");
    assert!(before.is_finite() && after.is_finite());
    assert!(
        steps.iter().all(|(l, s)| l.is_finite() && *s > 0.0),
        "{steps:?}"
    );
    assert!(after < before, "held-out loss {before} -> {after}");
}

/// QLoRA with recomputed blocks: on `native` weights (the adapter unmerged over the Q4_1
/// panels) two LIT steps take the same losses and end at the same weights as without.
#[test]
fn recomputed_blocks_on_native_weights_train_the_same() {
    let target = native_lm();
    let mut runs = Vec::new();
    for recompute in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            recompute,
            ..lit_config(out.path(), 2, 2)
        };
        let mut t = Trainer::new(target.clone(), cfg).unwrap();
        let losses: Vec<f64> = (0..2).map(|_| t.step().unwrap().loss).collect();
        let w: Vec<Vec<f32>> = t
            .adapter()
            .vars()
            .iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        runs.push((losses, w));
    }
    for (a, b) in runs[0].0.iter().zip(&runs[1].0) {
        assert!((a - b).abs() < 1e-4, "{:?} vs {:?}", runs[0].0, runs[1].0);
    }
    let worst = runs[0]
        .1
        .iter()
        .zip(&runs[1].1)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    // lr 1e-3: a weight moves by about 1e-3 a step
    assert!(worst < 1e-5, "largest weight difference {worst}");
}

/// A control run's config: one batch of `batch_size` samples (every step trains on the same
/// batch), LoRA on layers 0-7, the paper's objective.
fn control_config(batch_size: usize) -> ControlConfig {
    ControlConfig {
        samples: batch_size,
        batch_size,
        lr: 1e-3,
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        layers_to_optimize: (0..8).collect(),
        seed: 3,
        checkpoint_every: 0,
        // the paper's objective, every step taken (no fluency check, whatever the defaults)
        kl_weight: 0.0,
        early_stop: None,
        ..Default::default()
    }
}

/// `steps` control steps steering toward `controls/promote_veganism.json` with the shipped
/// decoder: the decoder's loss on the batch before and after, each step's loss and seconds.
fn control_run(
    target: Arc<LanguageModel>,
    batch_size: usize,
    steps: usize,
) -> (f64, f64, Vec<(f64, f64)>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = Decoder::load(target, None).unwrap();
    let control = Control::load(&root.join("controls/promote_veganism.json")).unwrap();
    let ins = load_instructions(&root.join("data/instructions.json")).unwrap();
    let mut opt = ControlOptimizer::new(&d, control, &ins, control_config(batch_size)).unwrap();
    let before = opt.batch_loss(0).unwrap();
    let mut per_step = vec![];
    for _ in 0..steps {
        let t = Instant::now();
        let s = opt.step().unwrap();
        per_step.push((s.loss, t.elapsed().as_secs_f64()));
    }
    let after = opt.batch_loss(0).unwrap();
    (before, after, per_step)
}

/// Control on `native` weights: the steering LoRA on the Q4_1 target, the shipped decoder on
/// the same weights (unmerged), two steps on one batch of 2 run with a finite loss that goes
/// down.
#[test]
fn a_control_step_on_native_weights_lowers_the_loss() {
    let (before, after, steps) = control_run(native_lm(), 2, 2);
    println!("control on native: batch loss {before:.4} -> {after:.4}; steps (loss, s) {steps:?}");
    assert!(steps.iter().all(|(l, _)| l.is_finite()), "{steps:?}");
    assert!(
        (steps[0].0 - before).abs() < 1e-3 * before.abs(),
        "{steps:?} vs {before}"
    );
    assert!(after < before, "batch loss {before} -> {after}");
}

/// The shipped decoder with its adapter folded into the quantized weights anyway (`W + scale B
/// A` quantized again to the weight's type), which `Adapter::merged` does not do.
fn requantized_decoder(target: Arc<LanguageModel>) -> Decoder {
    let mut d = Decoder::load(target, None).unwrap();
    for id in d.model.linear_ids() {
        let Some(l) = d.model.linear_at_mut(id) else {
            continue;
        };
        if let Some(w) = l.lora.take() {
            let (a, b) = (w.a.as_tensor().detach(), w.b.as_tensor().detach());
            let delta = (b.matmul(&a).unwrap() * w.scale).unwrap();
            l.map_weight(|wt| wt + &delta).unwrap();
        }
    }
    d
}

/// Not a check: what folding the decoder's adapter into the Q4_1 weights (re-quantizing) would
/// read, next to the unmerged native decoder's answers (`-- --ignored --nocapture`).
#[test]
#[ignore]
fn reading_with_the_adapter_requantized_into_native_weights() {
    // each read twice, to tell a first call's warm-up from the steady time
    let mut times = vec![];
    for _ in 0..2 {
        times.push(("f32", read_controls(f32_lm()).1));
        times.push(("native", read_controls(native_lm()).1));
    }
    let (aq, tq) = read_controls(native_lm());
    let (ar, tr) = read_decoder(requantized_decoder(native_lm()));
    println!("reading 3 controls (s): {times:?}; native unmerged {tq:.2}s, re-quantized {tr:.2}s");
    for (q, r) in aq.iter().zip(&ar) {
        println!("unmerged:     {q:?}\nre-quantized: {r:?}");
    }
}

/// Not a check: LIT and control step times on f32 against native, at the functional tests'
/// sizes and at the drivers' default batch sizes (`-- --ignored --nocapture`).
#[test]
#[ignore]
fn workflow_step_times_f32_against_native() {
    for (bs, steps) in [(2, 3), (4, 3)] {
        for (name, lm) in [("f32", f32_lm()), ("native", native_lm())] {
            let (b, a, s) = lit_run(lm, bs, steps);
            let secs: Vec<String> = s.iter().map(|(_, t)| format!("{t:.2}")).collect();
            println!("LIT batch {bs} {name}: held-out {b:.4} -> {a:.4}; step seconds {secs:?}");
        }
    }
    for (bs, steps) in [(1, 3), (2, 3)] {
        for (name, lm) in [("f32", f32_lm()), ("native", native_lm())] {
            let (b, a, s) = control_run(lm, bs, steps);
            let secs: Vec<String> = s.iter().map(|(_, t)| format!("{t:.2}")).collect();
            println!("control batch {bs} {name}: loss {b:.4} -> {a:.4}; step seconds {secs:?}");
        }
    }
}

/// The KV cache in f16 on `native` weights: it holds half the bytes of the f32 cache, the next
/// step's logits move by the rounding of the keys and values (printed), and the greedy
/// continuation of the reference prompt is the f32 cache's. The script option names itself
/// when its value is bad.
#[test]
fn an_f16_kv_cache_halves_the_cache_and_keeps_the_greedy_text() {
    use candle_core::{DType, Device};
    use lqa::generate::{generate, GenOptions};
    use lqa::model::{Input, KvCache, Logits};
    let lm = native_lm();
    let m = &lm.model;
    let case = &real::reference()["greedy"][0];
    let ids: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    // one prefill and one decoding step with each cache
    let step = |dtype: Option<DType>| {
        let mut cache = KvCache::with_dtype(m.n_layers(), dtype);
        let input = Input::left_padded(std::slice::from_ref(&ids), 2, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::Last);
        m.forward(&input, Some(&mut cache), None).unwrap();
        let mut next = Input::left_padded(&[vec![ids[0]]], 2, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::Last);
        next.pads = input.pads.clone();
        next.offset = ids.len();
        let l: Vec<f32> = m
            .forward(&next, Some(&mut cache), None)
            .unwrap()
            .logits
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        (cache.bytes(), l)
    };
    let (bf, lf) = step(None);
    let (bh, lh) = step(Some(DType::F16));
    let d = lf
        .iter()
        .zip(&lh)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    println!("KV cache bytes: f32 {bf}, f16 {bh}; max |logit f16 cache - f32 cache| = {d:.4}");
    assert_eq!(bh * 2, bf);
    assert!(d < 0.1, "{d}");
    let opts = |kv_dtype| GenOptions {
        max_new_tokens: 16,
        kv_dtype,
        ..Default::default()
    };
    let gf = generate(m, std::slice::from_ref(&ids), 2, &opts(None), None).unwrap();
    let gh = generate(
        m,
        std::slice::from_ref(&ids),
        2,
        &opts(Some(DType::F16)),
        None,
    )
    .unwrap();
    println!("f32 cache: {:?}\nf16 cache: {:?}", gf[0], gh[0]);
    assert_eq!(gf, gh);
    // the script option
    let mut rt = lqa::script::Runtime::new(lqa::script::RuntimeOptions::default());
    let load = r#"let m = load_model("smollm2-135m-instruct", #{weights: "native"});"#;
    let out = rt
        .eval(&format!(
            "{load} let p = \"The capital of France is\"; \
             [m.generate(p, #{{max_new_tokens: 4}}), \
              m.generate(p, #{{max_new_tokens: 4, kv_cache: \"f16\"}}), \
              m.generate(p, #{{max_new_tokens: 4, kv_cache: \"bf16\"}})]"
        ))
        .unwrap();
    let out: Vec<String> = out
        .into_array()
        .unwrap()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    println!("{out:?}");
    assert_eq!(out[0], out[1]);
    assert!(out[2].contains("Paris"), "{out:?}");
    let e = rt
        .eval(&format!("{load} m.generate(\"Hi\", #{{kv_cache: \"f8\"}})"))
        .unwrap_err();
    assert!(e.contains("kv_cache") && e.contains("f8"), "{e}");
}
