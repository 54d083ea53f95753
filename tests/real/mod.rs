//! The real default model (fetched through the project's own resolver into the cache) and the
//! PyTorch reference values, loaded once per test binary.
#![allow(dead_code)]

use candle_core::{DType, Device};
use lqa::model::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn reference_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference")
}

pub fn reference() -> &'static serde_json::Value {
    static R: OnceLock<serde_json::Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = reference_dir().join("reference_values.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!("{}: {e} (the reference values must be there)", p.display())
        });
        serde_json::from_str(&text).unwrap()
    })
}

/// The default model's GGUF, fetched on first use.
pub fn gguf_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        lqa::sources::pull(lqa::sources::DEFAULT_MODEL).expect("fetch the default model")
    })
    .clone()
}

pub fn lm() -> &'static lqa::lm::LanguageModel {
    static M: OnceLock<lqa::lm::LanguageModel> = OnceLock::new();
    M.get_or_init(|| {
        lqa::lm::LanguageModel::load(lqa::sources::DEFAULT_MODEL, &Default::default())
            .expect("load the default model")
    })
}

pub fn model() -> &'static Model {
    &lm().model
}

pub fn dtype() -> DType {
    DType::F32
}

pub fn device() -> Device {
    Device::Cpu
}
