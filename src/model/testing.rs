//! Helpers of the model's unit tests.

use candle_core::{Device, Tensor};

/// A deterministic f32 CPU tensor of `shape`: `sin((i + seed) * 0.37)`.
pub fn t(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `max |a - b| / max |b|` of two f64 tensors.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d: f64 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let m: f64 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    d / m.max(1e-12)
}
