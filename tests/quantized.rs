//! Quantized frozen weights (`weights: "native"`, `"q8_0"`, `"q4_k"`): the kernel against
//! dequantize-then-multiply for every block type, gradients through a quantized base with a
//! LoRA, and the default model's parity with its f32 path.
//!
//! Tolerances come from the kernel's arithmetic (`lqa::model::quant`). From two activation
//! rows on, `W` is dequantized block by block into an f32 matmul: the same products as the f32
//! path, summed in another order, so `|err| <= k eps sum_i |w_i x_i|`. A single row (decode) of
//! Q4_0, Q8_0 or a K type runs candle's integer kernel on two 8-bit terms, `x^ = q8(x)` and `r^ = q8(x - x^)`, in the
//! weight type's dot-product blocks (Q8_0/Q8_1 of 32, Q8_K of 256). The weight is used exactly
//! as `dequantize` gives it, so the error is `sum_i w_i (x^_i + r^_i - x_i)` plus rounding: with
//! `a_b = max |x|` over an activation block, `|x - x^| <= a_b (1/254 + 2^-11)` (half a step,
//! and the f16 block scale), hence `|r^ - r| <= a_b (1/254 + 2^-11)^2`. Q8_1 (Q4_1, Q5_1) also
//! carries the block sum `s` in f16, which meets the weight block's minimum `m` (`|m| <=
//! max |w|`): `32 a_b 2^-11 max_b |w|` more per block.

mod common;
mod real;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use lqa::generate::{generate, GenOptions};
use lqa::lm::{LanguageModel, LoadOptions};
use lqa::model::linear::{Linear, LoraWeights};
use lqa::model::quant::{QuantWeight, WeightFormat};
use lqa::model::{Input, Logits};
use std::sync::{Arc, OnceLock};

/// Deterministic values in [-1, 1) (`common::lcg`, as f32).
fn lcg(n: usize, seed: u64) -> Vec<f32> {
    common::lcg(n, seed).into_iter().map(|v| v as f32).collect()
}

/// The largest `|t|` over all elements.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest `|a - b|` over two slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The bound of the header for one output of an `m`-row product: `x` `[k]`, `w` a row `[k]`.
/// Activation blocks are taken as 256 wide (an upper bound for 32-wide ones too: a larger
/// block's max is larger).
/// `offset`: the gemv forms Q4_1's blocks as `d (sum q x) + m (sum x)`, whose rounding scales
/// with `sum (|w| + 2|m|) |x|` (`|d q| <= |w| + |m|`; `|m|`, the block's offset, is at most its
/// largest `|w|`).
fn bound(x: &[f32], w: &[f32], ty: GgmlDType, split: bool, offset: bool) -> f32 {
    let k = x.len() as f32;
    let mag: f32 = if offset && ty == GgmlDType::Q4_1 {
        x.chunks(32)
            .zip(w.chunks(32))
            .map(|(xb, wb)| {
                let m = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
                xb.iter()
                    .zip(wb)
                    .map(|(a, b)| (b.abs() + 2.0 * m) * a.abs())
                    .sum::<f32>()
            })
            .sum()
    } else {
        x.iter().zip(w).map(|(a, b)| (a * b).abs()).sum()
    };
    // f32 sums in a different order (twice over for the two terms)
    let rounding = 2.0 * k * f32::EPSILON * mag + 1e-6;
    if !split {
        return rounding;
    }
    let step = 1.0 / 254.0 + 1.0 / 2048.0;
    let q8_1 = matches!(ty, GgmlDType::Q4_1 | GgmlDType::Q5_1);
    let mut b = 0f32;
    for (xb, wb) in x.chunks(256).zip(w.chunks(256)) {
        let a = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for w32 in wb.chunks(32) {
            let sum: f32 = w32.iter().map(|v| v.abs()).sum();
            b += a * step * step * sum;
            if q8_1 {
                let max = w32.iter().fold(0f32, |m, v| m.max(v.abs()));
                b += a * 32.0 / 2048.0 * max;
            }
        }
    }
    b + rounding
}

