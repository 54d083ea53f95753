//! Control on the tiny chat model: a step lowers the decoder's loss on its batch, lr 0 leaves
//! the target unchanged, the per-layer variant touches only the LoRA of the layers it
//! optimises (and a layer's loss reaches only its own LoRA), bad control data is an error
//! naming the file and item, and an interrupted run resumed from its checkpoint ends where an
//! uninterrupted one does (plain and per-layer), with bad or mismatching checkpoints errors
//! naming the file and no temporary directories left behind. The KL regulariser is zero for
//! the unsteered model, its gradient matches finite differences, and a weighted KL keeps the
//! steered model nearer the unsteered one; perplexity ranks the model's own answer first.

mod common;

use candle_core::{Device, Tensor, Var};
use common::chat_model::write_tiny_chat_model;
use common::{lcg, load_tiny_f64};
use lqa::control::data::{load_instructions, Control, Instruction};
use lqa::control::fluency::EarlyStop;
use lqa::control::kl::kl_to_reference;
use lqa::control::measures::answer_perplexity;
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions};
use lqa::latentqa::decoder::Decoder;
use lqa::lm::LanguageModel;
use lqa::model::{Input, Logits};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn decoder(dir: &Path) -> Decoder {
    let dir = write_tiny_chat_model(&dir.join("tiny-chat"), 5);
    let lm = Arc::new(LanguageModel::load(dir.to_str().unwrap(), &Default::default()).unwrap());
    Decoder::untrained(lm, 1, 0)
}

fn control() -> Control {
    Control {
        prompt: "be a cat".into(),
        qa: vec![
            ("who is the assistant?".into(), "a cat".into()),
            ("what will it say?".into(), "meow meow".into()),
        ],
        file: "inline".into(),
    }
}

fn instructions() -> Vec<Instruction> {
    [
        ("name a color", "blue"),
        ("add two and two", "four"),
        ("say hi", "hi there"),
        ("what is rain?", "water falling from clouds"),
    ]
    .iter()
    .map(|(i, r)| Instruction {
        instruction: i.to_string(),
        response: r.to_string(),
    })
    .collect()
}

fn config(lr: f64) -> ControlConfig {
    ControlConfig {
        samples: 8,
        batch_size: 2,
        lr,
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        layers_to_optimize: vec![0, 1],
        ..ControlConfig::paper()
    }
}

