//! Recomputed blocks (`Input::recompute`, `model::recompute`) give the same loss and the same
//! gradients as a forward that keeps every intermediate: LoRA factors of the decoder and of the
//! target (the gradient of control flows through the target), with LoRA dropout on, both
//! injection modes, and hooks inside a block (which keep that block whole).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use lqa::hooks::{HookPoint, Hooks, Site};
use lqa::latentqa::{latentqa_loss, latentqa_loss_with_hooks, Injection, LayerPlan, LossConfig};
use lqa::lora::{Adapter, LoraConfig};
use lqa::model::{recompute, Dropout, Model};

fn load(dir: &std::path::Path, dtype: DType) -> Model {
    let cfg = lqa::config::ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let mut src =
        lqa::model::weights::SafetensorsWeights::open(&[dir.join("model.safetensors")]).unwrap();
    Model::load(cfg, &mut src, dtype, &Device::Cpu).unwrap()
}

/// A model of the tiny family with an adapter whose B factors are non-zero.
fn adapted(seed: u64, dtype: DType) -> (Model, Adapter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), seed);
    let base = load(dir.path(), dtype);
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.25,
        ..LoraConfig::paper_decoder()
    };
    let ad = Adapter::new(&base, cfg, seed).unwrap();
    for (i, w) in ad.layers.values().enumerate() {
        let n = w.b.elem_count();
        let v: Vec<f64> = (0..n)
            .map(|j| (((j * 31 + i * 17) % 13) as f64 - 6.0) / 60.0)
            .collect();
        let t = Tensor::from_vec(v, w.b.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        w.b.set(&t).unwrap();
    }
    let mut m = base.clone();
    ad.attach(&mut m).unwrap();
    (m, ad, dir)
}

fn cfg(injection: Injection, write: usize, recompute: bool) -> LossConfig {
    LossConfig {
        layers: LayerPlan::new(2, write).injecting(injection),
        pad_id: 0,
        differentiable: true,
        grad_through_target: true,
        use_first_from: true,
        dropout: Some(Dropout { seed: 7 }),
        recompute,
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    l2_norm(&(&a - &b).unwrap()) / l2_norm(&a).max(1e-30)
}

/// Loss and every adapter factor's gradient (target's then decoder's), with and without
/// recomputation, agree.
fn check(dtype: DType, injection: Injection, write: usize, tol: f64) {
    let (target, tad, _d1) = adapted(3, dtype);
    let (decoder, dad, _d2) = adapted(4, dtype);
    let vars: Vec<Var> = tad.vars().into_iter().chain(dad.vars()).collect();
    let b = tiny_patched_batch();
    let mut runs = Vec::new();
    for rc in [false, true] {
        let out = latentqa_loss(&target, &decoder, &b, &cfg(injection, write, rc)).unwrap();
        let loss = out
            .loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let g = recompute::backward(&out.loss).unwrap();
        let grads: Vec<Option<Tensor>> = vars.iter().map(|v| g.get(v).cloned()).collect();
        runs.push((loss, grads));
    }
    let (l0, g0) = &runs[0];
    let (l1, g1) = &runs[1];
    assert_eq!(l0, l1, "the recomputed forward computes the same loss");
    let mut compared = 0;
    for (i, (a, b)) in g0.iter().zip(g1).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_err(a, b);
                assert!(
                    e < tol,
                    "{dtype:?} {injection:?}: variable {i}: relative error {e}"
                );
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("{dtype:?} {injection:?}: variable {i} has a gradient in one run only"),
        }
    }
    // every factor of the target's blocks up to the read layer, and all of the decoder's
    let target_blocks = tad.vars().len() - 2; // the lm_head's factors get none in the target
    assert!(
        compared >= target_blocks + dad.vars().len() - 2,
        "only {compared} gradients compared"
    );
}

#[test]
fn recomputed_blocks_give_the_same_gradients() {
    check(DType::F64, Injection::Replace, 0, 1e-9);
    check(DType::F64, Injection::AddNormMatched, 1, 1e-9);
    check(DType::F32, Injection::Replace, 0, 1e-5);
    check(DType::F32, Injection::AddNormMatched, 1, 1e-5);
}

#[test]
fn hooks_inside_a_block_keep_it_whole() {
    let (target, tad, _d1) = adapted(3, DType::F64);
    let (decoder, dad, _d2) = adapted(4, DType::F64);
    let b = tiny_patched_batch();
    let mut runs = Vec::new();
    for rc in [false, true] {
        let mut hooks = Hooks::new().capture(HookPoint::block(1, Site::MlpOut));
        let out = latentqa_loss_with_hooks(
            &target,
            &decoder,
            &b,
            &cfg(Injection::Replace, 0, rc),
            None,
            Some(&mut hooks),
        )
        .unwrap();
        let g = recompute::backward(&out.loss).unwrap();
        let captured = hooks.captured[&HookPoint::block(1, Site::MlpOut)].clone();
        let w = &dad.layers["model.layers.1.mlp.down_proj"];
        let ga = g.get(w.a.as_tensor()).unwrap().clone();
        let t = &tad.layers["model.layers.0.self_attn.q_proj"];
        let gt = g.get(t.a.as_tensor()).unwrap().clone();
        runs.push((captured, ga, gt));
    }
    assert!(rel_err(&runs[0].0, &runs[1].0) == 0.0);
    assert!(rel_err(&runs[0].1, &runs[1].1) < 1e-9);
    assert!(rel_err(&runs[0].2, &runs[1].2) < 1e-9);
}

/// Recomputed segments (here: f64, which the CPU's block nodes do not take) hand their
/// adapters' gradients to `recompute::backward`; a plain `loss.backward()` over them is an error,
/// never silently missing gradients.
#[test]
fn plain_backward_over_recomputed_segments_is_an_error() {
    let (target, _tad, _d1) = adapted(3, DType::F64);
    let (decoder, _dad, _d2) = adapted(4, DType::F64);
    let out = latentqa_loss(
        &target,
        &decoder,
        &tiny_patched_batch(),
        &cfg(Injection::Replace, 0, true),
    )
    .unwrap();
    let err = out.loss.backward().expect_err("an error").to_string();
    assert!(err.contains("recompute::backward"), "{err}");
}

/// Blocks trained on the CPU in f32 are one node each (`model::block_node`), recomputed or not,
/// whose adapter gradients travel through the graph: a plain `loss.backward()` gives every
/// factor the gradient `recompute::backward` gives.
#[test]
fn plain_backward_over_recomputed_block_nodes_is_complete() {
    let (target, tad, _d1) = adapted(3, DType::F32);
    let (decoder, dad, _d2) = adapted(4, DType::F32);
    let vars: Vec<Var> = tad.vars().into_iter().chain(dad.vars()).collect();
    let loss = || {
        latentqa_loss(
            &target,
            &decoder,
            &tiny_patched_batch(),
            &cfg(Injection::Replace, 0, true),
        )
        .unwrap()
        .loss
    };
    let (plain, session) = (
        loss().backward().unwrap(),
        recompute::backward(&loss()).unwrap(),
    );
    let mut compared = 0;
    for v in &vars {
        match (plain.get(v), session.get(v)) {
            (Some(a), Some(b)) => {
                assert_eq!(rel_err(a, b), 0.0);
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("a gradient in one backward only"),
        }
    }
    assert!(compared >= vars.len() - 2, "only {compared} compared");
}