/// (a) Every forward path (candle's two-term 8-bit kernel, the f32 one, lqa's two-term panel
/// gemv where this CPU runs it) and `Linear` (which picks one by rows and type) against `x @ dequant(W)^T` in f32, for every type, at several
/// row counts m and output sizes n that leave 1-3 columns after the kernel's quads.
#[test]
fn quant_forward_matches_dequantize_then_matmul_for_every_type() {
    let k = 512;
    for (ti, &ty) in TYPES.iter().enumerate() {
        // largest error / bound: two-term kernel, f32 path, Linear, gemv
        let mut worst = [0f32; 4];
        for &n in &[1usize, 3, 6, 13, 33] {
            let w = Tensor::from_vec(lcg(n * k, 7 + ti as u64), (n, k), &Device::Cpu).unwrap();
            let w = (w * 0.5).unwrap();
            let q = QuantWeight::new(QTensor::quantize(&w, ty).unwrap(), "w").unwrap();
            let wd = q.dequantize().unwrap(); // [n, k]
            let wdv: Vec<f32> = wd.flatten_all().unwrap().to_vec1().unwrap();
            let lin = Linear::new_quant(q.clone(), None);
            for &m in &[1usize, 2, 3, 5, 17] {
                let xv = lcg(m * k, 100 + m as u64);
                let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = x
                    .matmul(&wd.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let lin_y: Vec<f32> = lin
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // lqa's two-term panel gemv where this CPU runs it
                let gemv = match q.is_panels() {
                    true => q.matmul_t_gemv(&xv, m).unwrap(),
                    false => want.clone(),
                };
                let paths = [
                    ("two-term", q.matmul_t_split(&xv, m).unwrap(), true, false),
                    ("f32", q.matmul_t_f32(&xv, m).unwrap(), false, false),
                    ("Linear", lin_y, true, true),
                    ("gemv", gemv, true, true),
                ];
                for (p, (what, got, split, offset)) in paths.iter().enumerate() {
                    for i in 0..m {
                        for j in 0..n {
                            let e = (got[i * n + j] - want[i * n + j]).abs();
                            let xi = &xv[i * k..(i + 1) * k];
                            let b = bound(xi, &wdv[j * k..(j + 1) * k], ty, *split, *offset);
                            assert!(
                                e <= b,
                                "{ty:?} {what} m={m} n={n} [{i},{j}]: {} vs {} (error {e}, \
                                 bound {b})",
                                got[i * n + j],
                                want[i * n + j]
                            );
                            worst[p] = worst[p].max(e / b);
                        }
                    }
                }
            }
        }
        println!(
            "{ty:?}: largest error / bound: two-term 8-bit {:.3}, f32 path {:.3}, Linear {:.3}, \
             panel gemv {:.3} (run: {})",
            worst[0],
            worst[1],
            worst[2],
            worst[3],
            lqa::model::qgemv::supported(ty)
        );
    }
}

/// lqa's panel matrix-vector kernels (`lqa::model::qgemv`), with each instruction set this CPU
/// has (AVX2 and AVX-512 VNNI on one machine), against `dequant(W) x` in f64: odd and even
/// block counts, row counts around the 16-row panels and the 64-row tasks, activation blocks of
/// zeros and of very different magnitudes (each block has its own 8-bit scale), and offsets
/// that make Q4_1's `m (sum x)` term large. Bound as [`bound`]'s two-term one. The panels give
/// back the file's blocks exactly, and dequantize (k-major, for the prefill) to their values.
#[test]
fn qgemv_matches_dequantized_product_on_every_isa_and_tail() {
    use lqa::model::qgemv::{cpu_has, Isa, Panels};
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| cpu_has(i))
        .collect();
    println!("qgemv instruction sets on this CPU: {isas:?}");
    let mut checked = 0;
    for ty in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for &k in &[32usize, 96, 224, 576] {
            for &n in &[1usize, 15, 16, 17, 31, 33, 70] {
                // weights with a per-row offset, so Q4_1's minimum is far from zero
                let wv: Vec<f32> = lcg(n * k, k as u64 + n as u64)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * 0.5 + if (i / k) % 2 == 0 { 0.75 } else { 0.0 })
                    .collect();
                let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
                let qt = QTensor::quantize(&w, ty).unwrap();
                let blocks = qt.data().unwrap().to_vec();
                let p = Panels::pack(ty, &blocks, n, k).unwrap();
                assert_eq!(p.unpack_rows(0, n), blocks, "{ty:?} [{n}, {k}] round trip");
                assert_eq!(p.unpack_rows(n / 2, n), blocks[n / 2 * blocks.len() / n..]);
                let wd: Vec<f32> = qt
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // the prefill's k-major dequantization: exactly the blocks' values
                for r0 in [0, 16].into_iter().filter(|&r| r < n) {
                    let (t, ld) = p.dequantize_rows_t(r0, n).unwrap();
                    assert_eq!(ld, (n - r0).div_ceil(16) * 16);
                    for i in 0..n - r0 {
                        for c in 0..k {
                            assert_eq!(
                                t[c * ld + i],
                                wd[(r0 + i) * k + c],
                                "{ty:?} row {i} col {c}"
                            );
                        }
                    }
                }
                // block 0 zeros, block 1 a hundred times larger than the rest
                let mut x = lcg(k, 1000 + k as u64);
                if k >= 96 {
                    x[..32].fill(0.0);
                    x[32..64].iter_mut().for_each(|v| *v *= 100.0);
                }
                for &isa in &isas {
                    let mut y = vec![f32::NAN; n];
                    p.gemv_on(isa, &x, &mut y).unwrap();
                    // three rows at once: each row exactly as alone
                    let x3: Vec<f32> = [lcg(k, 5), x.clone(), lcg(k, 6)].concat();
                    let mut y3 = vec![f32::NAN; 3 * n];
                    p.gemm_on(isa, &x3, 3, &mut y3).unwrap();
                    assert_eq!(
                        &y3[n..2 * n],
                        &y[..],
                        "{ty:?} {isa:?} [{n}, {k}] gemm row 1"
                    );
                    for j in 0..n {
                        let row = &wd[j * k..(j + 1) * k];
                        let want: f64 =
                            row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let e = (y[j] as f64 - want).abs() as f32;
                        let b = bound(&x, row, ty, true, true);
                        assert!(
                            e <= b,
                            "{ty:?} {isa:?} k={k} n={n} row {j}: {} vs {want} (error {e}, bound {b})",
                            y[j]
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(isas.is_empty() || checked > 0);
    // a type the kernels don't take, a length that isn't whole blocks, a wrong x: errors
    assert!(Panels::pack(GgmlDType::Q4K, &[0u8; 144], 1, 256).is_err());
    assert!(Panels::pack(GgmlDType::Q8_0, &[0u8; 34], 1, 33).is_err());
    if let Some(&isa) = isas.first() {
        let p = Panels::pack(GgmlDType::Q8_0, &[0u8; 34], 1, 32).unwrap();
        let mut y = [0f32; 1];
        assert!(p.gemv_on(isa, &[0f32; 33], &mut y).is_err());
        p.gemv_on(isa, &[1f32; 32], &mut y).unwrap();
        assert_eq!(y[0], 0.0);
    }
}

/// Several weights of one input in one product (`gemm_many`: a layer's q, k and v), of mixed
/// types (so the row is split for each integer offset) and sizes: every output exactly as the
/// weight's own product; and `Linear::forward_many` equals each `forward` on the default
/// model's native q, k and v, and declines where a weight carries an adapter.
#[test]
fn gemm_many_equals_each_product() {
    use lqa::model::qgemv::{cpu_has, gemm_many_on, Isa, Panels};
    let k = 96;
    let shapes = [
        (GgmlDType::Q4_0, 33),
        (GgmlDType::Q8_0, 16),
        (GgmlDType::Q4_1, 70),
    ];
    let panels: Vec<Panels> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(ty, n))| {
            let w = Tensor::from_vec(lcg(n * k, 40 + i as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, ty).unwrap();
            Panels::pack(ty, &q.data().unwrap(), n, k).unwrap()
        })
        .collect();
    let m = 3;
    let x = lcg(m * k, 9);
    for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| cpu_has(i)) {
        let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(_, n)| vec![f32::NAN; m * n]).collect();
        let refs: Vec<&Panels> = panels.iter().collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        gemm_many_on(isa, &refs, &x, m, &mut outs).unwrap();
        for (p, y) in panels.iter().zip(&ys) {
            let mut want = vec![0f32; y.len()];
            p.gemm_on(isa, &x, m, &mut want).unwrap();
            assert_eq!(y, &want, "{isa:?} {:?}", p.dtype());
        }
    }
    // through the model's linears
    let q = &native().model;
    let lin = |p: &str| {
        q.linear(&format!("model.layers.3.self_attn.{p}_proj"))
            .unwrap()
    };
    let (lq, lk, lv) = (lin("q"), lin("k"), lin("v"));
    let x = Tensor::from_vec(lcg(2 * 576, 5), (1, 2, 576), &Device::Cpu).unwrap();
    if lq.quant().is_some_and(|w| w.is_panels()) {
        let [a, b, c] = Linear::forward_many([lq, lk, lv], &x)
            .unwrap()
            .expect("fused");
        for (got, l) in [(a, lq), (b, lk), (c, lv)] {
            assert_eq!(max_abs(&(got - l.forward(&x).unwrap()).unwrap()), 0.0);
        }
    }
    let mut with_lora = lq.clone();
    with_lora.lora = Some(Arc::new(LoraWeights {
        a: Var::zeros((8, 576), DType::F32, &Device::Cpu).unwrap(),
        b: Var::zeros((lq.out_features(), 8), DType::F32, &Device::Cpu).unwrap(),
        scale: 2.0,
        dropout: 0.0,
    }));
    assert!(Linear::forward_many([&with_lora, lk], &x)
        .unwrap()
        .is_none());
}

/// The input gradient of a quantized frozen weight is exactly `dy @ dequant(W)` (no
/// activation quantization in the backward), across the backward's 256-row chunks.
#[test]
fn quant_input_gradient_is_dy_times_dequantized_w() {
    let (m, n, k) = (5, 300, 256);
    let w = Tensor::from_vec(lcg(n * k, 3), (n, k), &Device::Cpu).unwrap();
    let q = QuantWeight::quantize(&w, GgmlDType::Q4K, "w").unwrap();
    let wd = q.dequantize().unwrap();
    let lin = Linear::new_quant(q, None);
    let x =
        Var::from_tensor(&Tensor::from_vec(lcg(m * k, 4), (m, k), &Device::Cpu).unwrap()).unwrap();
    let c = Tensor::from_vec(lcg(m * n, 5), (m, n), &Device::Cpu).unwrap();
    let loss = (lin.forward(x.as_tensor()).unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap();
    let want = c.matmul(&wd).unwrap();
    let d = max_abs(&(gx - &want).unwrap());
    let scale = max_abs(&want);
    println!("input gradient: max |dx - dy W| = {d:e} (max |dy W| = {scale})");
    assert!(d <= 1e-5 * scale, "{d} vs scale {scale}");
}

/// `loss = sum(c * y^2)` of a LoRA layer over the dequantized weight, in f64.
fn lora_loss_f64(
    x: &[f64],
    wd: &[f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    dims: (usize, usize, usize, usize),
    scale: f64,
) -> f64 {
    let (m, n, k, r) = dims;
    let mut loss = 0.0;
    for i in 0..m {
        let xa: Vec<f64> = (0..r)
            .map(|t| (0..k).map(|l| x[i * k + l] * a[t * k + l]).sum())
            .collect();
        for j in 0..n {
            let base: f64 = (0..k).map(|l| x[i * k + l] * wd[j * k + l]).sum();
            let lora: f64 = (0..r).map(|t| xa[t] * b[j * r + t]).sum();
            let y = base + scale * lora;
            loss += c[i * n + j] * y * y;
        }
    }
    loss
}

/// (b) A LoRA on a quantized frozen weight: the gradients of x, A and B from the custom
/// backward match central finite differences of the same loss on the dequantized weight in
/// f64. The forward differs from the f64 one by the activation quantization only (bounded as
/// in the header, here < 1 % of |y|), so the gradients agree to that order: 3 % of the
/// gradient's largest entry is the stated tolerance.
#[test]
fn lora_gradients_through_a_quantized_base_match_finite_differences() {
    let (m, n, k, r) = (3, 7, 64, 4);
    let scale = 0.5;
    let w = Tensor::from_vec(lcg(n * k, 11), (n, k), &Device::Cpu).unwrap();
    let q = QuantWeight::quantize(&w, GgmlDType::Q8_0, "w").unwrap();
    let wd: Vec<f64> = q
        .dequantize()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let av = lcg(r * k, 12);
    let bv = lcg(n * r, 13);
    let xv = lcg(m * k, 14);
    let cv = lcg(m * n, 15);
    let dev = &Device::Cpu;
    let a = Var::from_tensor(&Tensor::from_vec(av.clone(), (r, k), dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(bv.clone(), (n, r), dev).unwrap()).unwrap();
    let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (m, k), dev).unwrap()).unwrap();
    let c = Tensor::from_vec(cv.clone(), (m, n), dev).unwrap();
    let mut lin = Linear::new_quant(q, None);
    lin.lora = Some(Arc::new(LoraWeights {
        a: a.clone(),
        b: b.clone(),
        scale,
        dropout: 0.0,
    }));
    let y = lin.forward(x.as_tensor()).unwrap();
    let loss = (y.sqr().unwrap() * &c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let to64 = |v: &[f32]| v.iter().map(|&t| t as f64).collect::<Vec<f64>>();
    let (x64, a64, b64, c64) = (to64(&xv), to64(&av), to64(&bv), to64(&cv));
    let dims = (m, n, k, r);
    let h = 1e-4;
    let check = |what: &str, var: &Var, base: &[f64], which: usize| {
        let got: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut fd = vec![0f64; base.len()];
        for (i, f) in fd.iter_mut().enumerate() {
            let mut p = base.to_vec();
            let mut mm = base.to_vec();
            p[i] += h;
            mm[i] -= h;
            let eval = |v: &[f64]| match which {
                0 => lora_loss_f64(v, &wd, &a64, &b64, &c64, dims, scale),
                1 => lora_loss_f64(&x64, &wd, v, &b64, &c64, dims, scale),
                _ => lora_loss_f64(&x64, &wd, &a64, v, &c64, dims, scale),
            };
            *f = (eval(&p) - eval(&mm)) / (2.0 * h);
        }
        let big = fd.iter().fold(0f64, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&fd)
            .fold(0f64, |a, (g, f)| a.max((*g as f64 - f).abs()));
        println!("{what}: max |grad - fd| = {err:.3e}, max |fd| = {big:.3e}");
        assert!(err <= 0.03 * big, "{what}: {err} vs {big}");
    };
    check("dL/dx", &x, &x64, 0);
    check("dL/dA", &a, &a64, 1);
    check("dL/dB", &b, &b64, 2);
}

fn native() -> &'static LanguageModel {
    static M: OnceLock<LanguageModel> = OnceLock::new();
    M.get_or_init(|| {
        let opts = LoadOptions::default()
            .with_weights("native", false)
            .unwrap();
        LanguageModel::load(lqa::sources::DEFAULT_MODEL, &opts).expect("load native")
    })
}

fn last_logits(m: &lqa::model::Model, ids: &[u32]) -> Vec<f32> {
    let input = Input::left_padded(&[ids.to_vec()], 2, &Device::Cpu)
        .unwrap()
        .with_logits(Logits::Last);
    m.forward(&input, None, None)
        .unwrap()
        .logits
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn top(v: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(n);
    idx
}

/// The stated logit tolerance of the native path against f32. The prompt's rows run the f32
/// path (same products, another summation order: ~1e-6 relative per matmul). The last
/// position's lm_head (one row, the Q8_0 table) runs lqa's f32-activation gemv on AVX2 (again
/// only summation order: measured 1e-4), elsewhere the two-term 8-bit kernel: per logit at most
/// `sum_b a_b (1/254 + 2^-11)^2 sum_b |w|` (header), with this model's final normed state
/// (`a_b` up to ~30) and table rows (`sum |w|` ~30 over 576) about 0.015 worst case (measured
/// 1.1e-3 before the gemv existed). The tolerance covers both.
const NATIVE_LOGIT_TOL: f32 = 0.015;

/// (c) The default model with its Q4_1 blocks and Q8_0 embedding/lm_head as stored: the same
/// top-5 as the f32 path on the reference prompts, logits within [`NATIVE_LOGIT_TOL`].
#[test]
fn native_default_model_matches_the_f32_path() {
    let f = real::model();
    let q = &native().model;
    assert_eq!(q.weight_format(), WeightFormat::Native);
    let bytes = q.weight_bytes();
    println!("native weight bytes: {bytes:?}");
    assert!(
        bytes.contains_key("Q4_1") && bytes.contains_key("Q8_0"),
        "{bytes:?}"
    );
    for case in real::reference()["next_token_logits"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let lf = last_logits(f, &ids);
        let lq = last_logits(q, &ids);
        let d = max_diff(&lf, &lq);
        let (tf, tq) = (top(&lf, 5), top(&lq, 5));
        println!(
            "{name}: max |logit native - f32| = {d:.4}; top5 f32 {tf:?} native {tq:?}; \
             top1-top2 margin f32 {:.4} native {:.4}",
            lf[tf[0]] - lf[tf[1]],
            lq[tq[0]] - lq[tq[1]]
        );
        assert!(d <= NATIVE_LOGIT_TOL, "{name}: {d}");
        assert_eq!(tq, tf, "{name}: top-5");
    }
}

/// (c) Greedy continuation on the native weights against the f32 path's: equal for 16 tokens,
/// or the first divergent step is named with both paths' margins there.
#[test]
fn native_greedy_continuation_matches_the_f32_path() {
    let f = real::model();
    let q = &native().model;
    let case = &real::reference()["greedy"][0];
    let ids: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    let opts = GenOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    let gf = generate(f, std::slice::from_ref(&ids), 2, &opts, None).unwrap();
    let gq = generate(q, std::slice::from_ref(&ids), 2, &opts, None).unwrap();
    println!("f32:    {:?}\nnative: {:?}", gf[0], gq[0]);
    if gf[0] != gq[0] {
        let step = gf[0]
            .iter()
            .zip(&gq[0])
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let mut prefix = ids.clone();
        prefix.extend(&gf[0][..step]);
        let (lf, lq) = (last_logits(f, &prefix), last_logits(q, &prefix));
        let (tf, tq) = (top(&lf, 2), top(&lq, 2));
        panic!(
            "greedy continuations diverge at step {step}: f32 {} (margin {:.4}), native {} \
             (margin {:.4})",
            tf[0],
            lf[tf[0]] - lf[tf[1]],
            tq[0],
            lq[tq[0]] - lq[tq[1]]
        );
    }
}

/// The stated logit tolerance of `q8_0` quantize-on-load against f32: requantizing the
/// file's Q4_1 values to Q8_0 moves each weight by up to `max|w| / 254` of its block (the
/// activations are near exact, see the header), ~0.2 % per matmul, which through 30 blocks
/// moves the logits by ~0.5-0.9 (measured, see the printout).
const Q8_0_LOGIT_TOL: f32 = 1.2;

/// (d) `q8_0` quantize-on-load of the f32 model: the same top-1 on the reference prompts whose
/// f32 top1-top2 margin is over the tolerance (`raw_text` 2.48, `chat` 2.12). The `code` prompt's margin is 0.038, far
/// below what any 8-bit requantization of the weights moves the logits by: there the test
/// asks the top-1 to be one of f32's top 2, and prints which.
#[test]
fn q8_0_on_load_keeps_the_top1() {
    let f = real::model();
    let opts = LoadOptions::default().with_weights("q8_0", false).unwrap();
    let lm = LanguageModel::load(lqa::sources::DEFAULT_MODEL, &opts).unwrap();
    let q = &lm.model;
    let bytes = q.weight_bytes();
    println!("q8_0 weight bytes: {bytes:?}");
    assert!(!bytes.contains_key("Q4_1"), "{bytes:?}");
    for case in real::reference()["next_token_logits"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let (lf, lq) = (last_logits(f, &ids), last_logits(q, &ids));
        let d = max_diff(&lf, &lq);
        let (tf, tq) = (top(&lf, 2), top(&lq, 1));
        let margin = lf[tf[0]] - lf[tf[1]];
        println!(
            "{name}: q8_0 max |logit diff| = {d:.4}; top1 f32 {} (margin {margin:.4}) q8_0 {}",
            tf[0], tq[0]
        );
        assert!(d <= Q8_0_LOGIT_TOL, "{name}: {d}");
        if margin > Q8_0_LOGIT_TOL {
            assert_eq!(tq[0], tf[0], "{name}");
        } else {
            assert!(tf.contains(&tq[0]), "{name}: {tq:?} not in {tf:?}");
        }
    }
}

/// (e) `q4_k` on a model whose rows (576) are not a multiple of Q4_K's 256: an error naming
/// the tensor, before anything runs.
#[test]
fn q4_k_on_an_odd_row_length_names_the_tensor() {
    let opts = LoadOptions::default().with_weights("q4_k", false).unwrap();
    let err = LanguageModel::load(lqa::sources::DEFAULT_MODEL, &opts)
        .err()
        .expect("576-wide rows cannot be Q4_K")
        .to_string();
    println!("{err}");
    // the embedding table is the first weight loaded (and quantized, like the lm_head it is)
    assert!(err.contains("model.embed_tokens.weight"), "{err}");
    assert!(err.contains("256") && err.contains("Q4_K"), "{err}");
    // and the kernel-level message
    let w = Tensor::zeros((4, 100), DType::F32, &Device::Cpu).unwrap();
    let e = QuantWeight::quantize(&w, GgmlDType::Q8_0, "blk.0.x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.x") && e.contains("32"), "{e}");
}

/// Unknown weight options and contradictions with `dtype` are errors saying what is allowed.
#[test]
fn bad_weight_options_are_errors() {
    let e = LoadOptions::default()
        .with_weights("q3", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("native") && e.contains("q3"), "{e}");
    let bf = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    assert!(bf.clone().with_weights("native", true).is_err());
    assert_eq!(bf.with_weights("bf16", true).unwrap().dtype, DType::BF16);
    let o = LoadOptions::default().with_weights("bf16", false).unwrap();
    assert_eq!(o.dtype, DType::BF16);
}

/// The native weights are the f32 path's exactly once dequantized (the q/k permutation undone on
/// whole rows of blocks), so everything the two paths differ by is the kernel's arithmetic.
#[test]
fn native_weights_dequantize_to_the_f32_paths() {
    let f = real::model();
    let q = &native().model;
    let mut names: Vec<String> = f
        .linear_names()
        .into_iter()
        .map(|n| format!("{n}.weight"))
        .collect();
    names.push("model.embed_tokens.weight".into());
    for name in names {
        let a = f.weight(&name).unwrap();
        let b = q.weight(&name).unwrap();
        let d = max_abs(&(a - b).unwrap());
        assert!(d == 0.0, "{name}: {d}");
    }
}

/// A GGUF tensor in a type lqa does not keep quantized (Q8_1: a dot-product type, no file
/// should hold it) is an error naming the tensor and the type under `native` (under `f32` too:
/// candle cannot read Q8_1 from a file at all).
#[test]
fn native_names_an_unsupported_tensor_type() {
    use candle_core::quantized::gguf_file;
    let src = real::gguf_path();
    let mut r = std::io::BufReader::new(std::fs::File::open(&src).unwrap());
    let content = gguf_file::Content::read(&mut r).unwrap();
    let bad = "blk.3.ffn_up.weight";
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let mut q = content.tensor(&mut r, name, &Device::Cpu).unwrap();
        if name == bad {
            q = QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q8_1).unwrap();
        }
        tensors.push((name.clone(), q));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("odd.gguf");
    let md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
    drop(f);
    let name = path.to_str().unwrap();
    let native = LoadOptions::default()
        .with_weights("native", false)
        .unwrap();
    let err = LanguageModel::load(name, &native)
        .err()
        .expect("Q8_1")
        .to_string();
    println!("{err}");
    assert!(err.contains(bad) && err.contains("Q8_1"), "{err}");
    let err = LanguageModel::load(name, &LoadOptions::default())
        .err()
        .expect("Q8_1 under f32")
        .to_string();
    assert!(err.contains(bad), "{err}");
}

fn eval(code: &str) -> rhai::Dynamic {
    let mut rt = lqa::script::Runtime::new(lqa::script::RuntimeOptions::default());
    rt.eval(code).unwrap_or_else(|e| panic!("{code}: {e}"))
}

const LOAD_NATIVE: &str = r#"let m = load_model("smollm2-135m-instruct", #{weights: "native"});"#;

/// The script level: `load_model(name, #{weights: "native"})` reports its weights, chats the
/// reference's greedy reply, and captures, patches and steers like the f32 model.
#[test]
fn script_native_model_generates_and_takes_hooks() {
    real::gguf_path();
    let info = eval(&format!("{LOAD_NATIVE} m.info()")).cast::<rhai::Map>();
    println!("info: {info:?}");
    assert_eq!(info["weights"].clone().into_string().unwrap(), "native");
    let types = info["weight_types"].clone().cast::<rhai::Map>();
    assert!(
        types.contains_key("Q4_1") && types.contains_key("Q8_0"),
        "{types:?}"
    );
    let bytes = info["weight_bytes"].as_int().unwrap();
    assert!(bytes < 100_000_000, "{bytes}");
    let g = &real::reference()["greedy"][0];
    let msg = serde_json::to_string(g["user_message"].as_str().unwrap()).unwrap();
    let code = format!(
        "{LOAD_NATIVE} m.chat([#{{role: \"user\", content: {msg}}}], #{{max_new_tokens: 16, stop: false}})"
    );
    let got = eval(&code).into_string().unwrap();
    let want = g["generated_text"].as_str().unwrap();
    println!("native chat: {got:?}");
    assert!(want.starts_with(&got), "{got:?} vs {want:?}");
    // activation patching moves the answer as on f32 weights; patching a row with its own
    // activation changes nothing; a steering vector runs
    let code = format!(
        "{LOAD_NATIVE} let p = \"The capital of France is\"; let h = \"blocks.3.hook_resid_post\"; \
         let own = m.run_with_cache(p, [h])[h]; \
         let other = m.run_with_cache(\"The capital of Japan is\", [h])[h]; \
         let o = #{{max_new_tokens: 3}}; \
         [m.generate(p, o), m.run_with_hooks(p, [patch(h, own[3], 3)], o), \
          m.run_with_hooks(p, [patch(h, other[3], 3)], o), \
          m.run_with_hooks(p, [add(h, own[3] * 4.0, \"all\")], o)]"
    );
    let out: Vec<String> = eval(&code)
        .into_array()
        .unwrap()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    println!("{out:?}");
    assert_eq!(out[0], out[1]);
    assert!(out[0].contains("Paris"), "{out:?}");
    assert!(out[2].contains("Tokyo"), "{out:?}");
    // a bad value names the option and what it takes
    let mut rt = lqa::script::Runtime::new(lqa::script::RuntimeOptions::default());
    let e = rt
        .eval(r#"load_model("smollm2-135m-instruct", #{weights: "q3"})"#)
        .unwrap_err();
    assert!(e.contains("q3") && e.contains("native"), "{e}");
}

/// One LoRA training step (forward, loss, backward) on the default model: on `native` weights
/// the adapter's gradients equal the f32 model's (the prompt's 20 rows run the f32 path, and the
/// input gradients go through `dequant(W)` exactly), to 1e-3 of each gradient's scale. The
/// step's time on both is printed.
#[test]
fn lora_training_step_on_native_weights_matches_f32() {
    use lqa::lora::{Adapter, LoraConfig};
    let f = real::model();
    let q = &native().model;
    let cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        ..LoraConfig::paper_decoder()
    };
    let ad = Adapter::new(f, cfg, 1).unwrap();
    // non-zero B, so that A gets gradients too
    for (i, w) in ad.layers.values().enumerate() {
        let v = lcg(w.b.elem_count(), 50 + i as u64);
        let t = (Tensor::from_vec(v, w.b.dims(), &Device::Cpu).unwrap() * 0.01).unwrap();
        w.b.set(&t).unwrap();
    }
    let (mut fa, mut qa) = (f.clone(), q.clone());
    ad.attach(&mut fa).unwrap();
    ad.attach(&mut qa).unwrap();
    // more rows than `PANEL_MAX_ROWS`, so that the prompt runs the f32 path (shorter ones run
    // the panel kernels, whose two-term rounding `quant_forward_...` bounds)
    let ids: Vec<u32> = [1, 504, 3458, 314, 3575, 28, 655, 253, 1345, 30].repeat(2);
    assert!(ids.len() > lqa::model::quant::PANEL_MAX_ROWS);
    let step = |m: &lqa::model::Model| {
        let t = std::time::Instant::now();
        let mut input = Input::left_padded(std::slice::from_ref(&ids), 2, &Device::Cpu)
            .unwrap()
            .with_logits(Logits::All);
        input.differentiable = true;
        let logits = m.forward(&input, None, None).unwrap().logits.unwrap(); // [1, s, vocab]
        let lp = candle_nn::ops::log_softmax(&logits.get(0).unwrap(), 1).unwrap();
        let targets: Vec<u32> = ids[1..].to_vec();
        let tgt = Tensor::new(targets.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let picked = lp
            .narrow(0, 0, ids.len() - 1)
            .unwrap()
            .gather(&tgt, 1)
            .unwrap();
        let loss = picked.mean_all().unwrap().neg().unwrap();
        let g = loss.backward().unwrap();
        (
            loss.to_scalar::<f32>().unwrap(),
            g,
            t.elapsed().as_secs_f64(),
        )
    };
    let (lf, gf, tf) = step(&fa);
    let (lq, gq, tq) = step(&qa);
    println!("LoRA step: loss f32 {lf:.6} native {lq:.6}; time f32 {tf:.3}s native {tq:.3}s");
    assert!((lf - lq).abs() <= 1e-3 * lf.abs(), "{lf} vs {lq}");
    let mut worst = 0f32;
    for (name, v) in ad.named_vars() {
        let a = gf
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no f32 grad"));
        let b = gq
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no native grad"));
        let scale = max_abs(a);
        let d = max_abs(&(a - b).unwrap());
        assert!(d <= 1e-3 * scale + 1e-9, "{name}: {d} vs scale {scale}");
        worst = worst.max(d / (scale + 1e-12));
    }
    println!("largest gradient difference / scale over all LoRA tensors: {worst:.2e}");
}

/// Row blocks of a quantized weight (a fused projection's parts) and llama.cpp's q/k row
/// permutation undone on whole rows of blocks are exact: they equal the same operations on the
/// dequantized weight.
#[test]
fn quant_rows_and_permutation_are_exact() {
    let (heads, hd, k) = (3, 8, 64);
    let n = heads * hd;
    let w = Tensor::from_vec(lcg(n * k, 21), (n, k), &Device::Cpu).unwrap();
    for ty in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QuantWeight::quantize(&w, ty, "w").unwrap();
        let d = q.dequantize().unwrap();
        let part = q.rows(5, 11).unwrap().dequantize().unwrap();
        let want = d.narrow(0, 5, 11).unwrap();
        let diff = (part - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{ty:?} rows");
        let from = lqa::model::weights::unpermute_index(n, heads);
        let p = q.permute_rows(&from).unwrap().dequantize().unwrap();
        let want = lqa::model::weights::unpermute_rows(&d, heads).unwrap();
        let diff = (p - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{ty:?} permutation");
    }
    assert!(QuantWeight::quantize(&w, GgmlDType::Q8_0, "w")
        .unwrap()
        .rows(20, 5)
        .is_err());
}

/// Not a check: the two forward paths' times per row count, to place `quant::EXACT_MIN_ROWS` and `quant::simd_dot`
/// (`cargo test --test quantized quant_path_timing -- --ignored --nocapture`).
#[test]
#[ignore]
fn quant_path_timing() {
    for (ty, n, k) in [(GgmlDType::Q4_1, 1536, 576), (GgmlDType::Q8_0, 49152, 576)] {
        let w = Tensor::from_vec(lcg(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = QuantWeight::quantize(&w, ty, "w").unwrap();
        for m in [1usize, 2, 4, 8, 16] {
            let x = lcg(m * k, 2);
            let time = |f: &dyn Fn() -> Vec<f32>| {
                f();
                let t = std::time::Instant::now();
                let reps = 20;
                for _ in 0..reps {
                    std::hint::black_box(f());
                }
                t.elapsed().as_secs_f64() / reps as f64 * 1e3
            };
            let split = time(&|| q.matmul_t_split(&x, m).unwrap());
            let f32p = time(&|| q.matmul_t_f32(&x, m).unwrap());
            let gemv = time(&|| q.matmul_t_gemv(&x, m).unwrap());
            let gb = q.bytes() as f64 * m as f64 / 1e6;
            println!(
                "{ty:?} [{n}, {k}] m={m}: two-term int8 {split:.3} ms, f32 {f32p:.3} ms, \
                 gemv {gemv:.3} ms ({:.1} GB/s of weights)",
                gb / gemv
            );
            if let (1, Some(p)) = (m, q.panels()) {
                use lqa::model::qgemv::{cpu_has, Isa};
                for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| cpu_has(i)) {
                    // the best of 5 rounds of 200 (the machine's speed drifts)
                    let t = (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            let mut y = vec![0f32; n];
                            for _ in 0..200 {
                                p.gemv_on(isa, &x, &mut y).unwrap();
                                std::hint::black_box(&mut y);
                            }
                            t.elapsed().as_secs_f64() / 200.0 * 1e3
                        })
                        .fold(f64::MAX, f64::min);
                    println!("  gemv {isa:?}: {t:.3} ms ({:.1} GB/s)", gb / t);
                }
            }
        }
    }
}

/// Quantize-on-load from safetensors, for every family's tiny model (Phi-3's fused `qkv_proj`
/// and `gate_up_proj` split as row blocks of the quantized tensor): every `q8_0` weight is
/// exactly candle's Q8_0 of the f32 one, the logits stay within 8 % of their range of f32's
/// (these random tiny models amplify a weight's rounding more than trained ones: measured
/// 1.5-4.7 %), `native` (nothing to keep: safetensors hold floats) equals f32, and `q4_k` on
/// 64-wide rows names the tensor.
#[test]
fn every_family_quantizes_on_load_from_safetensors() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/arch");
    for fam in [
        "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
    ] {
        let dir = root.join(fam);
        let name = dir.to_str().unwrap();
        let load = |w: &str| {
            LanguageModel::load(
                name,
                &LoadOptions::default().with_weights(w, false).unwrap(),
            )
        };
        let f = load("f32").unwrap();
        let lf: Vec<f32> = f.logits("Hello world, again").unwrap().to_vec1().unwrap();
        let range = lf.iter().fold(0f32, |a, v| a.max(v.abs()));
        let q = load("q8_0").unwrap();
        assert!(q.model.weight_bytes().contains_key("Q8_0"), "{fam}");
        let lq: Vec<f32> = q.logits("Hello world, again").unwrap().to_vec1().unwrap();
        let d = max_diff(&lf, &lq);
        println!("{fam}: q8_0 max |logit diff| = {d:.4} (max |logit| {range:.3})");
        assert!(d <= 0.08 * range, "{fam}: {d} vs {range}");
        // every linear weight is exactly candle's Q8_0 of the f32 one (fused ones split after)
        for lin in f.model.linear_names() {
            let wn = format!("{lin}.weight");
            let wf = f.model.weight(&wn).unwrap();
            let want = QTensor::quantize(&wf, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let got = q.model.weight(&wn).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{fam}: {wn}");
        }
        let n = load("native").unwrap();
        let ln: Vec<f32> = n.logits("Hello world, again").unwrap().to_vec1().unwrap();
        assert_eq!(ln, lf, "{fam}: native on safetensors is f32");
        let e = load("q4_k").err().expect("64-wide rows").to_string();
        assert!(e.contains(".weight") && e.contains("256"), "{fam}: {e}");
    }
}
