//! The optimizer pieces against formulas written out here independently: AdamW as PyTorch
//! computes it, global-norm clipping, gradient accumulation, the cosine schedule and the EMA.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use lqa::train::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWParams, Ema, GradAccumulator};
use std::collections::HashMap;

const A: [f64; 4] = [1.0, 3.0, 0.5, 10.0];
const C: [f64; 4] = [0.5, -1.0, 2.0, 0.25];
const P0: [f64; 4] = [0.0, 1.0, -1.5, 3.0];

/// The quadratic `0.5 · Σ a (p − c)²` of a variable, through candle's autograd.
fn quadratic_grads(p: &Var) -> GradStore {
    let dt = p.dtype();
    let a = Tensor::new(&A, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
    let c = Tensor::new(&C, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
    let d = p.as_tensor().broadcast_sub(&c).unwrap();
    let loss = (d.sqr().unwrap() * a)
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap();
    loss.backward().unwrap()
}

/// `torch.optim.AdamW.step` for one parameter tensor, in plain f64 (the single-tensor path of
/// `torch/optim/adamw.py`: decay, lerp, addcmul, bias corrections, addcdiv).
struct RefAdamW {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    #[allow(clippy::needless_range_loop)]
    fn step(&mut self, g: &[f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) {
        self.t += 1;
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        for i in 0..self.p.len() {
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let denom = self.v[i].sqrt() / bc2.sqrt() + eps;
            self.p[i] -= lr / bc1 * self.m[i] / denom;
        }
    }
}

fn values(v: &Var) -> Vec<f64> {
    v.as_tensor()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Follow the AdamW trajectory for `steps` steps (learning rate from a warm-up + cosine
/// schedule, so set_lr is exercised too) and compare to the reference at every step.
fn check_trajectory(dtype: DType, tol: f64) {
    let params = AdamWParams {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let p = Var::from_tensor(
        &Tensor::new(&P0, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], params).unwrap();
    let mut r = RefAdamW {
        p: P0.to_vec(),
        m: vec![0.0; 4],
        v: vec![0.0; 4],
        t: 0,
    };
    for step in 0..150 {
        let lr = cosine_lr(step + 1, 0.1, 5, 150, 0.1);
        opt.set_lr(lr);
        assert_eq!(opt.lr(), lr);
        // the reference's gradient is taken at its own parameters
        let g: Vec<f64> = (0..4).map(|i| A[i] * (r.p[i] - C[i])).collect();
        r.step(&g, lr, 0.9, 0.999, 1e-8, 0.01);
        opt.step(&quadratic_grads(&p)).unwrap();
        assert_eq!(opt.step_count(), step + 1);
        for (got, want) in values(&p).iter().zip(&r.p) {
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()),
                "step {}: {got} vs {want}",
                step + 1
            );
        }
    }
    // it made progress towards the minimum (weight decay pulls slightly towards 0)
    for (got, c) in values(&p).iter().zip(C) {
        assert!((got - c).abs() < 0.2, "{got} vs minimum {c}");
    }
}

#[test]
fn adamw_f64_matches_pytorch_formulas() {
    check_trajectory(DType::F64, 1e-12);
}

#[test]
fn adamw_f32_matches_pytorch_formulas() {
    check_trajectory(DType::F32, 2e-5);
}

#[test]
fn adamw_first_step_is_lr_times_sign() {
    // With zero weight decay Adam's first step is lr · g/(|g| + eps') in every coordinate.
    let p = Var::new(&[1.0f64, -2.0, 0.0], &Device::Cpu).unwrap();
    let params = AdamWParams {
        lr: 0.01,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], params).unwrap();
    let mut grads = GradStore::default();
    grads.insert(&p, Tensor::new(&[4.0f64, -0.5, 0.0], &Device::Cpu).unwrap());
    opt.step(&grads).unwrap();
    let got = values(&p);
    assert!((got[0] - 0.99).abs() < 1e-9, "{got:?}");
    assert!((got[1] + 1.99).abs() < 1e-9, "{got:?}");
    assert_eq!(got[2], 0.0);
}

#[test]
fn adamw_skips_vars_without_gradient() {
    let dev = Device::Cpu;
    let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
    let b = Var::new(&[3.0f32, 4.0], &dev).unwrap();
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWParams {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let grads = a
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&b).is_none());
    opt.step(&grads).unwrap();
    assert_eq!(
        values(&b),
        vec![3.0, 4.0],
        "b had no gradient: not even decayed"
    );
    assert_ne!(values(&a), vec![1.0, 2.0]);
    let state = opt.state_tensors();
    let vb = state["b.v"].to_vec1::<f32>().unwrap();
    assert_eq!(vb, vec![0.0, 0.0]);
}

#[test]
fn adamw_rejects_duplicate_names() {
    let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let r = AdamW::new(
        vec![("x".into(), a.clone()), ("x".into(), a)],
        AdamWParams::default(),
    );
    assert!(r.is_err());
}

fn bits(v: &Var) -> Vec<u32> {
    v.as_tensor()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn adamw_save_load_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let params = AdamWParams {
        lr: 0.05,
        ..Default::default()
    };
    let p = Var::from_tensor(
        &Tensor::new(&P0, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let mut opt = AdamW::new(vec![("layer.w".into(), p.clone())], params).unwrap();
    for _ in 0..7 {
        opt.step(&quadratic_grads(&p)).unwrap();
    }
    let path = dir.path().join("opt.safetensors");
    opt.save(&path).unwrap();
    let saved_p = p.as_tensor().copy().unwrap();
    let saved_state = opt.state_tensors();
    assert_eq!(
        saved_state
            .keys()
            .collect::<std::collections::BTreeSet<_>>(),
        ["layer.w.m".to_string(), "layer.w.v".to_string()]
            .iter()
            .collect()
    );
    for _ in 0..9 {
        opt.step(&quadratic_grads(&p)).unwrap();
    }
    let want = bits(&p);

    // from the file
    let q = Var::from_tensor(&saved_p).unwrap();
    let mut opt2 = AdamW::new(vec![("layer.w".into(), q.clone())], params).unwrap();
    opt2.load(&path).unwrap();
    assert_eq!(opt2.step_count(), 7);
    for _ in 0..9 {
        opt2.step(&quadratic_grads(&q)).unwrap();
    }
    assert_eq!(bits(&q), want);
    assert_eq!(opt2.step_count(), 16);

    // from the in-memory state
    let r = Var::from_tensor(&saved_p).unwrap();
    let mut opt3 = AdamW::new(vec![("layer.w".into(), r.clone())], params).unwrap();
    opt3.load_state(&saved_state, 7).unwrap();
    for _ in 0..9 {
        opt3.step(&quadratic_grads(&r)).unwrap();
    }
    assert_eq!(bits(&r), want);

    // no temporary file left behind
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("opt.safetensors")]);
}

#[test]
fn adamw_load_rejects_wrong_state() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let p = Var::new(&[1.0f32, 2.0], &dev).unwrap();
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWParams::default()).unwrap();
    // missing tensors
    let err = opt.load_state(&HashMap::new(), 3).unwrap_err();
    assert!(err.to_string().contains("p.m"), "{err}");
    // wrong shape
    let mut map = HashMap::new();
    map.insert(
        "p.m".to_string(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    map.insert(
        "p.v".to_string(),
        Tensor::zeros(2, DType::F32, &dev).unwrap(),
    );
    assert!(opt.load_state(&map, 3).is_err());
    assert_eq!(opt.step_count(), 0, "a failed load changes nothing");
    // a file that is not optimizer state
    let other = dir.path().join("weights.safetensors");
    candle_core::safetensors::save(&map, &other).unwrap();
    let err = opt.load(&other).unwrap_err();
    assert!(err.to_string().contains("weights.safetensors"), "{err}");
}

#[test]
fn clip_grad_norm_scales_and_returns_the_pre_clip_norm() {
    let dev = Device::Cpu;
    let a = Var::new(&[0.0f32, 0.0], &dev).unwrap();
    let b = Var::new(&[[0.0f32, 0.0], [0.0, 0.0]], &dev).unwrap();
    let make = || {
        let mut g = GradStore::default();
        g.insert(&a, Tensor::new(&[3.0f32, 0.0], &dev).unwrap());
        g.insert(
            &b,
            Tensor::new(&[[0.0f32, 4.0], [0.0, 12.0]], &dev).unwrap(),
        );
        g
    };
    let vars: Vec<Var> = vec![a.clone(), b.clone()];
    // norm = sqrt(9 + 16 + 144) = 13
    let mut g = make();
    let norm = clip_grad_norm(&mut g, &vars, 1.0).unwrap();
    assert!((norm - 13.0).abs() < 1e-9, "{norm}");
    let coef = 1.0 / (13.0 + 1e-6);
    let ga = g.get(&a).unwrap().to_vec1::<f32>().unwrap();
    let gb = g
        .get(&b)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((ga[0] as f64 - 3.0 * coef).abs() < 1e-6);
    assert!((gb[3] as f64 - 12.0 * coef).abs() < 1e-6);
    let clipped: f64 = ga
        .iter()
        .chain(&gb)
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");

    // below the threshold: untouched
    let mut g = make();
    let norm = clip_grad_norm(&mut g, &vars, 20.0).unwrap();
    assert!((norm - 13.0).abs() < 1e-9);
    assert_eq!(g.get(&a).unwrap().to_vec1::<f32>().unwrap(), vec![3.0, 0.0]);

    // a var without a gradient counts as zero; a gradient of a var not listed is ignored
    let mut g = make();
    let norm = clip_grad_norm(&mut g, &vars[..1], 1.0).unwrap();
    assert!((norm - 3.0).abs() < 1e-9);
    assert_eq!(
        g.get(&b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![0.0, 4.0, 0.0, 12.0]
    );
    let mut empty = GradStore::default();
    assert_eq!(clip_grad_norm(&mut empty, &vars, 1.0).unwrap(), 0.0);

    // a NaN gradient: reported, nothing scaled
    let mut g = make();
    g.insert(&a, Tensor::new(&[f32::NAN, 0.0], &dev).unwrap());
    assert!(clip_grad_norm(&mut g, &vars, 1.0).unwrap().is_nan());
    assert_eq!(
        g.get(&b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![0.0, 4.0, 0.0, 12.0]
    );
}

#[test]
fn grad_accumulator_sums_and_averages_micro_batches() {
    let dev = Device::Cpu;
    let w = Var::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
    let other = Var::new(&[5.0f32], &dev).unwrap();
    let mut acc = GradAccumulator::new(&[w.clone(), other.clone()]);
    assert!(acc.is_empty());
    let xs = [[1.0f32, 0.0, 2.0], [3.0, 1.0, 0.0], [0.0, 0.0, 4.0]];
    for x in &xs {
        // d/dw Σ w·x = x
        let x = Tensor::new(x, &dev).unwrap();
        let loss = (w.as_tensor() * x).unwrap().sum_all().unwrap();
        acc.add(&loss.backward().unwrap()).unwrap();
    }
    assert_eq!(acc.micro_batches(), 3);
    let g = acc.mean().unwrap();
    let got = g.get(&w).unwrap().to_vec1::<f32>().unwrap();
    let want = [4.0 / 3.0, 1.0 / 3.0, 2.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    assert!(g.get(&other).is_none());
    assert_eq!(
        g.get_ids().count(),
        1,
        "only the listed vars' gradients are kept"
    );
    assert!(acc.is_empty(), "finishing resets");

    let x = Tensor::new(&[1.0f32, 1.0, 1.0], &dev).unwrap();
    for _ in 0..2 {
        let loss = (w.as_tensor() * &x).unwrap().sum_all().unwrap();
        acc.add(&loss.backward().unwrap()).unwrap();
    }
    let g = acc.finish(0.25).unwrap();
    assert_eq!(g.get(&w).unwrap().to_vec1::<f32>().unwrap(), vec![0.5; 3]);
}

#[test]
fn cosine_lr_warms_up_then_decays() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    // HF get_cosine_schedule_with_warmup(warmup=10, total=110), base 1e-3
    assert_eq!(cosine_lr(0, 1e-3, 10, 110, 0.0), 0.0);
    assert!(close(cosine_lr(5, 1e-3, 10, 110, 0.0), 0.5e-3));
    assert!(close(cosine_lr(10, 1e-3, 10, 110, 0.0), 1e-3));
    assert!(close(cosine_lr(60, 1e-3, 10, 110, 0.0), 0.5e-3));
    let quarter = 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
    assert!(close(cosine_lr(35, 1e-3, 10, 110, 0.0), quarter));
    assert!(close(cosine_lr(110, 1e-3, 10, 110, 0.0), 0.0));
    assert!(
        close(cosine_lr(500, 1e-3, 10, 110, 0.0), 0.0),
        "stays at the floor"
    );
    // with a floor of 10%
    assert!(close(
        cosine_lr(60, 1e-3, 10, 110, 0.1),
        1e-3 * (0.1 + 0.9 * 0.5)
    ));
    assert!(close(cosine_lr(110, 1e-3, 10, 110, 0.1), 1e-4));
    assert!(
        close(cosine_lr(0, 1e-3, 10, 110, 0.1), 0.0),
        "warm-up starts at 0"
    );
    // no warm-up
    assert!(close(cosine_lr(0, 2.0, 0, 100, 0.0), 2.0));
    // monotone after warm-up
    let lrs: Vec<f64> = (10..=110)
        .map(|s| cosine_lr(s, 1.0, 10, 110, 0.0))
        .collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
}

#[test]
fn ema_averages_swaps_and_restores() {
    let dev = Device::Cpu;
    let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
    let named = vec![("w".to_string(), w.clone())];
    let mut ema = Ema::new(&named, 0.9).unwrap();
    // s0 = [1, -2]; w ← [2, 0]; s1 = 0.9 s0 + 0.1 w
    w.set(&Tensor::new(&[2.0f32, 0.0], &dev).unwrap()).unwrap();
    ema.update().unwrap();
    w.set(&Tensor::new(&[3.0f32, 1.0], &dev).unwrap()).unwrap();
    ema.update().unwrap();
    let s1 = [0.9 * 1.0 + 0.1 * 2.0, 0.9 * -2.0 + 0.1 * 0.0];
    let s2 = [0.9 * s1[0] + 0.1 * 3.0, 0.9 * s1[1] + 0.1 * 1.0];
    let shadow = ema.state_tensors()["w"].to_vec1::<f32>().unwrap();
    for (g, want) in shadow.iter().zip(s2) {
        assert!((*g as f64 - want).abs() < 1e-6, "{shadow:?} vs {s2:?}");
    }
    // swap in the averages, and back
    ema.swap().unwrap();
    assert!(ema.is_swapped());
    let inside = w.as_tensor().to_vec1::<f32>().unwrap();
    for (g, want) in inside.iter().zip(s2) {
        assert!((*g as f64 - want).abs() < 1e-6);
    }
    assert!(ema.update().is_err(), "no update while swapped");
    ema.swap().unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0, 1.0]);
    assert_eq!(ema.state_tensors()["w"].to_vec1::<f32>().unwrap(), shadow);

    // state round trip
    let state = ema.state_tensors();
    let mut ema2 = Ema::new(&named, 0.9).unwrap();
    ema2.load_state(&state).unwrap();
    assert_eq!(ema2.state_tensors()["w"].to_vec1::<f32>().unwrap(), shadow);
    assert!(ema2.load_state(&HashMap::new()).is_err());
    assert!(Ema::new(&named, 1.5).is_err());
}

#[test]
fn ema_shadow_is_not_aliased_to_the_var() {
    // Var::set writes in place: an average that shared the var's storage would follow it.
    let dev = Device::Cpu;
    let w = Var::new(&[1.0f32], &dev).unwrap();
    let mut ema = Ema::new(&[("w".to_string(), w.clone())], 0.5).unwrap();
    w.set(&Tensor::new(&[3.0f32], &dev).unwrap()).unwrap();
    ema.update().unwrap();
    assert_eq!(
        ema.state_tensors()["w"].to_vec1::<f32>().unwrap(),
        vec![2.0]
    );
}
