//! Does a decoder read? Held-out items scored three ways, the controls an interpretability
//! evaluation reports:
//!
//! - **true**: the item's own activations;
//! - **mismatched**: the activations of another item of the same kind and another label (a
//!   decoder that answers from the question alone scores both the same);
//! - **none**: nothing written at the placeholders (what the decoder answers with no
//!   activation at all).
//!
//! Per kind of item: the masked system prompt (`system`), the masked control turn
//! (`stimulus`), the unmasked control (`control`, the whole prompt is patched), and yes/no
//! classification (`classification`, accuracy: the answer with the lower loss of "Yes" and
//! "No"). Every figure is on the same items. Shares come with a 95 % Wilson interval. Optional:
//! the share of *generic* answers among generated ones (one answer given for at least 20 % of
//! the items), and a "behaviour shown" filter that keeps masked items whose control visibly
//! shapes the target's own reply.

use crate::control::measures::content_words;
use crate::generate::GenOptions;
use crate::latentqa::decoder::Decoder;
use crate::latentqa::{Activations, ReadDialog};
use crate::lit::data::{Example, ItemKind, LabelSplit, LitData};
use crate::lit::mixture;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What [`evaluate_reading`] scores.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// At most this many items of each kind (seeded sample); all when `None`.
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub seed: u64,
    /// Generate answers for this many items of each kind (true activations, greedy) and report
    /// the share of generic answers; 0: no generation.
    pub generate: usize,
    pub max_new_tokens: usize,
    /// Keep only masked items whose control shows in the target's own reply (see
    /// [`behaviour_shown`]).
    pub behaviour_shown: bool,
    /// Labelled sentences for the classification kind; `None`: no classification.
    pub classification_file: Option<PathBuf>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            limit: None,
            batch_size: 8,
            seed: 0,
            generate: 0,
            max_new_tokens: 32,
            behaviour_shown: false,
            classification_file: None,
        }
    }
}

/// A share with its 95 % Wilson score interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Share {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Share {
    /// `k` of `n`, with the Wilson interval (z = 1.96).
    pub fn of(k: usize, n: usize) -> Share {
        if n == 0 {
            return Share {
                value: f64::NAN,
                low: 0.0,
                high: 1.0,
            };
        }
        let (n, p, z) = (n as f64, k as f64 / n as f64, 1.96f64);
        let d = 1.0 + z * z / n;
        let center = (p + z * z / (2.0 * n)) / d;
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / d;
        Share {
            value: p,
            low: (center - half).max(0.0),
            high: (center + half).min(1.0),
        }
    }
}

/// One control against the true activations: the mean loss difference (control minus true),
/// its standard error, and how often the true activations give the lower loss.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Gap {
    pub mean: f64,
    pub stderr: f64,
    pub true_better: Share,
}

impl Gap {
    fn of(control: &[f64], truth: &[f64]) -> Gap {
        let d: Vec<f64> = control.iter().zip(truth).map(|(c, t)| c - t).collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Gap {
            mean,
            stderr: (var / n).sqrt(),
            true_better: Share::of(d.iter().filter(|&&x| x > 0.0).count(), d.len()),
        }
    }
}

/// Classification accuracy under each condition.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Accuracy {
    pub true_activations: Share,
    pub mismatched: Share,
    pub none: Share,
}

/// Generated answers: how many, the share of generic ones, the most common answer.
#[derive(Clone, Debug, Serialize)]
pub struct Generated {
    pub n: usize,
    /// Items whose answer is one given for at least 20 % of the items.
    pub generic: Share,
    pub top_answer: String,
    pub top_count: usize,
}

