//! Helpers of the model's unit tests.

use super::ops::first_key;
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

/// The additive causal mask `[b, 1, s, s]` (f32; 0 where a query sees a key, -inf elsewhere)
/// of rows left-padded by `pads`, with an optional sliding `window`.
pub fn causal_mask(pads: &[usize], s: usize, window: Option<usize>) -> Tensor {
    let b = pads.len();
    let mut m = vec![f32::NEG_INFINITY; b * s * s];
    for (bi, &pad) in pads.iter().enumerate() {
        for q in 0..s {
            for k in first_key(pad, q, window)..=q {
                m[(bi * s + q) * s + k] = 0.0;
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu).unwrap()
}
