//! Shared test fixtures: a tiny random Llama written to a temp dir through the real file formats.
//! [`chat_model`] adds a complete chat model directory (tokenizer, chat template) and a toy
//! LatentQA data folder.
#![allow(dead_code)]

pub mod chat_model;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const VOCAB: usize = 97;
pub const D: usize = 64;
pub const LAYERS: usize = 3;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const FF: usize = 128;

pub fn tiny_config_json() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": D,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
    .to_string()
}

/// Random weights in HF names, seeded.
pub fn tiny_weights(seed: u64) -> HashMap<String, Tensor> {
    tiny_weights_with(seed, VOCAB, LAYERS, false)
}

/// [`tiny_weights`] for another vocabulary size and depth (d = [`D`], [`HEADS`] heads,
/// [`KV_HEADS`] kv heads, [`FF`] wide MLP); no `lm_head.weight` when `tied` (the head is the
/// embedding). The same seed, vocabulary and depth give the same values as [`tiny_weights`].
pub fn tiny_weights_with(
    seed: u64,
    vocab: usize,
    layers: usize,
    tied: bool,
) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut k = seed;
    let mut rnd = |shape: &[usize], scale: f64| {
        k += 1;
        // deterministic pseudo-random values from a simple LCG, independent of candle's RNG
        let n: usize = shape.iter().product();
        let mut s = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0) as f32 * scale as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    w.insert("model.embed_tokens.weight".into(), rnd(&[vocab, D], 1.0));
    let hd = D / HEADS;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (D as f64).sqrt();
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rnd(&[HEADS * hd, D], s * 2.0),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rnd(&[KV_HEADS * hd, D], s * 2.0),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rnd(&[KV_HEADS * hd, D], s),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rnd(&[D, HEADS * hd], s),
        );
        w.insert(format!("{p}.mlp.gate_proj.weight"), rnd(&[FF, D], s));
        w.insert(format!("{p}.mlp.up_proj.weight"), rnd(&[FF, D], s));
        w.insert(
            format!("{p}.mlp.down_proj.weight"),
            rnd(&[D, FF], 1.0 / (FF as f64).sqrt()),
        );
        w.insert(
            format!("{p}.input_layernorm.weight"),
            (rnd(&[D], 0.1) + 1.0).unwrap(),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (rnd(&[D], 0.1) + 1.0).unwrap(),
        );
    }
    w.insert("model.norm.weight".into(), (rnd(&[D], 0.1) + 1.0).unwrap());
    if !tied {
        w.insert(
            "lm_head.weight".into(),
            rnd(&[vocab, D], 1.0 / (D as f64).sqrt() * 4.0),
        );
    }
    w
}

/// Write config.json + model.safetensors of a tiny random Llama into `dir`.
pub fn write_tiny_model(dir: &Path, seed: u64) -> PathBuf {
    std::fs::write(dir.join("config.json"), tiny_config_json()).unwrap();
    let w = tiny_weights(seed);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

pub fn load_tiny(dir: &Path) -> lqa::model::Model {
    let cfg = lqa::config::ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let mut src =
        lqa::model::weights::SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
    lqa::model::Model::load(cfg, &mut src, DType::F32, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The tiny random Llama of [`write_tiny_model`] in f64 (for gradient checks).
pub fn load_tiny_f64(dir: &Path, seed: u64) -> lqa::model::Model {
    write_tiny_model(dir, seed);
    let cfg = lqa::config::ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let mut src =
        lqa::model::weights::SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
    lqa::model::Model::load(cfg, &mut src, DType::F64, &Device::Cpu).unwrap()
}

/// Deterministic values in [-1, 1).
pub fn lcg(n: usize, seed: u64) -> Vec<f64> {
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

/// Two LatentQA examples for the tiny model: row 0 a verb-masked read prompt (its first vector
/// from position 1), row 1 a plain one.
pub fn tiny_patched_batch() -> lqa::latentqa::PatchedBatch {
    use lqa::latentqa::{DecoderPrompt, PatchedBatch, PatchedExample, ReadPrompt};
    let r0 = ReadPrompt {
        ids: vec![1, 17, 40, 33, 8, 91, 5, 60],
        verb_len: 3,
        patch_positions: (4..8).collect(),
        first_from: Some(1),
        baseline: None,
    };
    let d0 = DecoderPrompt {
        ids: vec![1, 7, 3, 3, 3, 3, 9, 12, 44, 45, 46, 2],
        k: 3,
        write_positions: (2..6).collect(),
        label_positions: vec![8, 9, 10, 11],
    };
    let r1 = ReadPrompt {
        ids: vec![1, 22, 23, 24, 25],
        verb_len: 0,
        patch_positions: (1..5).collect(),
        first_from: None,
        baseline: None,
    };
    let d1 = DecoderPrompt {
        ids: vec![1, 7, 3, 3, 3, 3, 9, 50, 51],
        k: 3,
        write_positions: (2..6).collect(),
        label_positions: vec![7, 8],
    };
    PatchedBatch::new(vec![
        PatchedExample::new(r0, d0).unwrap(),
        PatchedExample::new(r1, d1).unwrap(),
    ])
    .unwrap()
}

/// The L2 norm of a tensor, in f64.
pub fn l2_norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
