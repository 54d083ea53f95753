//! Does a decoder read? On behaviours held out from its training, compare its loss on the true
//! answer given the true activations with its loss given the activations of a *different*
//! behaviour (shuffled within the held-out set). A decoder that answers from the question alone
//! scores both the same; one that reads the activations scores the true ones lower.

use crate::latentqa::decoder::Decoder;
use crate::lit::data::{Example, LabelSplit, LitData};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct ReadingReport {
    /// Held-out examples scored.
    pub n: usize,
    /// Mean NLL (nats per answer token) with each example's own activations.
    pub true_mean: f64,
    /// Mean NLL with the activations of an example of another behaviour.
    pub shuffled_mean: f64,
    /// `shuffled_mean - true_mean`.
    pub gap: f64,
    /// Share of examples whose true-activation loss is lower than their shuffled one.
    pub win_rate: f64,
    /// Standard error of the mean per-example difference.
    pub gap_stderr: f64,
}

/// Score up to `limit` held-out examples (labels in `split.eval`), batched by `batch_size`.
pub fn reading_gap(
    decoder: &Decoder,
    data: &LitData,
    split: &LabelSplit,
    limit: Option<usize>,
    batch_size: usize,
    seed: u64,
) -> Result<ReadingReport> {
    let (_, mut eval) = data.split_with(split);
    let mut rng = SplitMix64::new(seed);
    rng.shuffle(&mut eval);
    if let Some(l) = limit {
        eval.truncate(l);
    }
    if eval.len() < 2 {
        return Err(Error::invalid("need at least two held-out examples"));
    }
    // a partner of a different label for each example
    let n = eval.len();
    let partner: Vec<usize> = (0..n)
        .map(|i| {
            for _ in 0..1000 {
                let j = rng.below(n as u64) as usize;
                if eval[j].item.label != eval[i].item.label {
                    return j;
                }
            }
            (i + 1) % n
        })
        .collect();
    let item = |e: &Example, dialog_of: &Example| {
        (
            dialog_of.item.read.messages.clone(),
            e.question.clone(),
            e.answer.clone(),
        )
    };
    let mut truth = Vec::with_capacity(n);
    let mut shuffled = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch_size.max(1)) {
        crate::interrupt::check()?;
        let t: Vec<_> = chunk.iter().map(|&i| item(&eval[i], &eval[i])).collect();
        let s: Vec<_> = chunk
            .iter()
            .map(|&i| item(&eval[i], &eval[partner[i]]))
            .collect();
        truth.extend(decoder.score_many(&t, false)?);
        shuffled.extend(decoder.score_many(&s, false)?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let diffs: Vec<f64> = shuffled.iter().zip(&truth).map(|(s, t)| s - t).collect();
    let dm = mean(&diffs);
    let var = diffs.iter().map(|d| (d - dm).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    Ok(ReadingReport {
        n,
        true_mean: mean(&truth),
        shuffled_mean: mean(&shuffled),
        gap: mean(&shuffled) - mean(&truth),
        win_rate: diffs.iter().filter(|&&d| d > 0.0).count() as f64 / n as f64,
        gap_stderr: (var / n as f64).sqrt(),
    })
}