/// All LoRA variables by PEFT name, as f32 vectors.
fn snapshot(opt: &ControlOptimizer) -> BTreeMap<String, Vec<f32>> {
    opt.adapter()
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (n, t.to_vec1::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn a_control_step_lowers_the_decoder_loss_on_its_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let mut opt = ControlOptimizer::new(&d, control(), &instructions(), config(3e-3)).unwrap();
    assert_eq!(opt.n_samples(), 8);
    assert_eq!(opt.total_steps(), 4);
    let before = opt.batch_loss(0).unwrap();
    let stats = opt.step().unwrap();
    assert!(
        (stats.loss - before).abs() < 1e-4,
        "{} vs {before}",
        stats.loss
    );
    let after = opt.batch_loss(0).unwrap();
    assert!(after < before - 1e-3, "loss {before} -> {after}");
    // the rest of the pass (other batches) also lowers the loss on the control's answers
    for _ in 0..3 {
        let s = opt.step().unwrap();
        assert!(s.loss.is_finite());
    }
    let again = opt.batch_loss(0).unwrap();
    assert!(again < after, "{after} -> {again}");
}

/// A control run through an Activation-Oracle decoder (norm-matched addition, layers named in
/// its prompts) uses that injection: its loss differs from the same decoder's with
/// replacement, and its steps lower it. (The tiny model has two blocks: the write is at block
/// 0 so that a block reads it.)
#[test]
fn control_honours_the_decoders_injection() {
    use lqa::latentqa::{Injection, LayerPlan};
    let tmp = tempfile::tempdir().unwrap();
    let mut d = decoder(tmp.path());
    let replace = ControlOptimizer::new(&d, control(), &instructions(), config(3e-3)).unwrap();
    d.meta.layers = LayerPlan::new(1, 0).injecting(Injection::AddNormMatched);
    d.meta.read_layers = vec![0, 1];
    let mut ao = ControlOptimizer::new(&d, control(), &instructions(), config(3e-3)).unwrap();
    let before = ao.batch_loss(0).unwrap();
    assert!((before - replace.batch_loss(0).unwrap()).abs() > 1e-3);
    ao.step().unwrap();
    let after = ao.batch_loss(0).unwrap();
    assert!(after < before - 1e-3, "loss {before} -> {after}");
}

#[test]
fn with_lr_zero_the_target_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let mut opt = ControlOptimizer::new(&d, control(), &instructions(), config(0.0)).unwrap();
    let before = snapshot(&opt);
    opt.run(|_| Ok(true)).unwrap();
    assert_eq!(opt.step_count(), 4);
    assert_eq!(snapshot(&opt), before);
    // and the steered model computes what the base model computes
    let ids = d
        .target
        .tokenizer
        .encode("<|im_start|>user\nhello")
        .unwrap();
    let input = Input::left_padded(&[ids], 2, d.target.model.device())
        .unwrap()
        .with_logits(Logits::All);
    let base = d
        .target
        .model
        .forward(&input, None, None)
        .unwrap()
        .logits
        .unwrap();
    let steered = opt
        .steered()
        .forward(&input, None, None)
        .unwrap()
        .logits
        .unwrap();
    let diff = (base - steered).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn the_per_layer_variant_only_changes_the_layers_it_optimises() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let mut cfg = config(3e-3);
    cfg.per_layer_loss = true;
    let mut opt = ControlOptimizer::new(&d, control(), &instructions(), cfg.clone()).unwrap();
    let before = snapshot(&opt);
    let stats = opt.step().unwrap();
    assert_eq!(
        stats.layer_losses.keys().copied().collect::<Vec<_>>(),
        [0, 1]
    );
    let after = snapshot(&opt);
    for (name, v) in &after {
        let changed = v != &before[name];
        let in_layer = name.contains(".layers.0.") || name.contains(".layers.1.");
        if name.contains("lora_B") {
            // B starts at 0 and gets a gradient whenever the loss reaches the module
            assert_eq!(changed, in_layer, "{name}");
        } else if !in_layer {
            assert!(!changed, "{name} is in no optimised layer but changed");
        }
    }
    assert!(
        after.keys().any(|n| n.contains("lm_head")),
        "lm_head has a LoRA"
    );

    // Layer 0's update comes from layer 0's loss alone: optimising layer 0 by itself gives the
    // same layer-0 weights.
    cfg.layers_to_optimize = vec![0];
    let mut only0 = ControlOptimizer::new(&d, control(), &instructions(), cfg).unwrap();
    only0.step().unwrap();
    let a0 = snapshot(&only0);
    for (name, v) in &a0 {
        if name.contains(".layers.0.") {
            let w = &after[name];
            let m = v
                .iter()
                .zip(w)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(m < 1e-6, "{name}: {m}");
        }
    }
    assert!(!a0.keys().any(|n| n.contains(".layers.1.")));
}

