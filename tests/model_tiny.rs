//! The model's mechanics on a tiny random Llama loaded through the real safetensors loader:
//! padding, KV cache, patches, captures, the differentiable path and bad weight files.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lqa::generate::{generate, GenOptions};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions, Site};
use lqa::model::{Input, Logits, Model};

fn model() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 7);
    let m = load_tiny(dir.path());
    (dir, m)
}

fn logits_all(m: &Model, rows: &[Vec<u32>]) -> (Tensor, Vec<usize>) {
    let input = Input::left_padded(rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::All);
    let pads = input.pads.clone();
    (m.forward(&input, None, None).unwrap().logits.unwrap(), pads)
}

#[test]
fn padded_batch_equals_rows_one_at_a_time() {
    let (_d, m) = model();
    let rows = vec![
        vec![5, 9, 14, 3, 77],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        vec![42],
    ];
    let (batch, pads) = logits_all(&m, &rows);
    assert_eq!(pads, vec![6, 0, 10]);
    for (r, row) in rows.iter().enumerate() {
        let (single, _) = logits_all(&m, std::slice::from_ref(row));
        let from_batch = batch.get(r).unwrap().narrow(0, pads[r], row.len()).unwrap();
        let diff = max_abs_diff(&from_batch, &single.get(0).unwrap());
        assert!(diff < 1e-4, "row {r}: max diff {diff}");
    }
}

#[test]
fn kv_cache_generation_equals_full_recompute() {
    let (_d, m) = model();
    let prompts = vec![vec![5, 9, 14, 3, 77], vec![8, 1, 60]];
    for temperature in [0.0, 0.9] {
        let opts = GenOptions {
            max_new_tokens: 24,
            temperature,
            seed: 3,
            ..Default::default()
        };
        let cached = generate(&m, &prompts, 0, &opts, None).unwrap();
        let full = generate(
            &m,
            &prompts,
            0,
            &GenOptions {
                use_cache: false,
                ..opts.clone()
            },
            None,
        )
        .unwrap();
        assert_eq!(cached, full, "temperature {temperature}");
        assert_eq!(cached[0].len(), 24);
        // batched generation equals generating each row alone (greedy)
        if temperature == 0.0 {
            for (r, p) in prompts.iter().enumerate() {
                let alone = generate(&m, std::slice::from_ref(p), 0, &opts, None).unwrap();
                assert_eq!(alone[0], cached[r], "row {r}");
            }
        }
    }
}