/// The report of one kind of item.
#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    /// `system`, `stimulus`, `control` or `classification`.
    pub kind: String,
    /// Whether the control was masked (only the stimulus patched).
    pub masked: bool,
    /// Items scored.
    pub n: usize,
    /// With the behaviour-shown filter: the items it looked at (`n` of them kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shown_of: Option<usize>,
    /// Mean loss (nats per answer token) of the true answer, per condition.
    pub loss_true: f64,
    pub loss_mismatched: f64,
    pub loss_none: f64,
    /// Mismatched minus true.
    pub gap_mismatched: Gap,
    /// None minus true.
    pub gap_none: Gap,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Accuracy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<Generated>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub kinds: Vec<KindReport>,
}

impl EvalReport {
    /// The report of a kind, by name.
    pub fn kind(&self, name: &str) -> Option<&KindReport> {
        self.kinds.iter().find(|k| k.kind == name)
    }
}

/// One scored item: the read dialog, the question and answer, the label (partners differ in
/// it), and for classification the other answer.
#[derive(Clone)]
struct Item {
    read: ReadDialog,
    label: String,
    question: String,
    answer: String,
}

impl Item {
    fn of(e: &Example) -> Item {
        Item {
            read: e.item.read.clone(),
            label: e.item.label.clone(),
            question: e.question.clone(),
            answer: e.answer.clone(),
        }
    }
}

/// Score every item's `answer(item)` with the activations of `dialog_of(i)` (or none), batched.
fn score(
    d: &Decoder,
    items: &[Item],
    partner: &[usize],
    activations: Activations,
    answer: impl Fn(&Item) -> String,
    batch_size: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in (0..items.len())
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
    {
        crate::interrupt::check()?;
        let batch: Vec<(ReadDialog, String, String)> = chunk
            .iter()
            .map(|&i| {
                let it = &items[i];
                (
                    items[partner[i]].read.clone(),
                    it.question.clone(),
                    answer(it),
                )
            })
            .collect();
        out.extend(d.score_reads(&batch, activations)?);
    }
    Ok(out)
}

/// For each item, another item of a different label (seeded; the next one if none is found).
fn partners(items: &[Item], rng: &mut SplitMix64) -> Vec<usize> {
    let n = items.len();
    (0..n)
        .map(|i| {
            for _ in 0..1000 {
                let j = rng.below(n as u64) as usize;
                if items[j].label != items[i].label {
                    return j;
                }
            }
            (i + 1) % n
        })
        .collect()
}

/// Does the control show in the target's reply? True when the reply to the whole dialog has a
/// content word of the control (the system prompt, or the control turn) that the reply to the
/// stimulus alone lacks. Items without a control (the unmasked kind) always pass.
pub fn behaviour_shown(
    d: &Decoder,
    reads: &[ReadDialog],
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<Vec<bool>> {
    let lm = &d.target;
    let gen = GenOptions {
        max_new_tokens,
        stop_ids: lm.stop_ids(),
        ..GenOptions::default()
    };
    let mut out = Vec::with_capacity(reads.len());
    for chunk in reads.chunks(batch_size.max(1)) {
        crate::interrupt::check()?;
        // (control text, the whole dialog, the stimulus alone)
        let parts: Vec<Option<(String, String, String)>> = chunk
            .iter()
            .map(|r| {
                let m = &r.messages;
                let (control, stimulus) = match m.first().map(|x| x.role.as_str()) {
                    Some("system") if m.len() >= 2 => (m[0].content.clone(), m[1..].to_vec()),
                    Some("user") if m.len() >= 3 => (m[0].content.clone(), m[2..].to_vec()),
                    _ => return Ok(None),
                };
                Ok(Some((
                    control,
                    lm.chat_prompt(m, true)?,
                    lm.chat_prompt(&stimulus, true)?,
                )))
            })
            .collect::<Result<_>>()?;
        let prompts: Vec<String> = parts
            .iter()
            .flatten()
            .flat_map(|(_, a, b)| [a.clone(), b.clone()])
            .collect();
        let replies = if prompts.is_empty() {
            Vec::new()
        } else {
            lm.generate(&prompts, &gen, None)?
        };
        let mut at = 0;
        for p in &parts {
            match p {
                None => out.push(true),
                Some((control, _, _)) => {
                    out.push(shows_control(control, &replies[at], &replies[at + 1]));
                    at += 2;
                }
            }
        }
    }
    Ok(out)
}

/// Does the reply `with` the control show it? It has a content word of `control` that the
/// reply `without` it lacks.
pub fn shows_control(control: &str, with: &str, without: &str) -> bool {
    let without = content_words(without);
    content_words(control)
        .intersection(&content_words(with))
        .any(|w| !without.contains(w))
}

/// The share of generic answers among `answers`: those equal (case and punctuation folded) to
/// an answer given for at least 20 % of them.
pub fn generic_share(answers: &[String]) -> Generated {
    let norm = |a: &str| crate::control::measures::words(a).join(" ");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for a in answers {
        *counts.entry(norm(a)).or_default() += 1;
    }
    let n = answers.len();
    let generic: usize = counts.values().filter(|&&c| c * 5 >= n).sum();
    let (top, top_count) = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(a, c)| (a.clone(), *c))
        .unwrap_or_default();
    let top_answer = answers
        .iter()
        .find(|a| norm(a) == top)
        .cloned()
        .unwrap_or_default();
    Generated {
        n,
        generic: Share::of(generic, n),
        top_answer,
        top_count,
    }
}