#[test]
fn bad_control_data_names_the_file_and_item() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.json");
    std::fs::write(&p, r#"{"be a cat": [["q", "a"], ["only a question"]]}"#).unwrap();
    let e = Control::load(&p).unwrap_err().to_string();
    assert!(e.contains("c.json") && e.contains("pair 1"), "{e}");
    std::fs::write(&p, "").unwrap();
    let e = Control::load(&p).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    std::fs::write(&p, r#"["not", "an object"]"#).unwrap();
    assert!(Control::load(&p).is_err());

    let i = tmp.path().join("ins.json");
    std::fs::write(
        &i,
        r#"[{"instruction": "a", "response": "b"}, {"instruction": "c"}]"#,
    )
    .unwrap();
    let e = load_instructions(&i).unwrap_err().to_string();
    assert!(
        e.contains("ins.json") && e.contains("item 1") && e.contains("response"),
        "{e}"
    );
    let j = tmp.path().join("ins.jsonl");
    std::fs::write(
        &j,
        "{\"prompt\": \"a\", \"output\": \"b\", \"context\": \"ctx\"}\n\n{oops\n",
    )
    .unwrap();
    let e = load_instructions(&j).unwrap_err().to_string();
    assert!(e.contains("line 3"), "{e}");
    std::fs::write(
        &j,
        "{\"prompt\": \"a\", \"output\": \"b\", \"context\": \"ctx\"}\n",
    )
    .unwrap();
    let ok = load_instructions(&j).unwrap();
    assert_eq!(ok[0].instruction, "a\n\nctx");

    // the shipped instruction set loads and is large enough
    let shipped = load_instructions(Path::new("data/instructions.json")).unwrap();
    assert!(shipped.len() >= 200, "{}", shipped.len());
    let prompts = lqa::control::data::load_prompts(Path::new("data/eval_prompts.json")).unwrap();
    assert!(prompts
        .iter()
        .all(|p| !shipped.iter().any(|s| &s.instruction == p)));
}

/// Max |a - b| over all LoRA variables (the same names on both sides).
fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the adapters have different variables"
    );
    a.iter()
        .flat_map(|(n, v)| v.iter().zip(&b[n]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max)
}

fn losses(opt: &ControlOptimizer) -> Vec<(usize, f64)> {
    opt.history().iter().map(|s| (s.step, s.loss)).collect()
}

fn metrics_losses(dir: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap() as usize,
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A run of the whole pass vs. one stopped after `stop` steps (checkpointed on the stop),
/// dropped, resumed from its checkpoint and run to the end: same adapter, same losses.
fn resumed_run_matches(cfg: ControlConfig, stop: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut straight = ControlOptimizer::new(&d, control(), &instructions(), cfg.clone())
        .unwrap()
        .with_out_dir(&a)
        .unwrap();
    straight.run(|_| Ok(true)).unwrap();
    let total = straight.total_steps();
    assert!(total > stop, "{total} steps");

    let mut first = ControlOptimizer::new(&d, control(), &instructions(), cfg.clone())
        .unwrap()
        .with_out_dir(&b)
        .unwrap();
    first.run(|s| Ok(s.step < stop)).unwrap();
    assert_eq!(first.step_count(), stop);
    let at_stop = snapshot(&first);
    // a step after the checkpoint that the resumed run must forget (metrics included)
    first.step().unwrap();
    drop(first);
    assert_eq!(metrics_losses(&b).len(), stop + 1);

    let mut resumed = ControlOptimizer::resume(&d, control(), cfg, &b).unwrap();
    assert_eq!(resumed.step_count(), stop);
    assert_eq!(max_diff(&snapshot(&resumed), &at_stop), 0.0);
    let kept = losses(&resumed);
    assert_eq!(kept.len(), stop);
    for ((s1, l1), (s2, l2)) in kept.iter().zip(&losses(&straight)) {
        assert!(
            s1 == s2 && (l1 - l2).abs() <= 1e-6,
            "{s1} {l1} vs {s2} {l2}"
        );
    }
    resumed.run(|_| Ok(true)).unwrap();
    assert_eq!(resumed.step_count(), total);
    let diff = max_diff(&snapshot(&straight), &snapshot(&resumed));
    assert!(diff <= 1e-6, "adapters differ by {diff}");
    // the adapter moved far more than that, so the comparison means something
    let init = ControlOptimizer::new(&d, control(), &instructions(), config(0.0)).unwrap();
    let moved = max_diff(&snapshot(&init), &snapshot(&straight));
    assert!(moved > 1e-4, "the adapter moved by {moved} only");
    let (ls, lr) = (losses(&straight), losses(&resumed));
    assert_eq!(ls.len(), lr.len());
    for ((s1, l1), (s2, l2)) in ls.iter().zip(&lr) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() <= 1e-6, "step {s1}: loss {l1} vs {l2}");
    }
    let (ma, mb) = (metrics_losses(&a), metrics_losses(&b));
    assert_eq!(
        ma.iter().map(|x| x.0).collect::<Vec<_>>(),
        mb.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((s, l1), (_, l2)) in ma.iter().zip(&mb) {
        assert!((l1 - l2).abs() <= 1e-6, "metrics step {s}: {l1} vs {l2}");
    }
    // the final checkpoint is at the end of the pass
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"].as_u64().unwrap() as usize, total);
}

