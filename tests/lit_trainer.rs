//! LIT end to end on a tiny chat model and a toy LatentQA data set: the loss goes down, a
//! checkpointed run resumes to exactly the same weights, the outputs are written, and the
//! trained adapter loads as a Decoder.

mod common;
use common::chat_model::{write_tiny_chat_model, write_toy_latentqa_data};
use lqa::lit::trainer::{TrainConfig, Trainer};
use lqa::lm::LanguageModel;
use lqa::lora::LoraConfig;
use std::path::Path;
use std::sync::Arc;

fn setup(root: &Path) -> Arc<LanguageModel> {
    let model_dir = root.join("model");
    write_tiny_chat_model(&model_dir, 11);
    write_toy_latentqa_data(&root.join("data"));
    Arc::new(LanguageModel::load(model_dir.to_str().unwrap(), &Default::default()).unwrap())
}

fn config(root: &Path, out: &str) -> TrainConfig {
    TrainConfig {
        data_dir: root.join("data"),
        out_dir: root.join(out),
        eval_fraction: 0.34,
        seed: 3,
        batch_size: 4,
        grad_accum: 2,
        lr: 3e-3,
        warmup_steps: 2,
        max_steps: Some(8),
        min_read_layer: 0,
        max_read_layer: 1,
        write_layer: 0,
        lora: LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            ..LoraConfig::paper_decoder()
        },
        eval_every: 4,
        checkpoint_every: 4,
        ema: Some(0.9),
        ..TrainConfig::default()
    }
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.adapter()
        .vars()
        .iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_on_a_toy_task() {
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let cfg = TrainConfig {
        max_steps: Some(40),
        grad_accum: 1,
        lr: 1e-2,
        eval_every: 0,
        checkpoint_every: 0,
        ema: None,
        ..config(root.path(), "run")
    };
    let mut t = Trainer::new(target, cfg).unwrap();
    let before = t.evaluate().unwrap();
    let mut losses = vec![];
    t.train(|s| {
        losses.push(s.loss);
        Ok(true)
    })
    .unwrap();
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "train loss {first:.3} -> {last:.3}");
    let after = t.evaluate().unwrap();
    assert!(after < before, "held-out loss {before:.3} -> {after:.3}");
    // outputs: metrics (one line per step), the plot, the final checkpoint
    let out = root.path().join("run");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 40);
    assert!(std::fs::read_to_string(out.join("loss.svg"))
        .unwrap()
        .contains("<polyline"));
    assert!(out
        .join("checkpoint/adapter/adapter_model.safetensors")
        .exists());
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let mut straight = Trainer::new(target.clone(), config(root.path(), "a")).unwrap();
    straight.train(|_| Ok(true)).unwrap();

    let mut first = Trainer::new(target.clone(), config(root.path(), "b")).unwrap();
    // stop after 5 steps (the callback says stop; a checkpoint is written at that point)
    first.train(|s| Ok(s.step < 5)).unwrap();
    assert_eq!(first.step_count(), 5);
    drop(first);
    // the one resume rule: another config is an error naming the fields (and loses nothing)
    let state = root.path().join("b/checkpoint/state.json");
    let before = std::fs::read(&state).unwrap();
    let mut other = config(root.path(), "b");
    other.lr *= 2.0;
    other.lora.r += 1;
    let e = Trainer::resume(target.clone(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("state.json")
            && e.contains("lr: checkpoint")
            && e.contains("lora.r: checkpoint"),
        "{e}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), before);
    // how often to checkpoint and evaluate may change
    let mut other = config(root.path(), "b");
    other.checkpoint_every += 1;
    other.eval_every += 1;
    // and so may recomputation (the same steps with less memory)
    other.recompute = true;
    drop(Trainer::resume(target.clone(), other).unwrap());
    // and so may where the run is: a moved run folder resumes
    std::fs::rename(root.path().join("b"), root.path().join("b-moved")).unwrap();
    let moved = Trainer::resume(target.clone(), config(root.path(), "b-moved")).unwrap();
    assert_eq!(moved.step_count(), 5);
    drop(moved);
    std::fs::rename(root.path().join("b-moved"), root.path().join("b")).unwrap();
    let mut resumed = Trainer::resume(target, config(root.path(), "b")).unwrap();
    assert_eq!(resumed.step_count(), 5);
    resumed.train(|_| Ok(true)).unwrap();
    assert_eq!(resumed.step_count(), 8);
    assert_eq!(weights(&straight), weights(&resumed));
    let a = std::fs::read_to_string(root.path().join("a/metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(root.path().join("b/metrics.jsonl")).unwrap();
    let losses = |s: &str| -> Vec<f64> {
        s.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
}

#[test]
fn the_trained_adapter_loads_as_a_decoder() {
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let mut t = Trainer::new(
        target.clone(),
        TrainConfig {
            max_steps: Some(2),
            ..config(root.path(), "c")
        },
    )
    .unwrap();
    t.train(|_| Ok(true)).unwrap();
    let dir = root.path().join("shipped");
    t.save_adapter(&dir, candle_core::DType::BF16).unwrap();
    let d = lqa::latentqa::decoder::Decoder::load(target, Some(&dir)).unwrap();
    assert_eq!((d.meta.layers.read, d.meta.layers.write), (0, 0));
    let dialog = vec![lqa::chat::Message::new("user", "Talk about the color red.")];
    let s = d.score(&dialog, "What color?", "Red.", false).unwrap();
    assert!(s.is_finite() && s > 0.0, "{s}");
}

#[test]
fn bad_data_names_the_file_and_item_and_keeps_earlier_outputs() {
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let mut t = Trainer::new(
        target.clone(),
        TrainConfig {
            max_steps: Some(2),
            ..config(root.path(), "d")
        },
    )
    .unwrap();
    t.train(|_| Ok(true)).unwrap();
    let ck = root.path().join("d/checkpoint/state.json");
    let before = std::fs::read(&ck).unwrap();
    // break an item, then try to resume
    let p = root.path().join("data/control.json");
    let mut items: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    items[1].as_object_mut().unwrap().remove("control_user");
    std::fs::write(&p, serde_json::to_string(&items).unwrap()).unwrap();
    // resumed with the config it was made with (the resume rule), the broken item is named
    let same = TrainConfig {
        max_steps: Some(2),
        ..config(root.path(), "d")
    };
    let err = Trainer::resume(target, same).err().unwrap().to_string();
    assert!(
        err.contains("control.json") && err.contains("item 1") && err.contains("control_user"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ck).unwrap(), before);
}

/// A small labelled set in the format of `data/classification.json`.
fn write_classification(path: &Path) {
    let file = serde_json::json!({
        "attributes": {
            "topic": {"values": ["colors", "animals"], "question": "Is the text about {value}?"}
        },
        "items": [
            {"text": "The sky is blue.", "topic": "colors"},
            {"text": "A cat sleeps.", "topic": "animals"},
            {"text": "Red roses.", "topic": "colors"}
        ]
    });
    std::fs::write(path, file.to_string()).unwrap();
}

#[test]
fn the_reading_evaluation_scores_the_same_items_three_ways() {
    use lqa::latentqa::Activations;
    use lqa::lit::data::ItemKind;
    use lqa::lit::eval::{evaluate_reading, EvalOptions};
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let mut t = Trainer::new(
        target.clone(),
        TrainConfig {
            max_steps: Some(2),
            ..config(root.path(), "e")
        },
    )
    .unwrap();
    t.train(|_| Ok(true)).unwrap();
    let dir = root.path().join("dec");
    t.save_adapter(&dir, candle_core::DType::F32).unwrap();
    // the training record ships with the decoder
    for f in [
        "config.json",
        "split.json",
        "kinds.json",
        "metrics.jsonl",
        "loss.svg",
    ] {
        assert!(dir.join("training").join(f).is_file(), "{f}");
    }
    let d = lqa::latentqa::decoder::Decoder::load(target, Some(&dir)).unwrap();
    let data =
        lqa::lit::data::LitData::load_dir(&root.path().join("data"), &Default::default()).unwrap();
    let split = lqa::lit::data::LabelSplit::load(&dir.join("training/split.json")).unwrap();
    let (_, held_out) = data.split_with(&split);
    let cls = root.path().join("cls.json");
    write_classification(&cls);
    let opts = EvalOptions {
        batch_size: 3,
        generate: 4,
        max_new_tokens: 4,
        classification_file: Some(cls),
        ..Default::default()
    };
    let r = evaluate_reading(&d, &data, &split, &opts).unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut checked = 0;
    for (kind, name) in [
        (ItemKind::System, "system"),
        (ItemKind::Stimulus, "stimulus"),
        (ItemKind::Control, "control"),
    ] {
        let items: Vec<_> = held_out
            .iter()
            .filter(|e| e.item.kind == kind)
            .map(|e| (e.item.read.clone(), e.question.clone(), e.answer.clone()))
            .collect();
        let Some(k) = r.kind(name) else {
            assert!(
                items.len() < 2,
                "{name}: {} items but no report",
                items.len()
            );
            continue;
        };
        checked += 1;
        assert_eq!(k.n, items.len(), "{name}");
        assert_eq!(k.masked, kind != ItemKind::Control);
        // the true and no-activation losses are those of these very items
        let truth = d.score_reads(&items, Activations::Read).unwrap();
        let none = d.score_reads(&items, Activations::None).unwrap();
        assert!((k.loss_true - mean(&truth)).abs() < 1e-5, "{name}");
        assert!((k.loss_none - mean(&none)).abs() < 1e-5, "{name}");
        assert!((k.gap_mismatched.mean - (k.loss_mismatched - k.loss_true)).abs() < 1e-9);
        assert!((k.gap_none.mean - (k.loss_none - k.loss_true)).abs() < 1e-9);
        // nothing written is not the same as the true activations
        assert!(truth.iter().zip(&none).any(|(a, b)| (a - b).abs() > 1e-6));
        let g = k.generated.as_ref().unwrap();
        assert_eq!(g.n, k.n.min(4));
        assert!(k.accuracy.is_none());
    }
    assert!(checked >= 1);
    // classification: 3 sentences x 1 attribute x (yes, no), accuracies are shares
    let c = r.kind("classification").unwrap();
    assert_eq!(c.n, 6);
    let a = c.accuracy.unwrap();
    for s in [a.true_activations, a.mismatched, a.none] {
        assert!((0.0..=1.0).contains(&s.value) && s.low <= s.value && s.value <= s.high);
        assert_eq!((s.value * 6.0).round(), s.value * 6.0);
    }
}

/// Activation Oracles' recipe on the toy task: norm-matched addition, two read layers named in
/// the prompt, and a mixture with context prediction and classification.
#[test]
fn an_oracle_style_decoder_trains_on_a_mixture_and_names_its_read_layers() {
    use lqa::latentqa::Injection;
    use lqa::lit::mixture::MixtureConfig;
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let passages = root.path().join("passages.json");
    std::fs::write(
        &passages,
        serde_json::json!([
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
            {"response": "red green blue cyan magenta yellow black white grey brown pink"},
        ])
        .to_string(),
    )
    .unwrap();
    let cls = root.path().join("cls.json");
    write_classification(&cls);
    let cfg = TrainConfig {
        max_steps: Some(4),
        read_layers: vec![1, 0],
        write_layer: 0, // the tiny model has two blocks: block 1 reads what block 0 writes
        injection: Injection::AddNormMatched,
        contrast: true, // the toy data's masked items are read by contrast
        mixture: MixtureConfig {
            context: 0.5,
            classification: 0.5,
            context_files: vec![passages],
            classification_file: cls,
            window_words: 6,
            answer_words: 3,
            ..Default::default()
        },
        eval_fraction: 0.0,
        eval_every: 0,
        ..config(root.path(), "ao")
    };
    let mut t = Trainer::new(target.clone(), cfg).unwrap();
    let c = t.kind_counts().train.clone();
    // 48 LatentQA examples, each other kind at half of that
    assert_eq!(
        (c["latentqa"], c["context"], c["classification"]),
        (48, 24, 24)
    );
    let mut layers = std::collections::BTreeSet::new();
    t.train(|s| {
        layers.insert(s.read_layer);
        assert!(s.loss.is_finite());
        Ok(true)
    })
    .unwrap();
    assert!(layers.iter().all(|l| *l <= 1));
    let dir = root.path().join("dec");
    t.save_adapter(&dir, candle_core::DType::F32).unwrap();
    let d = lqa::latentqa::decoder::Decoder::load(target.clone(), Some(&dir)).unwrap();
    assert_eq!(d.meta.read_layers, vec![0, 1]);
    assert_eq!(d.meta.layers.inject, Injection::AddNormMatched);
    assert!(d.meta.layers.contrast);
    assert_eq!((d.meta.layers.read, d.meta.layers.write), (0, 0));
    // questions name the layer the activations come from
    let q = d.meta.question("What color?", 1);
    assert_eq!(q, "Layer: 1\nWhat color?");
    let mut o = d.ask_options();
    o.gen.max_new_tokens = 3;
    o.read_layer = Some(1);
    let dialog = vec![lqa::chat::Message::new("user", "Talk about red.")];
    assert_eq!(
        d.ask(&[dialog], &["What color?".into()], &o).unwrap()[0].len(),
        1
    );
    // a decoder file written before injections existed loads as the paper's replacement
    std::fs::write(
        dir.join("lqa_decoder.json"),
        r#"{"base_model": "tiny-chat", "read_layer": 1, "write_layer": 0}"#,
    )
    .unwrap();
    let old = lqa::latentqa::decoder::Decoder::load(target, Some(&dir)).unwrap();
    assert_eq!(old.meta.layers.inject, Injection::Replace);
    assert!(!old.meta.layers.contrast);
    assert!(!old.meta.names_layer());
    assert_eq!(old.meta.question("What color?", 1), "What color?");
}

/// Training with recomputed blocks (`recompute: true`, a third of the memory) takes the same
/// steps: the same losses and, up to float summation order, the same weights.
#[test]
fn recomputed_blocks_train_to_the_same_weights() {
    let root = tempfile::tempdir().unwrap();
    let target = setup(root.path());
    let run = |out: &str, recompute: bool| {
        let cfg = TrainConfig {
            max_steps: Some(3),
            eval_every: 0,
            checkpoint_every: 0,
            recompute,
            ..config(root.path(), out)
        };
        let mut t = Trainer::new(target.clone(), cfg).unwrap();
        let mut losses = Vec::new();
        t.train(|s| {
            losses.push(s.loss);
            Ok(true)
        })
        .unwrap();
        (losses, weights(&t))
    };
    let (la, wa) = run("kept", false);
    let (lb, wb) = run("recomputed", true);
    for (a, b) in la.iter().zip(&lb) {
        assert!((a - b).abs() < 1e-5, "losses {la:?} vs {lb:?}");
    }
    let mut worst = 0f32;
    for (a, b) in wa.iter().zip(&wb) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    // AdamW moves each weight by about lr (3e-3) a step
    assert!(worst < 1e-5, "largest weight difference {worst}");
}