fn report_kind(
    d: &Decoder,
    kind: &str,
    masked: bool,
    mut items: Vec<Item>,
    opts: &EvalOptions,
    classification: bool,
) -> Result<Option<KindReport>> {
    let mut rng = SplitMix64::derive(opts.seed, crate::rng::fnv1a(0, kind.as_bytes()));
    rng.shuffle(&mut items);
    if let Some(l) = opts.limit {
        items.truncate(l);
    }
    let mut shown_of = None;
    if opts.behaviour_shown && masked {
        let reads: Vec<ReadDialog> = items.iter().map(|i| i.read.clone()).collect();
        let keep = behaviour_shown(d, &reads, 48, opts.batch_size)?;
        shown_of = Some(items.len());
        items = items
            .into_iter()
            .zip(keep)
            .filter_map(|(i, k)| k.then_some(i))
            .collect();
    }
    if items.len() < 2 {
        return Ok(None);
    }
    let own: Vec<usize> = (0..items.len()).collect();
    let partner = partners(&items, &mut rng);
    let bs = opts.batch_size;
    let truth = |i: &Item| i.answer.clone();
    let t = score(d, &items, &own, Activations::Read, truth, bs)?;
    let m = score(d, &items, &partner, Activations::Read, truth, bs)?;
    let z = score(d, &items, &own, Activations::None, truth, bs)?;
    let accuracy = if classification {
        let other = |i: &Item| if i.answer == "Yes" { "No" } else { "Yes" }.to_string();
        let t2 = score(d, &items, &own, Activations::Read, other, bs)?;
        let m2 = score(d, &items, &partner, Activations::Read, other, bs)?;
        let z2 = score(d, &items, &own, Activations::None, other, bs)?;
        let acc = |a: &[f64], b: &[f64]| {
            Share::of(a.iter().zip(b).filter(|(x, y)| x < y).count(), a.len())
        };
        Some(Accuracy {
            true_activations: acc(&t, &t2),
            mismatched: acc(&m, &m2),
            none: acc(&z, &z2),
        })
    } else {
        None
    };
    let generated = if opts.generate > 0 {
        let mut gen = d.ask_options().gen;
        gen.max_new_tokens = opts.max_new_tokens;
        let mut answers = Vec::new();
        for it in items.iter().take(opts.generate) {
            crate::interrupt::check()?;
            let reading = d.read_of(&it.read, None)?;
            answers.extend(d.answer(
                &reading,
                std::slice::from_ref(&it.question),
                &gen,
                Activations::Read,
            )?);
        }
        Some(generic_share(&answers))
    } else {
        None
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(Some(KindReport {
        kind: kind.to_string(),
        masked,
        n: items.len(),
        shown_of,
        loss_true: mean(&t),
        loss_mismatched: mean(&m),
        loss_none: mean(&z),
        gap_mismatched: Gap::of(&m, &t),
        gap_none: Gap::of(&z, &t),
        accuracy,
        generated,
    }))
}

/// Evaluate `decoder` on the held-out items of `data` (labels in `split.eval`), per kind, and
/// on the classification set (its labels held out in `split`, or all of it when the decoder
/// never trained on it). Kinds with fewer than two items are left out.
pub fn evaluate_reading(
    decoder: &Decoder,
    data: &LitData,
    split: &LabelSplit,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let (_, eval) = data.split_with(split);
    if eval.is_empty() && opts.classification_file.is_none() {
        return Err(Error::invalid(
            "no held-out items: the split's eval labels match no item of the data",
        ));
    }
    let mut kinds = Vec::new();
    for kind in [ItemKind::System, ItemKind::Stimulus, ItemKind::Control] {
        let items: Vec<Item> = eval
            .iter()
            .filter(|e| e.item.kind == kind)
            .map(Item::of)
            .collect();
        let masked = kind != ItemKind::Control;
        if let Some(r) = report_kind(decoder, kind.name(), masked, items, opts, false)? {
            kinds.push(r);
        }
    }
    if let Some(f) = &opts.classification_file {
        let all = mixture::classification_examples(f, opts.seed)?;
        let trained = all.iter().any(|e| split.train.contains(&e.item.label));
        let items: Vec<Item> = all
            .iter()
            .filter(|e| !trained || split.eval.contains(&e.item.label))
            .map(Item::of)
            .collect();
        if let Some(r) = report_kind(decoder, "classification", false, items, opts, true)? {
            kinds.push(r);
        }
    }
    if kinds.is_empty() {
        return Err(Error::invalid(
            "fewer than two held-out items of every kind",
        ));
    }
    Ok(EvalReport { kinds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval() {
        let s = Share::of(8, 10);
        assert!((s.value - 0.8).abs() < 1e-12);
        // the textbook Wilson interval of 8/10
        assert!((s.low - 0.4902).abs() < 1e-3, "{s:?}");
        assert!((s.high - 0.9433).abs() < 1e-3, "{s:?}");
        let all = Share::of(5, 5);
        assert_eq!(all.high, 1.0);
        assert!(all.low > 0.5 && all.low < 0.6, "{all:?}");
        assert!(Share::of(0, 0).value.is_nan());
    }

    #[test]
    fn generic_answers() {
        let a: Vec<String> = [
            "The assistant is helpful.",
            "the assistant is helpful",
            "A pirate.",
            "A chef.",
            "A poet.",
            "A cat.",
            "A dog.",
            "A fox.",
            "A bee.",
            "A cow.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let g = generic_share(&a);
        assert_eq!(g.top_count, 2);
        assert_eq!(g.generic.value, 0.2); // 2 of 10 is exactly 20 %
        assert_eq!(g.top_answer, "The assistant is helpful.");
        let g = generic_share(&a[1..]);
        assert_eq!(g.generic.value, 0.0); // 1 of 9 is below 20 %
    }

    #[test]
    fn a_control_shows_by_its_words() {
        let control = "You are a grumpy pirate who hates answering questions.";
        let without = "To learn to cook, start with simple recipes.";
        assert!(shows_control(
            control,
            "Arr, I'm a pirate, not a cook!",
            without
        ));
        assert!(!shows_control(
            control,
            "Start with simple recipes and practice.",
            without
        ));
        // a control word the plain reply also uses shows nothing
        assert!(!shows_control(
            "Always talk about recipes.",
            "Recipes are great.",
            "Try recipes."
        ));
    }

    #[test]
    fn gaps() {
        let g = Gap::of(&[2.0, 3.0, 1.0], &[1.0, 1.0, 2.0]);
        assert!((g.mean - 2.0 / 3.0).abs() < 1e-12);
        assert!((g.true_better.value - 2.0 / 3.0).abs() < 1e-12);
    }
}
