//! The model's mechanics on tiny Qwen3 and Gemma 2 (and the other families' fixtures where it
//! costs nothing): padded batches equal single rows, the KV cache equals recomputation with
//! sliding windows shorter and longer than the prompt, a patch changes exactly the downstream
//! positions, the differentiable path equals the fused kernels, and LIT, reading and control run
//! on them. The models are the transformers-made fixtures of `../shared/reference/arch/`.

mod common;

use candle_core::{Device, Tensor};
use common::chat_model::write_toy_latentqa_data;
use common::max_abs_diff;
use lqa::chat::Message;
use lqa::control::data::{Control, Instruction};
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::generate::{generate, GenOptions};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions, Site};
use lqa::latentqa::decoder::Decoder;
use lqa::lit::trainer::{TrainConfig, Trainer};
use lqa::lm::LanguageModel;
use lqa::lora::LoraConfig;
use lqa::model::{Input, Logits, Model};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const ALL: [&str; 7] = [
    "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
];

fn arch_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/arch")
        .join(name)
}

fn load(name: &str) -> Arc<LanguageModel> {
    let dir = arch_dir(name);
    Arc::new(LanguageModel::load(dir.to_str().unwrap(), &Default::default()).unwrap())
}

/// The fixture copied to `root`, its tokenizer given one more merge (`Ġ` + `?` -> `Ġ?`, a
/// token id the model's embedding has room for): the fixtures' BPE was trained on a few
/// sentences and splits `"? ? ?"` into two tokens per placeholder, so no LatentQA decoder prompt
/// could give one placeholder token per activation. Real tokenizers have this merge.
fn load_for_latentqa(name: &str, root: &Path) -> Arc<LanguageModel> {
    let src = arch_dir(name);
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab.values().map(|v| v.as_u64().unwrap()).max().unwrap() + 1;
    vocab.insert("Ġ?".into(), id.into());
    let merges = tok["model"]["merges"].as_array_mut().unwrap();
    let pair = if merges[0].is_array() {
        serde_json::json!(["Ġ", "?"])
    } else {
        serde_json::json!("Ġ ?")
    };
    merges.push(pair);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    Arc::new(LanguageModel::load(dir.to_str().unwrap(), &Default::default()).unwrap())
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 20 + (i * 37 + seed * 11) % 300)
        .collect()
}

fn logits_all(m: &Model, rows: &[Vec<u32>], differentiable: bool) -> (Tensor, Vec<usize>) {
    let mut input = Input::left_padded(rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::All);
    input.differentiable = differentiable;
    let pads = input.pads.clone();
    (m.forward(&input, None, None).unwrap().logits.unwrap(), pads)
}

#[test]
fn padded_batches_equal_single_rows_in_every_family() {
    for fam in ALL {
        let lm = load(fam);
        // a row longer than the sliding window (8) beside shorter ones
        let rows = vec![ids(5, 1), ids(20, 2), ids(1, 3)];
        for differentiable in [false, true] {
            let (batch, pads) = logits_all(&lm.model, &rows, differentiable);
            for (r, row) in rows.iter().enumerate() {
                let (single, _) = logits_all(&lm.model, std::slice::from_ref(row), false);
                let from_batch = batch.get(r).unwrap().narrow(0, pads[r], row.len()).unwrap();
                let diff = max_abs_diff(&from_batch, &single.get(0).unwrap());
                assert!(
                    diff < 1e-4,
                    "{fam} row {r} (differentiable {differentiable}): max diff {diff}"
                );
            }
        }
    }
}

#[test]
fn kv_cache_equals_recompute_with_windows_shorter_and_longer_than_the_prompt() {
    for fam in ["qwen3", "gemma2", "gemma3", "mistral"] {
        let lm = load(fam);
        if fam != "qwen3" {
            assert_eq!(lm.model.cfg.sliding_window, Some(8), "{fam}");
        }
        // prompts of 5 (inside the window) and 14 tokens (past it), 16 new tokens each
        let prompts = vec![ids(5, 4), ids(14, 5)];
        for temperature in [0.0, 0.9] {
            let opts = GenOptions {
                max_new_tokens: 16,
                temperature,
                seed: 3,
                ..Default::default()
            };
            let cached = generate(&lm.model, &prompts, 0, &opts, None).unwrap();
            let full = generate(
                &lm.model,
                &prompts,
                0,
                &GenOptions {
                    use_cache: false,
                    ..opts.clone()
                },
                None,
            )
            .unwrap();
            assert_eq!(cached, full, "{fam} temperature {temperature}");
            if temperature == 0.0 {
                for (r, p) in prompts.iter().enumerate() {
                    let alone =
                        generate(&lm.model, std::slice::from_ref(p), 0, &opts, None).unwrap();
                    assert_eq!(alone[0], cached[r], "{fam} row {r}");
                }
            }
        }
    }
}

#[test]
fn the_sliding_window_is_honoured() {
    // In Gemma 2's sliding layers a query sees 8 keys; changing a token more than 8 positions
    // back changes the last position's output only through the full-attention layers. With
    // every layer sliding (Mistral, 3 layers), a token 3 * 7 + 1 = 22 positions back cannot
    // reach the last position at all.
    let lm = load("mistral");
    let a = ids(30, 1);
    let mut b = a.clone();
    b[2] = 300;
    let (la, _) = logits_all(&lm.model, std::slice::from_ref(&a), false);
    let (lb, _) = logits_all(&lm.model, std::slice::from_ref(&b), false);
    let last = |t: &Tensor| t.get(0).unwrap().get(29).unwrap();
    assert_eq!(max_abs_diff(&last(&la), &last(&lb)), 0.0);
    // ... but it does reach a position within range
    let near = |t: &Tensor| t.get(0).unwrap().get(6).unwrap();
    assert!(max_abs_diff(&near(&la), &near(&lb)) > 1e-4);
}