#[test]
fn generation_stops_on_stop_token() {
    let (_d, m) = model();
    let prompt = vec![vec![5, 9, 14]];
    let free = generate(
        &m,
        &prompt,
        0,
        &GenOptions {
            max_new_tokens: 16,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let stop = free[0][3];
    let first = free[0].iter().position(|&t| t == stop).unwrap();
    let stopped = generate(
        &m,
        &prompt,
        0,
        &GenOptions {
            max_new_tokens: 16,
            stop_ids: vec![stop],
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(stopped[0], free[0][..=first].to_vec());
}

#[test]
fn patch_changes_exactly_the_downstream_positions() {
    let (_d, m) = model();
    let row = vec![3u32, 17, 29, 41, 53, 65, 70, 2];
    let (clean, _) = logits_all(&m, std::slice::from_ref(&row));
    let p = 4;
    for site in [Site::ResidPost, Site::ResidPre, Site::MlpOut, Site::AttnOut] {
        let mut hooks = Hooks::new().patch(Patch {
            point: HookPoint::block(1, site),
            mode: PatchMode::Add,
            value: Tensor::ones(D, DType::F32, &Device::Cpu).unwrap(),
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
        for pos in 0..row.len() {
            let d = max_abs_diff(
                &clean.get(0).unwrap().get(pos).unwrap(),
                &patched.get(0).unwrap().get(pos).unwrap(),
            );
            if pos < p {
                assert_eq!(d, 0.0, "{site:?}: position {pos} before the patch changed");
            } else {
                assert!(
                    d > 1e-3,
                    "{site:?}: position {pos} after the patch unchanged ({d})"
                );
            }
        }
    }
}

#[test]
fn patch_positions_mean_the_same_in_a_padded_batch() {
    let (_d, m) = model();
    let short = vec![3u32, 17, 29];
    let long = vec![1u32, 2, 3, 4, 5, 6, 7];
    let value = Tensor::ones((2, D), DType::F32, &Device::Cpu).unwrap();
    let patch = |rows| Patch {
        point: HookPoint::resid_post(0),
        mode: PatchMode::Replace,
        value: value.clone(),
        positions: Positions::List(vec![1, 2]),
        rows,
    };
    let run = |rows: &[Vec<u32>], p: Patch| {
        let mut hooks = Hooks::new().patch(p);
        let input = Input::left_padded(rows, 0, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::All);
        (
            m.forward(&input, None, Some(&mut hooks))
                .unwrap()
                .logits
                .unwrap(),
            input.pads,
        )
    };
    let (alone, _) = run(std::slice::from_ref(&short), patch(None));
    let (batch, pads) = run(&[long.clone(), short.clone()], patch(Some(vec![1])));
    let from_batch = batch
        .get(1)
        .unwrap()
        .narrow(0, pads[1], short.len())
        .unwrap();
    assert!(max_abs_diff(&from_batch, &alone.get(0).unwrap()) < 1e-4);
    // row 0 was not patched
    let (clean_long, _) = logits_all(&m, std::slice::from_ref(&long));
    assert!(max_abs_diff(&batch.get(0).unwrap(), &clean_long.get(0).unwrap()) < 1e-4);
}

#[test]
fn capture_equals_the_value_seen_by_the_next_layer() {
    let (_d, m) = model();
    let row = vec![vec![3u32, 17, 29, 41, 53]];
    let pts = [
        HookPoint::embed(),
        HookPoint::block(0, Site::ResidPre),
        HookPoint::block(0, Site::ResidPost),
        HookPoint::block(1, Site::ResidPre),
        HookPoint::block(1, Site::AttnOut),
        HookPoint::block(1, Site::ResidMid),
        HookPoint::block(1, Site::MlpOut),
        HookPoint::block(1, Site::ResidPost),
        HookPoint::block(2, Site::ResidPre),
    ];
    let mut hooks = Hooks::new();
    for p in pts {
        hooks = hooks.capture(p);
    }
    let input = Input::left_padded(&row, 0, &Device::Cpu).unwrap();
    m.forward(&input, None, Some(&mut hooks)).unwrap();
    let c = &hooks.captured;
    assert_eq!(c[&pts[0]].dims(), &[1, 5, D]);
    assert_eq!(max_abs_diff(&c[&pts[0]], &c[&pts[1]]), 0.0);
    assert_eq!(max_abs_diff(&c[&pts[2]], &c[&pts[3]]), 0.0);
    assert_eq!(max_abs_diff(&c[&pts[7]], &c[&pts[8]]), 0.0);
    let mid = (&c[&pts[3]] + &c[&pts[4]]).unwrap();
    assert!(max_abs_diff(&mid, &c[&pts[5]]) < 1e-6);
    let post = (&c[&pts[5]] + &c[&pts[6]]).unwrap();
    assert!(max_abs_diff(&post, &c[&pts[7]]) < 1e-6);
    // the hidden state of a run stopped after block 1 is the capture at its output
    let mut stop = input.clone();
    stop.stop_after_layer = Some(1);
    let out = m.forward(&stop, None, None).unwrap();
    assert!(out.logits.is_none());
    assert_eq!(max_abs_diff(&out.hidden, &c[&pts[7]]), 0.0);
}

#[test]
fn replacing_with_the_capture_is_a_no_op() {
    let (_d, m) = model();
    let row = vec![vec![3u32, 17, 29, 41, 53]];
    let p = HookPoint::resid_post(1);
    let mut cap = Hooks::new().capture(p);
    let input = Input::left_padded(&row, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::All);
    let clean = m
        .forward(&input, None, Some(&mut cap))
        .unwrap()
        .logits
        .unwrap();
    let act = cap.captured[&p].get(0).unwrap();
    let mut patch = Hooks::new().patch(Patch {
        point: p,
        mode: PatchMode::Replace,
        value: act,
        positions: Positions::List((0..5).collect()),
        rows: None,
    });
    let patched = m
        .forward(&input, None, Some(&mut patch))
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(max_abs_diff(&clean, &patched), 0.0);
}

#[test]
fn steering_patch_at_all_positions_acts_during_cached_generation() {
    let (_d, m) = model();
    let prompt = vec![vec![5u32, 9, 14]];
    let steer = || {
        Hooks::new().patch(Patch {
            point: HookPoint::resid_post(0),
            mode: PatchMode::Add,
            value: (Tensor::ones(D, DType::F32, &Device::Cpu).unwrap() * 3.0).unwrap(),
            positions: Positions::All,
            rows: None,
        })
    };
    let opts = GenOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let plain = generate(&m, &prompt, 0, &opts, None).unwrap();
    let mut h1 = steer();
    let cached = generate(&m, &prompt, 0, &opts, Some(&mut h1)).unwrap();
    let mut h2 = steer();
    let full = generate(
        &m,
        &prompt,
        0,
        &GenOptions {
            use_cache: false,
            ..opts.clone()
        },
        Some(&mut h2),
    )
    .unwrap();
    assert_eq!(cached, full);
    assert_ne!(cached, plain);
}

#[test]
fn differentiable_ops_match_fused_kernels() {
    let (_d, m) = model();
    let rows = vec![vec![5u32, 9, 14, 3, 77], vec![1, 2, 3]];
    let mut input = Input::left_padded(&rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::All);
    let fused = m.forward(&input, None, None).unwrap().logits.unwrap();
    input.differentiable = true;
    let slow = m.forward(&input, None, None).unwrap().logits.unwrap();
    let d = max_abs_diff(&fused, &slow);
    assert!(d < 1e-4, "max diff {d}");
}

#[test]
fn bad_weight_files_name_the_problem() {
    use lqa::model::weights::SafetensorsWeights;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let cfg = lqa::config::ModelConfig::from_hf_json(&dir.path().join("config.json")).unwrap();
    let st = dir.path().join("model.safetensors");

    // a missing tensor
    let mut w = tiny_weights(1);
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, &st).unwrap();
    let mut src = SafetensorsWeights::open(std::slice::from_ref(&st)).unwrap();
    let err = Model::load(cfg.clone(), &mut src, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");

    // a wrong shape
    let mut w = tiny_weights(1);
    w.insert(
        "model.norm.weight".into(),
        Tensor::zeros(D + 1, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &st).unwrap();
    let mut src = SafetensorsWeights::open(std::slice::from_ref(&st)).unwrap();
    let err = Model::load(cfg.clone(), &mut src, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`model.norm.weight` has shape [65]"), "{err}");

    // a truncated file
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = SafetensorsWeights::open(std::slice::from_ref(&st))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // garbage
    std::fs::write(&st, b"not a safetensors file at all").unwrap();
    let err = SafetensorsWeights::open(std::slice::from_ref(&st))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn logits_at_columns_equal_the_full_logits_there() {
    let (_d, m) = model();
    let rows = vec![vec![5u32, 9, 14, 3, 77], vec![1, 2, 3]];
    let (all, pads) = logits_all(&m, &rows);
    let cols = vec![vec![1, 4], vec![pads[1] + 2]];
    let input = Input::left_padded(&rows, 0, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::At(cols.clone()));
    let at = m.forward(&input, None, None).unwrap().logits.unwrap();
    assert_eq!(at.dims(), &[3, VOCAB]);
    let mut k = 0;
    for (r, cs) in cols.iter().enumerate() {
        for &c in cs {
            let d = max_abs_diff(&at.get(k).unwrap(), &all.get(r).unwrap().get(c).unwrap());
            assert!(d < 1e-5, "row {r} col {c}: {d}");
            k += 1;
        }
    }
}

/// Activation Oracles' injection: at the patched positions the activation becomes
/// `h + ||h|| v / ||v||`, so the added vector has exactly the norm of `h` and the direction of
/// `v`; other positions, and other rows of a padded batch, are untouched.
#[test]
fn norm_matched_injection_adds_v_direction_at_the_norm_of_h() {
    let (_d, m) = model();
    let point = HookPoint::resid_post(1);
    let rows = vec![vec![5, 9, 14, 3, 77, 8], vec![1, 2, 3]];
    let run = |hooks: Hooks| -> (Tensor, Vec<usize>) {
        let mut hooks = hooks.capture(point);
        let input = Input::left_padded(&rows, 0, &Device::Cpu).unwrap();
        let pads = input.pads.clone();
        m.forward(&input, None, Some(&mut hooks)).unwrap();
        (hooks.captured.remove(&point).unwrap(), pads)
    };
    let (clean, pads) = run(Hooks::new());
    let positions = vec![1usize, 4];
    // v of a very different norm from h's, with a zero-free direction
    let v = Tensor::from_vec(
        lcg(2 * D, 5).iter().map(|x| *x as f32 * 40.0).collect(),
        (2, D),
        &Device::Cpu,
    )
    .unwrap();
    let (patched, _) = run(Hooks::new().patch(Patch {
        point,
        mode: PatchMode::AddNormMatched,
        value: v.clone(),
        positions: Positions::List(positions.clone()),
        rows: Some(vec![0]),
    }));
    let vec_at = |t: &Tensor, r: usize, p: usize| -> Vec<f32> {
        t.get(r).unwrap().get(p).unwrap().to_vec1().unwrap()
    };
    let norm = |x: &[f32]| x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    for pos in 0..rows[0].len() {
        let (h, out) = (
            vec_at(&clean, 0, pads[0] + pos),
            vec_at(&patched, 0, pads[0] + pos),
        );
        let added: Vec<f32> = out.iter().zip(&h).map(|(o, h)| o - h).collect();
        match positions.iter().position(|&p| p == pos) {
            None => assert_eq!(norm(&added), 0.0, "position {pos} changed"),
            Some(i) => {
                let vi: Vec<f32> = v.get(i).unwrap().to_vec1().unwrap();
                let (na, nh, nv) = (norm(&added), norm(&h), norm(&vi));
                assert!(
                    (na - nh).abs() <= 1e-5 * nh,
                    "position {pos}: |added| {na} vs |h| {nh}"
                );
                let cos = added
                    .iter()
                    .zip(&vi)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
                    / (na * nv);
                assert!((cos - 1.0).abs() < 1e-6, "position {pos}: cos {cos}");
            }
        }
    }
    // the other row is untouched
    assert_eq!(
        max_abs_diff(&clean.get(1).unwrap(), &patched.get(1).unwrap()),
        0.0
    );
    // a zero v adds nothing (no division by zero)
    let (zero, _) = run(Hooks::new().patch(Patch {
        point,
        mode: PatchMode::AddNormMatched,
        value: Tensor::zeros((2, D), DType::F32, &Device::Cpu).unwrap(),
        positions: Positions::List(positions),
        rows: None,
    }));
    assert_eq!(max_abs_diff(&clean, &zero), 0.0);
}