#[test]
fn a_resumed_control_run_ends_where_an_uninterrupted_one_does() {
    resumed_run_matches(config(3e-3), 2);
}

#[test]
fn a_resumed_per_layer_control_run_ends_where_an_uninterrupted_one_does() {
    let mut cfg = config(3e-3);
    cfg.per_layer_loss = true;
    resumed_run_matches(cfg, 1);
}

#[test]
fn a_bad_or_mismatching_checkpoint_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let out = tmp.path().join("run");
    let opt = ControlOptimizer::new(&d, control(), &instructions(), config(3e-3)).unwrap();
    let e = opt.checkpoint().unwrap_err().to_string();
    assert!(e.contains("output directory"), "{e}");
    let mut opt = opt.with_out_dir(&out).unwrap();
    opt.step().unwrap();
    opt.checkpoint().unwrap();
    drop(opt);
    let state = out.join("checkpoint/state.json");

    // another config (checkpoint_every and recompute aside, which may change)
    let mut other = config(3e-3);
    other.checkpoint_every = 7;
    other.recompute = true;
    ControlOptimizer::resume(&d, control(), other, &out).unwrap();
    let mut other = config(1e-3);
    other.samples = 6;
    let e = ControlOptimizer::resume(&d, control(), other, &out)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("state.json") && e.contains("lr") && e.contains("samples"),
        "{e}"
    );
    // another control
    let mut c = control();
    c.qa[1].1 = "woof".into();
    let e = ControlOptimizer::resume(&d, c, config(3e-3), &out)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("state.json") && e.contains("control"), "{e}");
    // another base model
    let d2 = decoder(&tmp.path().join("other"));
    let e = ControlOptimizer::resume(&d2, control(), config(3e-3), &out)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("state.json") && e.contains(&d.target.name) && e.contains(&d2.target.name),
        "{e}"
    );
    // a missing optimizer state names its file
    let opt_file = out.join("checkpoint/optimizer.safetensors");
    let saved = std::fs::read(&opt_file).unwrap();
    std::fs::remove_file(&opt_file).unwrap();
    let e = ControlOptimizer::resume(&d, control(), config(3e-3), &out)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    std::fs::write(&opt_file, saved).unwrap();
    // a corrupt or empty state.json
    let good = std::fs::read(&state).unwrap();
    for bad in ["{\"step\": 1, \"config\": ", "", "[]"] {
        std::fs::write(&state, bad).unwrap();
        let e = ControlOptimizer::resume(&d, control(), config(3e-3), &out)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("state.json"), "{bad:?}: {e}");
    }
    std::fs::write(&state, good).unwrap();
    let r = ControlOptimizer::resume(&d, control(), config(3e-3), &out).unwrap();
    assert_eq!(r.step_count(), 1);
    // no checkpoint at all
    let e = ControlOptimizer::resume(&d, control(), config(3e-3), &tmp.path().join("none"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("state.json"), "{e}");
}

