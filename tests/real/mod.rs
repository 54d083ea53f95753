//! The real default model and the PyTorch reference values, loaded once per test binary.
#![allow(dead_code)]

use candle_core::{DType, Device};
use lqa::model::Llama;
use std::sync::OnceLock;

pub fn reference_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference")
}

pub fn reference() -> &'static serde_json::Value {
    static R: OnceLock<serde_json::Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = reference_dir().join("reference_values.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("reference values")).unwrap()
    })
}

pub fn gguf_path() -> std::path::PathBuf {
    std::env::var("LQA_TEST_GGUF")
        .map(Into::into)
        .unwrap_or_else(|_| "/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf".into())
}

pub fn model() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let path = gguf_path();
        let mut w = lqa::model::weights::GgufWeights::open(&path).unwrap();
        let cfg = lqa::config::LlamaConfig::from_gguf(&w.content, &path).unwrap();
        w.set_heads(
            &cfg.architecture.clone(),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        Llama::load(cfg, &mut w, DType::F32, &Device::Cpu).unwrap()
    })
}
