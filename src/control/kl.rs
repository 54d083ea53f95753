//! The KL regulariser of control: keep the steered model's next-token distributions close to
//! the unsteered model's on the instruction set, so steering moves what the model talks about
//! without breaking how it talks.

use crate::hooks::Hooks;
use crate::model::{log_softmax, Input, Logits, Model};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

/// `KL(p_ref || p_steered)` of the next-token distributions, averaged over the tokens of `rows`
/// (each row's own tokens; left padding excluded). Differentiable through `steered` (and any
/// `hooks` on it); the reference runs without gradient. Zero when the two models agree. With
/// `recompute` the steered forward keeps only its blocks' inputs ([`crate::model::recompute`]).
pub fn kl_to_reference(
    steered: &Model,
    reference: &Model,
    rows: &[Vec<u32>],
    pad_id: u32,
    hooks: Option<&mut Hooks>,
    recompute: bool,
) -> Result<Tensor> {
    let input = Input::left_padded(rows, pad_id, steered.device())?.with_logits(Logits::All);
    let mut diff = input.clone();
    diff.differentiable = true;
    diff.recompute = recompute;
    let ls = steered
        .forward(&diff, None, hooks)?
        .logits
        .ok_or_else(|| Error::invalid("KL: the steered model returned no logits"))?;
    // the reference takes the same (differentiable) kernels, so equal models give exactly 0
    let lr = reference
        .forward(&diff, None, None)?
        .logits
        .ok_or_else(|| Error::invalid("KL: the reference model returned no logits"))?
        .detach();
    // in f32, or f64 when the model is (gradient checks)
    let lsm = |l: &Tensor| -> Result<Tensor> {
        if l.dtype() == DType::F64 {
            Ok(candle_nn::ops::log_softmax(l, D::Minus1)?)
        } else {
            log_softmax(l)
        }
    };
    let lp_s = lsm(&ls)?; // [b, s, vocab]
    let lp_r = lsm(&lr)?.to_dtype(lp_s.dtype())?;
    let per_pos = (lp_r.exp()? * (lp_r - &lp_s)?)?.sum(D::Minus1)?; // [b, s]
    let (b, s) = per_pos.dims2()?;
    let mut mask = vec![0f32; b * s];
    for (r, &pad) in input.pads.iter().enumerate() {
        for v in &mut mask[r * s + pad..(r + 1) * s] {
            *v = 1.0;
        }
    }
    let n: f32 = mask.iter().sum();
    let mask = Tensor::from_vec(mask, (b, s), per_pos.device())?.to_dtype(per_pos.dtype())?;
    Ok(
        ((per_pos * mask)?.sum_all()? / n.max(1.0) as f64)?.to_dtype(match ls.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        })?,
    )
}
