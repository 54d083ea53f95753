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

#[test]
fn the_reading_test_scores_true_and_shuffled_activations() {
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
    let d = lqa::latentqa::decoder::Decoder::load(target, Some(&dir)).unwrap();
    let data =
        lqa::lit::data::LitData::load_dir(&root.path().join("data"), &Default::default()).unwrap();
    let split = lqa::lit::data::LabelSplit::load(&root.path().join("e/split.json")).unwrap();
    let (_, held_out) = data.split_with(&split);
    let r = lqa::lit::eval::reading_gap(&d, &data, &split, None, 4, 0).unwrap();
    assert_eq!(r.n, held_out.len());
    assert!(r.true_mean.is_finite() && r.shuffled_mean.is_finite());
    assert!((r.gap - (r.shuffled_mean - r.true_mean)).abs() < 1e-9);
    // with the dialog of the example itself, "shuffled" equals true: the score depends on the
    // activations only through the dialog
    let e = &held_out[0];
    let a = d
        .score(&e.item.read.messages, &e.question, &e.answer, false)
        .unwrap();
    let b = d
        .score(&e.item.read.messages, &e.question, &e.answer, false)
        .unwrap();
    assert_eq!(a, b);
}