#[test]
fn checkpoint_swaps_leave_no_temporary_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let out = tmp.path().join("run");
    let mut cfg = config(3e-3);
    cfg.checkpoint_every = 1;
    let mut opt = ControlOptimizer::new(&d, control(), &instructions(), cfg.clone())
        .unwrap()
        .with_out_dir(&out)
        .unwrap();
    let mut steps_seen = Vec::new();
    opt.run(|s| {
        // the checkpoint of the step before is in place while a step runs
        let st = std::fs::read_to_string(out.join("checkpoint/state.json")).ok();
        steps_seen.push(st.map(|t| {
            serde_json::from_str::<serde_json::Value>(&t).unwrap()["step"]
                .as_u64()
                .unwrap()
        }));
        assert_eq!(s.step, steps_seen.len());
        Ok(true)
    })
    .unwrap();
    assert_eq!(steps_seen, [None, Some(1), Some(2), Some(3)]);
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&out), ["checkpoint", "loss.svg", "metrics.jsonl"]);
    assert_eq!(
        names(&out.join("checkpoint")),
        ["adapter", "optimizer.safetensors", "state.json"]
    );
    assert!(names(&out.join("checkpoint/adapter"))
        .iter()
        .all(|n| !n.starts_with('.')));

    // a failed write leaves the checkpoint as it was and no temporary directory
    let ck = out.join("checkpoint");
    let before = std::fs::read(ck.join("state.json")).unwrap();
    let e = lqa::util::atomic_dir(&ck, |t| {
        std::fs::write(t.join("state.json"), "half").unwrap();
        Err(lqa::Error::invalid("disk full"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("disk full"));
    assert_eq!(std::fs::read(ck.join("state.json")).unwrap(), before);
    assert_eq!(names(&out), ["checkpoint", "loss.svg", "metrics.jsonl"]);

    // a swap interrupted between its renames (only checkpoint.old) is recovered on resume
    std::fs::rename(&ck, out.join("checkpoint.old")).unwrap();
    let r = ControlOptimizer::resume(&d, control(), cfg.clone(), &out).unwrap();
    assert_eq!(r.step_count(), 4);
    assert!(r.is_done());
    assert_eq!(names(&out), ["checkpoint", "loss.svg", "metrics.jsonl"]);

    // per layer: one optimizer state per layer
    cfg.per_layer_loss = true;
    let out2 = tmp.path().join("run2");
    let mut opt = ControlOptimizer::new(&d, control(), &instructions(), cfg)
        .unwrap()
        .with_out_dir(&out2)
        .unwrap();
    opt.step().unwrap();
    opt.checkpoint().unwrap();
    assert_eq!(
        names(&out2.join("checkpoint")),
        [
            "adapter",
            "optimizer-layer0.safetensors",
            "optimizer-layer1.safetensors",
            "state.json"
        ]
    );
}

/// A learning rate that blows the LoRA weights up: the first non-finite loss or gradient stops
/// the run before its update, with an error naming the step, and the checkpoint on disk is the
/// last good step's (plain and per-layer).
#[test]
fn a_non_finite_loss_stops_control_with_the_checkpoint_intact() {
    for per_layer_loss in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let d = decoder(tmp.path());
        let out = tmp.path().join("run");
        let cfg = ControlConfig {
            checkpoint_every: 1,
            per_layer_loss,
            ..config(1e30)
        };
        let mut opt = ControlOptimizer::new(&d, control(), &instructions(), cfg.clone())
            .unwrap()
            .with_out_dir(&out)
            .unwrap();
        let err = opt.run(|_| Ok(true)).unwrap_err().to_string();
        assert!(err.contains("training stopped before"), "{err}");
        let done = opt.step_count();
        assert!(done >= 1 && done < opt.total_steps(), "{done}: {err}");
        assert!(err.contains(&format!("step {}", done + 1)), "{err}");
        // the checkpoint resumes at the last good step, with finite weights
        let resumed = ControlOptimizer::resume(&d, control(), cfg, &out).unwrap();
        assert_eq!(resumed.step_count(), done);
        for (name, v) in snapshot(&resumed) {
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
        }
    }
}

// ---- control that keeps the model: the KL regulariser and the perplexity measure ----

#[test]
fn kl_is_zero_unsteered_and_its_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let m = load_tiny_f64(dir.path(), 4);
    let rows = vec![vec![5u32, 9, 14, 3, 77, 12], vec![8, 1, 60]];
    let zero = kl_to_reference(&m, &m, &rows, 0, None, false).unwrap();
    assert!(zero.to_scalar::<f64>().unwrap().abs() < 1e-12);

    // KL as a function of a vector added to the steered model's embeddings at every position
    let d = common::D;
    let dev = Device::Cpu;
    let v0 = Var::from_vec(lcg(d, 1).iter().map(|x| x * 0.5).collect(), d, &dev).unwrap();
    let kl_at = |v: &Tensor| -> Tensor {
        let mut hooks = Hooks::new().patch(Patch {
            point: HookPoint::embed(),
            mode: PatchMode::Add,
            value: v.clone(),
            positions: Positions::All,
            rows: None,
        });
        kl_to_reference(&m, &m, &rows, 0, Some(&mut hooks), false).unwrap()
    };
    let k = kl_at(v0.as_tensor());
    let k0 = k.to_scalar::<f64>().unwrap();
    assert!(k0 > 1e-6, "a perturbed model differs: {k0}");
    let g = k.backward().unwrap();
    let g = g.get(v0.as_tensor()).expect("a gradient").clone();
    let eps = 1e-4;
    for seed in 0..3u64 {
        let dir = Tensor::from_vec(lcg(d, 100 + seed), d, &dev).unwrap();
        let analytic = (&g * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let at = |t: f64| {
            kl_at(&(v0.as_tensor() + (&dir * t).unwrap()).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (analytic - numeric).abs() <= 1e-5 * analytic.abs().max(numeric.abs()) + 1e-9,
            "direction {seed}: analytic {analytic} vs finite differences {numeric}"
        );
    }
}

fn kl_config(kl_weight: f64) -> ControlConfig {
    ControlConfig {
        samples: 32,
        batch_size: 2,
        lr: 1e-2,
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        layers_to_optimize: vec![0, 1],
        kl_weight,
        ..ControlConfig::paper()
    }
}

#[test]
fn a_weighted_kl_keeps_the_steered_model_nearer_the_unsteered_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let rows: Vec<Vec<u32>> = ["<|im_start|>user\nname a color<|im_end|>\n", "say hi there"]
        .iter()
        .map(|t| d.target.tokenizer.encode(t).unwrap())
        .collect();
    let mut kls = vec![];
    for w in [0.0, 100.0] {
        let mut opt = ControlOptimizer::new(&d, control(), &instructions(), kl_config(w)).unwrap();
        let mut seen = vec![];
        opt.run(|s| {
            seen.push(s.kl);
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen.len(), 8);
        if w > 0.0 {
            assert!(seen
                .iter()
                .all(|k| k.is_some_and(|k| k.is_finite() && k >= 0.0)));
            assert_eq!(seen[0], Some(0.0), "no steering yet at the first step");
        } else {
            assert!(seen.iter().all(Option::is_none));
        }
        let kl = kl_to_reference(opt.steered(), &d.target.model, &rows, 2, None, false)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        kls.push(kl);
    }
    eprintln!("KL after steering without / with the term: {kls:?}");
    assert!(kls[0] > 0.0, "steering moved the model: {kls:?}");
    assert!(kls[1] < 0.5 * kls[0], "the KL term holds it back: {kls:?}");

    // per-layer + KL is refused, naming both
    let err = ControlOptimizer::new(
        &d,
        control(),
        &instructions(),
        ControlConfig {
            per_layer_loss: true,
            ..kl_config(1.0)
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("kl_weight") && err.contains("per_layer_loss"),
        "{err}"
    );
}

#[test]
fn perplexity_is_lower_for_the_models_own_greedy_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let lm = &d.target;
    let ctx = "<|im_start|>user\nname a color<|im_end|>\n<|im_start|>assistant\n".to_string();
    let ids = lm.encode_prompt(&ctx).unwrap();
    let own = lqa::generate::generate(
        &lm.model,
        &[ids],
        lm.pad_id(),
        &lqa::generate::GenOptions {
            max_new_tokens: 12,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let own = lm.tokenizer.decode(&own[0]).unwrap();
    let odd = "zq xv kk zq xv kk zq".to_string();
    let p_own =
        answer_perplexity(lm, std::slice::from_ref(&ctx), std::slice::from_ref(&own)).unwrap();
    let p_odd =
        answer_perplexity(lm, std::slice::from_ref(&ctx), std::slice::from_ref(&odd)).unwrap();
    assert!(p_own.is_finite() && p_own >= 1.0, "{p_own}");
    assert!(p_own < p_odd, "own greedy {p_own} vs odd text {p_odd}");
}

fn early_config(es: EarlyStop) -> ControlConfig {
    ControlConfig {
        early_stop: Some(es),
        ..config(3e-3)
    }
}

#[test]
fn the_default_config_is_the_swept_recipe_with_the_fluency_check() {
    let d = ControlConfig::default();
    assert_eq!((d.samples, d.lr, d.kl_weight), (150, 1e-4, 0.0));
    assert_eq!(d.early_stop, Some(EarlyStop::default()));
    assert_eq!(ControlConfig::paper().early_stop, None);
}

#[test]
fn early_stopping_keeps_the_last_fluent_adapter_and_stays_stopped_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let chosen = lqa::control::data::samples(&instructions(), 2, 8, 42);
    // 1. a check that always passes: the run goes to its end, checks every 2 steps, and trains
    //    exactly as a run without the check
    let pass = EarlyStop {
        every: 2,
        prompts: 2,
        max_new_tokens: 6,
        max_repeat_share: 1.0,
        repeat_margin: 0.0,
        min_distinct_share: 0.0,
        max_perplexity_ratio: 1e9,
    };
    let held_out = vec!["tell me a story".to_string(), "what is snow?".to_string()];
    let mut a = ControlOptimizer::with_samples(
        &d,
        control(),
        &chosen,
        early_config(pass.clone()),
        held_out,
    )
    .unwrap();
    a.run(|_| Ok(true)).unwrap();
    let mut b =
        ControlOptimizer::with_samples(&d, control(), &chosen, config(3e-3), Vec::new()).unwrap();
    b.run(|_| Ok(true)).unwrap();
    assert_eq!(snapshot(&a), snapshot(&b));
    let checked: Vec<usize> = a
        .history()
        .iter()
        .filter(|s| s.fluency.is_some())
        .map(|s| s.step)
        .collect();
    assert_eq!(checked, [2, 4]);
    assert!(a.stopped().is_none());

    // 2. a check that fails: the same prompt twice gets the same greedy answer twice (distinct
    //    share 0.5 < 1), so the first check stops the run and the fresh LoRA is kept
    let fail = EarlyStop {
        min_distinct_share: 1.0,
        ..pass
    };
    let out = tmp.path().join("run");
    let mut c = ControlOptimizer::with_samples(
        &d,
        control(),
        &chosen,
        early_config(fail.clone()),
        vec!["say hi".into(); 2],
    )
    .unwrap()
    .with_out_dir(&out)
    .unwrap();
    c.run(|_| Ok(true)).unwrap();
    let s = c.stopped().expect("the check stopped the run").clone();
    assert_eq!((s.at_step, s.kept_step), (2, 0));
    assert_eq!(s.fluency.distinct_share, 0.5);
    assert_eq!(c.step_count(), 2);
    let kept = snapshot(&c);
    let b_vars: Vec<_> = kept.iter().filter(|(n, _)| n.contains("lora_B")).collect();
    assert!(!b_vars.is_empty());
    for (n, v) in b_vars {
        assert!(v.iter().all(|x| *x == 0.0), "{n} is not the fresh LoRA's");
    }
    assert_eq!(c.history().last().unwrap().stopped.as_ref(), Some(&s));

    // 3. resumed from its checkpoint: still stopped, the same adapter, no further step
    let mut r = ControlOptimizer::resume(&d, control(), early_config(fail), &out).unwrap();
    assert!(r.is_done());
    assert_eq!(r.stopped(), Some(&s));
    assert_eq!(snapshot(&r), kept);
    r.run(|_| Ok(true)).unwrap();
    assert_eq!(r.step_count(), 2);

    // 4. bad settings and no held-out instructions are errors
    let err = ControlOptimizer::with_samples(
        &d,
        control(),
        &chosen,
        early_config(EarlyStop {
            every: 0,
            ..Default::default()
        }),
        vec!["say hi".into()],
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("every"), "{err}");
    // samples that read every instruction leave none held out: the check answers training
    // instructions instead (with a warning); with fewer samples it answers the others
    let opt = ControlOptimizer::new(
        &d,
        control(),
        &instructions(),
        ControlConfig {
            samples: 16,
            ..early_config(EarlyStop::default())
        },
    )
    .unwrap();
    let texts: Vec<String> = instructions().into_iter().map(|i| i.instruction).collect();
    assert_eq!(opt.held_out(), texts.as_slice());
    let opt = ControlOptimizer::new(
        &d,
        control(),
        &instructions(),
        ControlConfig {
            samples: 2,
            ..early_config(EarlyStop::default())
        },
    )
    .unwrap();
    let chosen = lqa::control::data::samples(&instructions(), 2, 2, 42);
    assert!(!opt.held_out().is_empty());
    for h in opt.held_out() {
        assert!(
            chosen.iter().all(|c| &c.read.messages[0].content != h),
            "{h}"
        );
    }
}

/// Recomputed blocks (`recompute: true`) steer the same: the same losses and weights, for the
/// plain objective with the KL term and LoRA dropout, and for the per-layer variant.
#[test]
fn recomputed_blocks_steer_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(tmp.path());
    let plain = ControlConfig {
        lora_dropout: 0.1,
        ..kl_config(1.0)
    };
    let per_layer = ControlConfig {
        per_layer_loss: true,
        ..config(3e-3)
    };
    for base in [plain, per_layer] {
        let mut runs = Vec::new();
        for recompute in [false, true] {
            let cfg = ControlConfig {
                recompute,
                samples: 6,
                ..base.clone()
            };
            let mut opt = ControlOptimizer::new(&d, control(), &instructions(), cfg).unwrap();
            let mut seen = Vec::new();
            opt.run(|s| {
                seen.push((s.loss, s.kl));
                Ok(true)
            })
            .unwrap();
            runs.push((seen, snapshot(&opt)));
        }
        for (a, b) in runs[0].0.iter().zip(&runs[1].0) {
            assert!(
                (a.0 - b.0).abs() < 1e-5,
                "losses {:?} vs {:?}",
                runs[0].0,
                runs[1].0
            );
            assert_eq!(a.1.is_some(), b.1.is_some());
            if let (Some(x), Some(y)) = (a.1, b.1) {
                assert!((x - y).abs() < 1e-5, "KL {x} vs {y}");
            }
        }
        assert!(runs[0].0.len() >= 3);
        let m = max_diff(&runs[0].1, &runs[1].1);
        assert!(m < 1e-5, "largest weight difference {m}");
    }
}
