//! The ops a GPU runs, on the CPU: with `force_generic_ops` the model uses candle's generic ops
//! (RMSNorm, RoPE, softmax with a mask tensor, SwiGLU as two ops, weights stored transposed and
//! multiplied by candle's matmul) instead of lqa's fused CPU kernels and packed matmuls, as it
//! does on CUDA. Both paths give the same logits, padded batches, cached generations and LoRA
//! gradients, on the tiny Llama and on the Gemma 2 and Mistral fixtures (sliding windows,
//! soft-capping). The switch is process-wide: this file holds one test so that nothing else
//! runs beside it.

mod common;

use candle_core::{Device, Tensor};
use common::max_abs_diff;
use lqa::generate::{generate, GenOptions};
use lqa::lora::{Adapter, LoraConfig};
use lqa::model::ops::force_generic_ops;
use lqa::model::{Input, Logits, Model};
use std::path::Path;

fn logits(m: &Model, rows: &[Vec<u32>], generic: bool, differentiable: bool) -> Tensor {
    force_generic_ops(generic);
    let mut input = Input::left_padded(rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::All);
    input.differentiable = differentiable;
    let out = m.forward(&input, None, None).unwrap().logits.unwrap();
    force_generic_ops(false);
    out
}

fn greedy(m: &Model, rows: &[Vec<u32>], generic: bool) -> Vec<Vec<u32>> {
    force_generic_ops(generic);
    let opts = GenOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let out = generate(m, rows, 0, &opts, None).unwrap();
    force_generic_ops(false);
    out
}

/// The mean logit of the last row under a LoRA on every projection (B set non-zero), and the
/// gradient norm of the LoRA parameters.
fn lora_grad(m: &Model, rows: &[Vec<u32>], generic: bool) -> (f32, f32) {
    force_generic_ops(generic);
    let mut m = m.clone();
    let mut cfg = LoraConfig::paper_decoder();
    cfg.lora_dropout = 0.0;
    let adapter = Adapter::new(&m, cfg, 3).unwrap();
    for (name, v) in adapter.named_vars() {
        if name.contains("lora_B") {
            let t = (v.as_tensor().ones_like().unwrap() * 0.01).unwrap();
            v.set(&t).unwrap();
        }
    }
    adapter.attach(&mut m).unwrap();
    let mut input = Input::left_padded(rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::Last);
    input.differentiable = true;
    let y = m.forward(&input, None, None).unwrap().logits.unwrap();
    let loss = y.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut norm = 0f32;
    for (_, v) in adapter.named_vars() {
        let g = grads.get(v.as_tensor()).unwrap();
        norm += g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    }
    force_generic_ops(false);
    (loss.to_scalar::<f32>().unwrap(), norm.sqrt())
}

fn compare(name: &str, fused: &Model, generic: &Model, rows: &[Vec<u32>]) {
    for differentiable in [false, true] {
        let a = logits(fused, rows, false, differentiable);
        let b = logits(generic, rows, true, differentiable);
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 1e-4,
            "{name} (differentiable {differentiable}): max diff {d}"
        );
    }
    assert_eq!(
        greedy(fused, rows, false),
        greedy(generic, rows, true),
        "{name}: greedy tokens with the KV cache"
    );
    let (la, ga) = lora_grad(fused, rows, false);
    let (lb, gb) = lora_grad(generic, rows, true);
    assert!(
        (la - lb).abs() <= 1e-4 * la.abs().max(1.0),
        "{name}: loss {la} vs {lb}"
    );
    assert!(
        (ga - gb).abs() <= 1e-3 * ga.abs().max(1e-6),
        "{name}: grad norm {ga} vs {gb}"
    );
}

fn ids(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 37 + seed * 11) % (vocab - 3))
        .collect()
}

#[test]
fn generic_ops_equal_the_cpu_kernels() {
    // the tiny Llama (packed weights on the fused side)
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), 7);
    let fused = common::load_tiny(dir.path());
    force_generic_ops(true);
    let generic = common::load_tiny(dir.path());
    force_generic_ops(false);
    let v = fused.cfg.vocab_size as u32;
    let rows = vec![ids(5, 1, v), ids(11, 2, v), ids(1, 3, v)];
    compare("tiny llama", &fused, &generic, &rows);

    // families with sliding windows and soft-capping, where the fixtures are
    let arch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/arch");
    for fam in ["gemma2", "mistral"] {
        let d = arch.join(fam);
        if !d.join("config.json").is_file() {
            eprintln!("skipping {fam}: no fixture at {}", d.display());
            continue;
        }
        let load = |generic: bool| {
            force_generic_ops(generic);
            let lm = lqa::lm::LanguageModel::load(d.to_str().unwrap(), &Default::default());
            force_generic_ops(false);
            lm.unwrap().model
        };
        let (fused, generic) = (load(false), load(true));
        let v = fused.cfg.vocab_size.min(300) as u32;
        // a row longer than the fixtures' sliding window (8) beside shorter ones
        let rows = vec![ids(5, 1, v), ids(20, 2, v), ids(1, 3, v)];
        compare(fam, &fused, &generic, &rows);
    }
}
