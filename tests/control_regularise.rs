//! Control that keeps the model: the KL regulariser is zero for the unsteered model, its
//! gradient matches finite differences, and a weighted KL keeps the steered model nearer the
//! unsteered one than the plain objective does; the steering measures on a real (tiny) model.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::chat_model::write_tiny_chat_model;
use lqa::control::data::{Control, Instruction};
use lqa::control::kl::kl_to_reference;
use lqa::control::measures::answer_perplexity;
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions};
use lqa::latentqa::decoder::Decoder;
use lqa::lm::LanguageModel;
use lqa::model::Model;
use std::path::Path;
use std::sync::Arc;

fn load_tiny_f64(dir: &Path, seed: u64) -> Model {
    common::write_tiny_model(dir, seed);
    let cfg = lqa::config::ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let mut src =
        lqa::model::weights::SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
    Model::load(cfg, &mut src, DType::F64, &Device::Cpu).unwrap()
}

/// Deterministic values in [-1, 1).
fn lcg(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn kl_is_zero_unsteered_and_its_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let m = load_tiny_f64(dir.path(), 4);
    let rows = vec![vec![5u32, 9, 14, 3, 77, 12], vec![8, 1, 60]];
    let zero = kl_to_reference(&m, &m, &rows, 0, None).unwrap();
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
        kl_to_reference(&m, &m, &rows, 0, Some(&mut hooks)).unwrap()
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

fn config(kl_weight: f64) -> ControlConfig {
    ControlConfig {
        samples: 32,
        batch_size: 2,
        lr: 1e-2,
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        layers_to_optimize: vec![0, 1],
        kl_weight,
        ..Default::default()
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
        let mut opt = ControlOptimizer::new(&d, control(), &instructions(), config(w)).unwrap();
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
        let kl = kl_to_reference(opt.steered(), &d.target.model, &rows, 2, None)
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
            ..config(1.0)
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
