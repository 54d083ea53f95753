//! The negative log-likelihood of target tokens under their logits, as one graph node.
//!
//! `-log_softmax(logits)[target]` composed of candle's ops is about ten passes over the
//! `[rows, vocab]` logits in the forward and as many in the backward (max, subtract, exp, sum,
//! log, gather; then a zeroed gradient for each of them, a scatter, broadcasts), most of them on
//! one thread: 49 152 columns make each pass 200 KB per row. Here the forward is one pass per
//! row for the row's `lse = log(sum(e^x))` and the backward one pass writing
//! `g (softmax - onehot)`, each on every thread.
//!
//! ```text
//! nll[r] = lse(x[r]) - x[r, t[r]]        dx[r] = dnll[r] (e^(x[r] - lse(x[r])) - onehot(t[r]))
//! ```

use super::kernels;
use super::ops::{cpu_kernels, f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// `-log_softmax(logits)[r, targets[r]]` for each row of `logits` `[rows, vocab]` (any float
/// dtype; computed in f32): `[rows]` f32, differentiable in `logits`. One fused node on the
/// CPU; candle's composition elsewhere.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> crate::Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        return Err(crate::Error::invalid(format!(
            "token_nll: {} targets for {rows} rows of logits",
            targets.len()
        )));
    }
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(crate::Error::invalid(format!(
            "token_nll: target {t} of row {r} is outside the vocabulary of {vocab}"
        )));
    }
    let logits = logits.to_dtype(DType::F32)?;
    if !cpu_kernels(logits.device()) {
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let tgt = Tensor::from_slice(targets, (rows, 1), logits.device())?;
        return Ok(logp.gather(&tgt, D::Minus1)?.squeeze(1)?.neg()?);
    }
    let op = Nll {
        targets: targets.to_vec(),
        lse: Mutex::new(None),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

struct Nll {
    targets: Vec<u32>,
    /// Each row's `lse`, from the forward, for the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

impl Nll {
    fn lse(x: &[f32], vocab: usize) -> Vec<f32> {
        let mut lse = vec![0f32; x.len() / vocab.max(1)];
        lse.par_iter_mut()
            .zip(x.par_chunks(vocab))
            .for_each(|(l, row)| kernels::log_sum_exp_row(row, l));
        lse
    }
}

impl CustomOp1 for Nll {
    fn name(&self) -> &'static str {
        "token-nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "token-nll")?;
        let (rows, vocab) = layout.shape().dims2()?;
        let lse = Self::lse(x, vocab);
        let nll: Vec<f32> = (0..rows)
            .map(|r| lse[r] - x[r * vocab + self.targets[r] as usize])
            .collect();
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("token-nll: a poisoned lock".into()))? = Some(lse);
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dnll: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = x.dims2()?;
        let kept = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("token-nll: a poisoned lock".into()))?
            .clone();
        let dx = with_f32(x, "token-nll", |xv| {
            let lse = kept.unwrap_or_else(|| Self::lse(xv, vocab));
            let g = dnll.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut dx = vec![0f32; rows * vocab];
            dx.par_chunks_mut(vocab)
                .zip(xv.par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (d, row))| {
                    kernels::nll_row_bwd(d, row, lse[r], self.targets[r] as usize, g[r])
                });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, (rows, vocab), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::rel_diff;
    use candle_core::{Device, Var};

    /// The fused node against candle's composition in f64: values and the logits' gradient
    /// under a weighted sum, on rows with a vocabulary that is not a multiple of the kernels'
    /// lanes, large logits, and a target at each end of the vocabulary.
    #[test]
    fn the_fused_nll_equals_the_composition() {
        let (rows, vocab) = (5, 1037);
        let vals: Vec<f32> = (0..rows * vocab)
            .map(|i| {
                ((i * 7919 % 1009) as f32 - 504.0) / 40.0 + if i % 997 == 0 { 30.0 } else { 0.0 }
            })
            .collect();
        let targets = [0u32, 1036, 17, 500, 3];
        let x = Var::from_vec(vals, (rows, vocab), &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, -0.5, 2.0, 0.25, 3.0], &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let y = match fused {
                true => token_nll(x.as_tensor(), &targets).unwrap(),
                false => {
                    let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
                    let lp = candle_nn::ops::log_softmax(&x64, D::Minus1).unwrap();
                    let t = Tensor::new(&targets, &Device::Cpu)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    lp.gather(&t, D::Minus1)
                        .unwrap()
                        .squeeze(1)
                        .unwrap()
                        .neg()
                        .unwrap()
                }
            };
            let y = y.to_dtype(DType::F64).unwrap();
            let loss = (&y * w.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
            (y, dx)
        };
        let ((y, dx), (y0, dx0)) = (run(true), run(false));
        assert!(
            rel_diff(&y, &y0) < 1e-6,
            "nll differs by {}",
            rel_diff(&y, &y0)
        );
        assert!(
            rel_diff(&dx, &dx0) < 1e-5,
            "dx differs by {}",
            rel_diff(&dx, &dx0)
        );
    }

    /// A target outside the vocabulary, or a count that does not match the rows, is an error
    /// that says which.
    #[test]
    fn bad_targets_are_errors() {
        let x = Tensor::zeros((2, 10), DType::F32, &Device::Cpu).unwrap();
        let e = token_nll(&x, &[1, 10]).unwrap_err().to_string();
        assert!(e.contains("target 10 of row 1"), "{e}");
        let e = token_nll(&x, &[1]).unwrap_err().to_string();
        assert!(e.contains("1 targets for 2 rows"), "{e}");
    }
}
