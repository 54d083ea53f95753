//! Parity with PyTorch/transformers on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF
//! dequantized to f32): weight checksums, next-token logits, hidden states and greedy text,
//! against `../shared/reference/reference_values.json`.

mod common;
mod real;
use candle_core::{DType, Device, Tensor};
use lqa::generate::{generate, GenOptions};
use lqa::hooks::{HookPoint, Hooks};
use lqa::model::{Input, Logits};
use serde_json::Value;

fn close(a: f64, b: f64, rtol: f64, atol: f64) -> bool {
    (a - b).abs() <= atol + rtol * b.abs()
}

#[test]
fn weight_checksums_match_the_reference() {
    let m = real::model();
    let r = real::reference();
    for w in r["weights"].as_array().unwrap() {
        let name = w["name"].as_str().unwrap();
        let t = m.weight(name).unwrap_or_else(|| panic!("no weight {name}"));
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let t64 = t.to_dtype(DType::F64).unwrap();
        let sum = t64.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let l2 = common::l2_norm(&t64);
        let want_sum = w["sum"].as_f64().unwrap();
        let want_l2 = w["l2_norm"].as_f64().unwrap();
        assert!(
            close(l2, want_l2, 1e-4, 0.0),
            "{name}: l2 {l2} vs {want_l2}"
        );
        assert!(
            close(sum, want_sum, 1e-4, 0.05),
            "{name}: sum {sum} vs {want_sum}"
        );
        let row0: Vec<f32> = t
            .flatten_all()
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f64> = serde_json::from_value(w["first_row_first8"].clone()).unwrap();
        for (a, b) in row0.iter().zip(&want) {
            assert!(
                close(*a as f64, *b, 1e-4, 1e-6),
                "{name}: row0 {row0:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn next_token_logits_match_the_reference() {
    let m = real::model();
    let r = real::reference();
    for case in r["next_token_logits"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let input = Input::left_padded(&[ids], 2, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::Last);
        let logits = m
            .forward(&input, None, None)
            .unwrap()
            .logits
            .unwrap()
            .get(0)
            .unwrap();
        let v: Vec<f32> = logits.to_vec1().unwrap();
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        let top5: Vec<u64> = idx[..5].iter().map(|&i| i as u64).collect();
        let want_ids: Vec<u64> = serde_json::from_value(case["top5_ids"].clone()).unwrap();
        let name = case["name"].as_str().unwrap();
        assert_eq!(top5, want_ids, "{name}");
        let want_logits: Vec<f64> = serde_json::from_value(case["top5_logits"].clone()).unwrap();
        for (k, &i) in idx[..5].iter().enumerate() {
            assert!(
                close(v[i] as f64, want_logits[k], 1e-4, 1e-4),
                "{name}: top{k} {} vs {}",
                v[i],
                want_logits[k]
            );
        }
        let l64 = logits.to_dtype(DType::F64).unwrap();
        let sum = l64.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let norm = common::l2_norm(&l64);
        assert!(
            close(norm, case["logits_l2_norm"].as_f64().unwrap(), 1e-4, 0.0),
            "{name}: norm {norm}"
        );
        assert!(
            (sum - case["logits_sum"].as_f64().unwrap()).abs() < 2.0,
            "{name}: sum {sum}"
        );
    }
}

fn stats(t: &Tensor) -> (f64, f64) {
    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let mean = t.mean_all().unwrap().to_scalar::<f64>().unwrap();
    let var = t
        .broadcast_sub(&Tensor::new(mean, &Device::Cpu).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (mean, var.sqrt())
}

#[test]
fn hidden_states_match_the_reference() {
    let m = real::model();
    let r = real::reference();
    let hs = &r["hidden_states"];
    let ids: Vec<u32> = serde_json::from_value(hs["input_ids"].clone()).unwrap();
    let layers: Vec<&Value> = hs["layers"].as_array().unwrap().iter().collect();
    let mut hooks = Hooks::new();
    for l in &layers {
        hooks = hooks.capture(HookPoint::resid_post(l["layer"].as_u64().unwrap() as usize));
    }
    let input = Input::left_padded(std::slice::from_ref(&ids), 2, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::None);
    m.forward(&input, None, Some(&mut hooks)).unwrap();
    for l in layers {
        let layer = l["layer"].as_u64().unwrap() as usize;
        let t = hooks.captured[&HookPoint::resid_post(layer)]
            .get(0)
            .unwrap(); // [seq, d]
        let (mean, std) = stats(&t);
        let (mean_x, std_x) = stats(&t.narrow(0, 1, ids.len() - 1).unwrap());
        let g = |k: &str| l[k].as_f64().unwrap();
        // the mean is a cancelling sum: compare it against the std's scale
        assert!(
            (mean - g("mean")).abs() < 1e-4 * g("std"),
            "layer {layer}: mean {mean} vs {}",
            g("mean")
        );
        assert!(
            close(std, g("std"), 1e-4, 0.0),
            "layer {layer}: std {std} vs {}",
            g("std")
        );
        assert!(
            (mean_x - g("mean_excluding_first_token")).abs()
                < 1e-4 * g("std_excluding_first_token"),
            "layer {layer}: mean_x {mean_x}"
        );
        assert!(
            close(std_x, g("std_excluding_first_token"), 1e-4, 0.0),
            "layer {layer}: std_x {std_x} vs {}",
            g("std_excluding_first_token")
        );
        let last = t.get(ids.len() - 1).unwrap();
        let norm = common::l2_norm(&last);
        assert!(
            close(norm, g("last_token_l2_norm"), 1e-4, 0.0),
            "layer {layer}: norm {norm}"
        );
        let first8: Vec<f32> = last.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        let want: Vec<f64> = serde_json::from_value(l["last_token_first8"].clone()).unwrap();
        for (a, b) in first8.iter().zip(&want) {
            assert!(
                close(*a as f64, *b, 1e-3, 1e-3),
                "layer {layer}: {first8:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn greedy_continuations_match_the_reference() {
    let m = real::model();
    let r = real::reference();
    for case in r["greedy"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["generated_ids"].clone()).unwrap();
        let opts = GenOptions {
            max_new_tokens: want.len(),
            ..Default::default()
        };
        let got = generate(m, &[ids], 2, &opts, None).unwrap();
        assert_eq!(got[0], want, "{}", case["user_message"]);
    }
}