#[test]
fn a_patch_changes_exactly_the_downstream_positions() {
    for fam in ["qwen3", "gemma2"] {
        let lm = load(fam);
        let m = &lm.model;
        let row = ids(12, 6);
        let base = logits_all(m, std::slice::from_ref(&row), false).0;
        let d = m.cfg.hidden_size;
        let p = 6;
        let value = Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut hooks = Hooks::new().patch(Patch {
            point: HookPoint::block(0, Site::ResidPost),
            mode: PatchMode::Add,
            value,
            positions: Positions::List(vec![p]),
            rows: None,
        });
        let input = Input::left_padded(std::slice::from_ref(&row), 0, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::All);
        let patched = m
            .forward(&input, None, Some(&mut hooks))
            .unwrap()
            .logits
            .unwrap();
        for t in 0..row.len() {
            let diff = max_abs_diff(
                &base.get(0).unwrap().get(t).unwrap(),
                &patched.get(0).unwrap().get(t).unwrap(),
            );
            if t < p {
                assert_eq!(diff, 0.0, "{fam}: position {t} before the patch changed");
            } else {
                assert!(diff > 1e-5, "{fam}: position {t} after the patch unchanged");
            }
        }
    }
}

fn lit_config(root: &Path, n_layers: usize) -> TrainConfig {
    TrainConfig {
        data_dir: root.join("data"),
        out_dir: root.join("run"),
        eval_fraction: 0.34,
        seed: 3,
        batch_size: 4,
        grad_accum: 1,
        lr: 1e-2,
        warmup_steps: 2,
        max_steps: Some(24),
        min_read_layer: n_layers / 2,
        max_read_layer: n_layers / 2,
        write_layer: 0,
        lora: LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            ..LoraConfig::paper_decoder()
        },
        eval_every: 0,
        checkpoint_every: 0,
        ema: None,
        ..TrainConfig::default()
    }
}

#[test]
fn lit_trains_a_decoder_that_reads_on_qwen3_and_gemma2() {
    for fam in ["qwen3", "gemma2"] {
        let root = tempfile::tempdir().unwrap();
        write_toy_latentqa_data(&root.path().join("data"));
        let target = load_for_latentqa(fam, root.path());
        let n = target.model.n_layers();
        let mut t = Trainer::new(target.clone(), lit_config(root.path(), n)).unwrap();
        let mut losses = vec![];
        t.train(|s| {
            losses.push(s.loss);
            Ok(true)
        })
        .unwrap();
        let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
        let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
        assert!(
            last.is_finite() && last < 0.8 * first,
            "{fam}: train loss {first:.3} -> {last:.3}"
        );
        // the trained adapter reads: answers come back, and depend on the activations
        let dir = root.path().join("decoder");
        t.save_adapter(&dir, candle_core::DType::F32).unwrap();
        let d = Decoder::load(target, Some(&dir)).unwrap();
        assert_eq!(d.meta.layers.read, n / 2);
        let dialogs = vec![
            vec![Message::new("user", "Talk about the color red.")],
            vec![Message::new("user", "Why is the sky blue on a sunny day?")],
        ];
        let mut opts = d.ask_options();
        opts.gen.max_new_tokens = 8;
        let q = vec!["What color?".to_string()];
        let toks = d.ask_tokens(&dialogs, &q, &opts).unwrap();
        assert!(!toks[0][0].is_empty(), "{fam}: an answer");
        let s = d.score(&dialogs[0], "What color?", "Red.", false).unwrap();
        assert!(s.is_finite() && s > 0.0, "{fam}: score {s}");
    }
}

#[test]
fn a_control_step_runs_and_lowers_its_loss_on_qwen3_and_gemma2() {
    for fam in ["qwen3", "gemma2"] {
        let root = tempfile::tempdir().unwrap();
        let lm = load_for_latentqa(fam, root.path());
        let n = lm.model.n_layers();
        let d = Decoder::untrained(lm, n / 2, 0);
        let control = Control {
            prompt: "be a cat".into(),
            qa: vec![("who is the assistant?".into(), "a cat".into())],
            file: "inline".into(),
        };
        let instructions: Vec<Instruction> = [("name a color", "blue"), ("say hi", "hi there")]
            .iter()
            .map(|(i, r)| Instruction {
                instruction: i.to_string(),
                response: r.to_string(),
            })
            .collect();
        let cfg = ControlConfig {
            samples: 4,
            batch_size: 2,
            lr: 3e-3,
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            layers_to_optimize: (0..n).collect(),
            ..ControlConfig::paper()
        };
        let mut opt = ControlOptimizer::new(&d, control, &instructions, cfg).unwrap();
        let before = opt.batch_loss(0).unwrap();
        let s = opt.step().unwrap();
        assert!(s.loss.is_finite(), "{fam}");
        let after = opt.batch_loss(0).unwrap();
        assert!(after < before, "{fam}: control loss {before} -> {after}");
    }
}
