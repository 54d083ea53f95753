//! A short, deterministic fuzz run over every loader (see `lqa::fuzz`): valid fixture files
//! written from a tiny random chat model (its HF directory, the same model as a Q4_1 GGUF with
//! the tokenizer and chat template in its metadata, a decoder, LatentQA data, a LIT checkpoint,
//! controls, instruction and prompt sets) are mutated and loaded; no case may panic, hang or
//! allocate without bound.
//!
//! Knobs (for the long run, see `fuzz/README.md`): `LQA_FUZZ_CASES` (cases per loader, default
//! 12), `LQA_FUZZ_SECONDS` (per loader, default 2), `LQA_FUZZ_SEED`, `LQA_FUZZ_ONLY`
//! (comma-separated loaders), `LQA_FUZZ_FIXTURES` (also write the fixtures there, e.g. as the
//! cargo-fuzz seed corpus), `LQA_FUZZ_FAILURES` (save panicking/hanging inputs there).

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use common::chat_model::{
    byte_char, write_tiny_chat_model, write_toy_latentqa_data, CHAT_LAYERS, CHAT_TEMPLATE,
    CHAT_VOCAB, MERGES, SPECIALS,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The system allocator, recording the largest single request (an unbounded allocation from
/// a declared size shows up here long before it could exhaust memory).
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Requests above this are refused (the process aborts with the message below), so that an
/// unbounded allocation fails the run loudly instead of swapping the machine.
const REFUSE: usize = 4 << 30;

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > REFUSE {
            eprintln!("fuzz: an allocation of {} bytes: unbounded", layout.size());
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > REFUSE {
            eprintln!("fuzz: an allocation of {} bytes: unbounded", layout.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        if new_size > REFUSE {
            eprintln!("fuzz: an allocation of {new_size} bytes: unbounded");
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// The tiny chat model as a GGUF file: llama metadata, the byte-level BPE tokenizer and ChatML
/// template in `tokenizer.*`, matrices as Q4_1 and vectors as F32.
fn write_tiny_gguf(path: &Path, seed: u64) {
    use gguf_file::Value as V;
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    assert_eq!(tokens.len(), CHAT_VOCAB);
    let types: Vec<V> = (0..tokens.len())
        .map(|i| V::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let merges: Vec<V> = MERGES
        .iter()
        .map(|(a, b)| V::String(format!("{a} {b}")))
        .collect();
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("general.alignment", V::U32(32)),
        ("llama.block_count", V::U32(CHAT_LAYERS as u32)),
        ("llama.context_length", V::U32(2048)),
        ("llama.embedding_length", V::U32(common::D as u32)),
        ("llama.feed_forward_length", V::U32(common::FF as u32)),
        ("llama.attention.head_count", V::U32(common::HEADS as u32)),
        (
            "llama.attention.head_count_kv",
            V::U32(common::KV_HEADS as u32),
        ),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.vocab_size", V::U32(CHAT_VOCAB as u32)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.merges", V::Array(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.padding_token_id", V::U32(2)),
        ("tokenizer.chat_template", V::String(CHAT_TEMPLATE.into())),
    ];
    let weights = common::tiny_weights_with(seed, CHAT_VOCAB, CHAT_LAYERS, true);
    let meta: Vec<(String, V)> = meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    write_gguf(path, &meta, &weights);
}

/// The default model's GGUF header (its 49152-token tokenizer, merges, chat template and every
/// other key) with the model shrunk to one small layer and its tensors written small, when the
/// default model is in the cache (`lqa pull smollm2-135m-instruct`).
fn write_default_derived_gguf(path: &Path) -> bool {
    use gguf_file::Value as V;
    let Some(src) = lqa::sources::cached_pinned(
        &lqa::sources::default_model_dir(),
        &lqa::sources::SMOLLM2_135M_INSTRUCT,
    ) else {
        return false;
    };
    let mut f = std::fs::File::open(&src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let arch = ct.metadata["general.architecture"]
        .to_string()
        .unwrap()
        .clone();
    let vocab = ct.metadata["tokenizer.ggml.tokens"].to_vec().unwrap().len();
    let tied = !ct.tensor_infos.contains_key("output.weight");
    let mut meta: Vec<(String, V)> = ct
        .metadata
        .into_iter()
        .filter(|(k, _)| {
            !k.ends_with(".rope.dimension_count")
                && !k.ends_with(".attention.key_length")
                && !k.ends_with(".attention.value_length")
        })
        .collect();
    for (k, v) in [
        ("block_count", 1),
        ("embedding_length", common::D),
        ("feed_forward_length", common::FF),
        ("attention.head_count", common::HEADS),
        ("attention.head_count_kv", common::KV_HEADS),
    ] {
        let key = format!("{arch}.{k}");
        meta.retain(|(m, _)| *m != key);
        meta.push((key, V::U32(v as u32)));
    }
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = common::tiny_weights_with(9, vocab, 1, tied);
    write_gguf(path, &meta, &weights);
    true
}

/// A GGUF file of these metadata and HF-named weights (matrices Q4_1, vectors F32).
fn write_gguf(
    path: &Path,
    meta: &[(String, gguf_file::Value)],
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
) {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|hf| {
            let t = &weights[hf];
            let dtype = if t.rank() == 2 {
                GgmlDType::Q4_1
            } else {
                GgmlDType::F32
            };
            let g = lqa::model::weights::GgufWeights::gguf_name(hf, lqa::config::Family::Llama)
                .expect("a GGUF name");
            (g, QTensor::quantize(t, dtype).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Every fixture `lqa::fuzz::TARGETS` names, valid.
fn write_fixtures(dir: &Path) {
    let model = write_tiny_chat_model(&dir.join("model"), 5);
    write_tiny_gguf(&dir.join("model.gguf"), 5);
    write_default_derived_gguf(&dir.join("default.gguf"));
    write_toy_latentqa_data(&dir.join("data"));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        repo.join("controls/promote_veganism.json"),
        dir.join("control.json"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("data/eval_prompts.json"),
        dir.join("eval_prompts.json"),
    )
    .unwrap();
    // a few instructions of the shipped set (the whole set is 58 kB)
    let all: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("data/instructions.json")).unwrap(),
    )
    .unwrap();
    let few: serde_json::Value = match all {
        serde_json::Value::Array(a) => a.into_iter().take(4).collect(),
        v => v,
    };
    std::fs::write(dir.join("instructions.json"), few.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "tensor".to_string(),
        candle_core::Tensor::arange(0f32, 24., &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("tensors.safetensors")).unwrap();

    // a LIT run of one step: its checkpoint (state.json, optimizer state, adapter), its split,
    // and the adapter saved as a decoder
    let target = std::sync::Arc::new(
        lqa::lm::LanguageModel::load(model.to_str().unwrap(), &Default::default()).unwrap(),
    );
    let cfg = lqa::lit::trainer::TrainConfig {
        data_dir: dir.join("data"),
        out_dir: dir.join("run"),
        eval_fraction: 0.34,
        seed: 3,
        batch_size: 2,
        grad_accum: 1,
        max_steps: Some(1),
        min_read_layer: 0,
        max_read_layer: 1,
        write_layer: 0,
        eval_every: 0,
        checkpoint_every: 1,
        ema: None,
        lora: lqa::lora::LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            ..lqa::lora::LoraConfig::paper_decoder()
        },
        ..Default::default()
    };
    std::fs::write(
        dir.join("run-config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let mut t = lqa::lit::trainer::Trainer::new(target.clone(), cfg.clone()).unwrap();
    t.train(|_| Ok(true)).unwrap();
    t.save_adapter(&dir.join("decoder"), candle_core::DType::F32)
        .unwrap();
    std::fs::rename(dir.join("run-config.json"), dir.join("run/config.json")).unwrap();

    // a control run of one step with that decoder: its checkpoint
    let decoder =
        lqa::latentqa::decoder::Decoder::load(target, Some(&dir.join("decoder"))).unwrap();
    let control = lqa::control::data::Control::load(&dir.join("control.json")).unwrap();
    let instructions =
        lqa::control::data::load_instructions(&dir.join("instructions.json")).unwrap();
    let ccfg = lqa::control::ControlConfig {
        samples: 2,
        batch_size: 2,
        r: 2,
        lora_alpha: 4.0,
        layers_to_optimize: vec![0, 1],
        checkpoint_every: 1,
        ..lqa::control::ControlConfig::paper()
    };
    let mut c = lqa::control::ControlOptimizer::new(&decoder, control, &instructions, ccfg.clone())
        .unwrap()
        .with_out_dir(&dir.join("control-run"))
        .unwrap();
    c.run(|_| Ok(true)).unwrap();
    std::fs::write(
        dir.join("control-run/config.json"),
        serde_json::to_string(&ccfg).unwrap(),
    )
    .unwrap();
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn no_loader_panics_hangs_or_allocates_without_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = match std::env::var_os("LQA_FUZZ_FIXTURES") {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().join("fixtures"),
    };
    let default_cached = lqa::sources::cached_pinned(
        &lqa::sources::default_model_dir(),
        &lqa::sources::SMOLLM2_135M_INSTRUCT,
    )
    .is_some();
    if !fixtures.join("control-run/config.json").exists()
        || default_cached && !fixtures.join("default.gguf").exists()
    {
        let _ = std::fs::remove_dir_all(&fixtures);
        write_fixtures(&fixtures);
    }
    let opts = lqa::fuzz::DriveOptions {
        seed: env("LQA_FUZZ_SEED", 14),
        cases: env("LQA_FUZZ_CASES", 12),
        seconds: env("LQA_FUZZ_SECONDS", 2.0),
        timeout: Duration::from_secs(env("LQA_FUZZ_TIMEOUT", 20)),
        failures: std::env::var_os("LQA_FUZZ_FAILURES").map(Into::into),
        only: std::env::var("LQA_FUZZ_ONLY")
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    };
    // a panic is caught and counted: keep the default hook from printing each one
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    LARGEST.store(0, Ordering::Relaxed);
    let reports = lqa::fuzz::drive(&fixtures, &tmp.path().join("scratch"), &opts);
    std::panic::set_hook(hook);
    let largest = LARGEST.load(Ordering::Relaxed);
    let table = lqa::fuzz::format_reports(&reports);
    println!("{table}largest single allocation: {largest} bytes");
    if opts.only.is_empty() {
        // every target runs (gguf_default only with the default model in the cache)
        let present = lqa::fuzz::TARGETS
            .iter()
            .filter(|t| fixtures.join(t.file).exists())
            .count();
        assert_eq!(reports.len(), present, "{table}");
        assert!(present >= lqa::fuzz::TARGETS.len() - 1, "{table}");
    }
    for (name, r) in &reports {
        assert!(r.panics.is_empty(), "{name} panicked:\n{table}");
        assert!(r.hangs.is_empty(), "{name} hung:\n{table}");
        // case 0 is the valid seed
        assert!(r.accepted >= 1, "{name}: the seed did not load:\n{table}");
    }
    // the fixtures are kilobytes: nothing a mutation declares may make a loader reserve more
    // than a fixed amount
    assert!(
        largest < 256 << 20,
        "a loader allocated {largest} bytes at once\n{table}"
    );
}
