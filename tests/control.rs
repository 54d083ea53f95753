//! Control on the tiny chat model: a step lowers the decoder's loss on its batch, lr 0 leaves
//! the target unchanged, the per-layer variant touches only the LoRA of the layers it
//! optimises (and a layer's loss reaches only its own LoRA), and bad control data is an error
//! naming the file and item.

mod common;

use common::chat_model::write_tiny_chat_model;
use lqa::control::data::{load_instructions, Control, Instruction};
use lqa::control::{ControlConfig, ControlOptimizer};
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
        ..Default::default()
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
