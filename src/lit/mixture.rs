//! The training mixture beyond the paper's data, after Activation Oracles (Karvonen et al.
//! 2025): besides LatentQA's items, a decoder learns
//!
//! - **context prediction** (self-supervised): from the activations of a window of text, the
//!   words that follow it, or the words that precede it. Any text serves; the passages are the
//!   responses of `data/instructions.json` and the control replies of the LatentQA data;
//! - **yes/no classification**: questions about labelled sentences (`data/classification.json`:
//!   sentiment, topic, tense, language), one true ("Yes") and one false ("No") question per
//!   attribute.
//!
//! Each kind is a pool of [`Example`]s with labels of its own (`context-…`, `classify-…`), split
//! into train and eval apart from the LatentQA labels, so adding a kind leaves LatentQA's split
//! as it was. [`compose`] draws the training set from the pools at the configured weights.

use super::data::{DataItem, Example, ItemKind, LabelSplit};
use crate::chat::Message;
use crate::latentqa::{ReadDialog, VerbMask};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The question of a context-prediction example that asks for the following words.
pub const NEXT_QUESTION: &str = "What are the next words of this text?";
/// The question of a context-prediction example that asks for the preceding words.
pub const PREVIOUS_QUESTION: &str = "What were the words just before this text?";

/// How much of each kind of data training draws, and where the extra kinds come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixtureConfig {
    /// Relative weight of LatentQA's items (the paper's data).
    pub latentqa: f64,
    /// Relative weight of context prediction.
    pub context: f64,
    /// Relative weight of yes/no classification.
    pub classification: f64,
    /// Text for context prediction: JSON arrays of strings or of objects with a `response` or
    /// `text` field. The LatentQA data's control replies are added to them.
    pub context_files: Vec<PathBuf>,
    /// The labelled sentences (see `data/classification.json`).
    pub classification_file: PathBuf,
    /// The longest text window read, in words.
    pub window_words: usize,
    /// The words predicted (after or before the window).
    pub answer_words: usize,
}

impl Default for MixtureConfig {
    /// The paper's data alone.
    fn default() -> Self {
        MixtureConfig {
            latentqa: 1.0,
            context: 0.0,
            classification: 0.0,
            context_files: vec![crate::assets::data_file("instructions.json", None)],
            classification_file: crate::assets::data_file("classification.json", None),
            window_words: 40,
            answer_words: 10,
        }
    }
}

impl MixtureConfig {
    /// An error naming the field unless the weights are finite, non-negative and not all zero.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in self.weights() {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::invalid(format!(
                    "mixture.{} must be a number >= 0, got {w}",
                    name.name()
                )));
            }
        }
        if self.weights().iter().all(|(_, w)| *w == 0.0) {
            return Err(Error::invalid("the mixture's weights are all 0"));
        }
        if self.window_words == 0 || self.answer_words == 0 {
            return Err(Error::invalid(
                "mixture.window_words and mixture.answer_words must be at least 1",
            ));
        }
        Ok(())
    }

    /// Each kind's weight.
    pub fn weights(&self) -> [(Kind, f64); 3] {
        [
            (Kind::LatentQa, self.latentqa),
            (Kind::Context, self.context),
            (Kind::Classification, self.classification),
        ]
    }
}

/// The kinds of training data a mixture weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    LatentQa,
    Context,
    Classification,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::LatentQa => "latentqa",
            Kind::Context => "context",
            Kind::Classification => "classification",
        }
    }

    /// The kind of an example.
    pub fn of(e: &Example) -> Kind {
        match e.item.kind {
            ItemKind::Context => Kind::Context,
            ItemKind::Classification => Kind::Classification,
            _ => Kind::LatentQa,
        }
    }
}

/// A read dialog of one user turn, every position after the first patched.
fn plain_text(text: &str) -> ReadDialog {
    ReadDialog {
        messages: vec![Message::new("user", text)],
        add_generation_prompt: false,
        mask: VerbMask::None,
    }
}

fn example(item: &Arc<DataItem>, question: &str, answer: String) -> Example {
    Example {
        item: item.clone(),
        question: question.to_string(),
        answer,
    }
}

/// The passages of a context file (see [`MixtureConfig::context_files`]).
pub fn load_passages(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(Error::bad_file(path, "expected an array of passages"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let s = match item {
                Value::String(s) => Some(s),
                Value::Object(o) => match (o.get("response"), o.get("text")) {
                    (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => Some(s),
                    _ => None,
                },
                _ => None,
            };
            s.cloned().ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("item {i}: expected a string or an object with a string `response` or `text`"),
                )
            })
        })
        .collect()
}

/// Context-prediction examples: for each passage of at least `answer_words + 4` words, one
/// "next words" and one "previous words" example, cut at seeded points. `source` names the
/// passages (labels `context-{source}-{i}`, items numbered as in `passages`).
pub fn context_examples(
    passages: &[String],
    source: &Path,
    cfg: &MixtureConfig,
    seed: u64,
) -> Vec<Example> {
    let (w, a) = (cfg.window_words, cfg.answer_words);
    let name = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, p) in passages.iter().enumerate() {
        let words: Vec<&str> = p.split_whitespace().collect();
        let n = words.len();
        if n < a + 4 {
            continue;
        }
        let mut rng = SplitMix64::derive(seed, crate::rng::fnv1a(i as u64, name.as_bytes()));
        let item = |window: &[&str]| {
            Arc::new(DataItem {
                kind: ItemKind::Context,
                label: format!("context-{name}-{i}"),
                read: plain_text(&window.join(" ")),
                file: source.to_path_buf(),
                index: i,
            })
        };
        // next: a window ending at c (at least 4 words), the `a` words after it
        let c = 4 + rng.below((n - a - 4 + 1) as u64) as usize; // 4 ..= n - a
        let window = &words[c.saturating_sub(w)..c];
        out.push(example(
            &item(window),
            NEXT_QUESTION,
            words[c..c + a].join(" "),
        ));
        // previous: a window starting at c (at least 4 words), the `a` words before it
        let c = a + rng.below((n - a - 4 + 1) as u64) as usize; // a ..= n - 4
        let window = &words[c..(c + w).min(n)];
        out.push(example(
            &item(window),
            PREVIOUS_QUESTION,
            words[c - a..c].join(" "),
        ));
    }
    out
}

/// One attribute of the classification set: its values and its question (`{value}` filled in).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attribute {
    values: Vec<String>,
    question: String,
}

/// The yes/no examples of a classification file: per sentence and attribute, the question
/// with the sentence's value ("Yes") and with another value drawn with the seed ("No"). Labels
/// `classify-{i}`.
pub fn classification_examples(path: &Path, seed: u64) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    let bad = |msg: String| Error::bad_file(path, msg);
    let attrs: BTreeMap<String, Attribute> = serde_json::from_value(
        v.get("attributes")
            .cloned()
            .ok_or_else(|| bad("missing field \"attributes\"".into()))?,
    )
    .map_err(|e| bad(format!("attributes: {e}")))?;
    for (name, a) in &attrs {
        if a.values.len() < 2 || !a.question.contains("{value}") {
            return Err(bad(format!(
                "attribute {name:?}: needs at least two values and a question with {{value}}"
            )));
        }
    }
    let Some(Value::Array(items)) = v.get("items") else {
        return Err(bad("missing array \"items\"".into()));
    };
    let mut rng = SplitMix64::derive(seed, 0xC1A5);
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let field = |k: &str| -> Result<&str> {
            it.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("item {i}: missing string field {k:?}")))
        };
        let item = Arc::new(DataItem {
            kind: ItemKind::Classification,
            label: format!("classify-{i}"),
            read: plain_text(field("text")?),
            file: path.to_path_buf(),
            index: i,
        });
        for (name, a) in &attrs {
            let value = field(name)?;
            if !a.values.iter().any(|v| v == value) {
                return Err(bad(format!(
                    "item {i}: {name} {value:?} is not one of {:?}",
                    a.values
                )));
            }
            let others: Vec<&String> = a.values.iter().filter(|v| *v != value).collect();
            let other = others[rng.below(others.len() as u64) as usize];
            out.push(example(
                &item,
                &a.question.replace("{value}", value),
                "Yes".into(),
            ));
            out.push(example(
                &item,
                &a.question.replace("{value}", other),
                "No".into(),
            ));
        }
    }
    if out.is_empty() {
        return Err(bad("no items".into()));
    }
    Ok(out)
}

/// Split the labels of extra-kind examples into train and eval, `eval_fraction` of each kind's
/// labels held out (seeded; a stream apart from LatentQA's split), added to `split`.
pub fn split_extra(examples: &[Example], eval_fraction: f64, seed: u64, split: &mut LabelSplit) {
    let mut by_kind: BTreeMap<Kind, std::collections::BTreeSet<String>> = BTreeMap::new();
    for e in examples {
        by_kind
            .entry(Kind::of(e))
            .or_default()
            .insert(e.item.label.clone());
    }
    for (kind, labels) in by_kind {
        let mut labels: Vec<String> = labels.into_iter().collect();
        SplitMix64::derive(seed, 0x5EED_0000 + kind as u64).shuffle(&mut labels);
        let k = (eval_fraction * labels.len() as f64).round() as usize;
        for (j, l) in labels.into_iter().enumerate() {
            if j < k {
                split.eval.insert(l);
            } else {
                split.train.insert(l);
            }
        }
    }
}

/// The training set drawn from the pools at the mixture's weights: with LatentQA's share `s`
/// of the weights and `n` LatentQA examples, `n / s` examples in all, each kind its share
/// (rounded), drawn from its pool shuffled with the seed and repeated when the pool is smaller.
/// When LatentQA's weight is 0, the total is the sum of the weighted pools. A kind with weight
/// above 0 and an empty pool is an error.
pub fn compose(
    pools: &BTreeMap<Kind, Vec<Example>>,
    cfg: &MixtureConfig,
    seed: u64,
) -> Result<Vec<Example>> {
    cfg.validate()?;
    let sum: f64 = cfg.weights().iter().map(|(_, w)| w).sum();
    let size = |k: Kind| pools.get(&k).map_or(0, Vec::len);
    let total = if cfg.latentqa > 0.0 {
        size(Kind::LatentQa) as f64 * sum / cfg.latentqa
    } else {
        cfg.weights()
            .iter()
            .filter(|(_, w)| *w > 0.0)
            .map(|(k, _)| size(*k) as f64)
            .sum()
    };
    let mut out = Vec::new();
    for (kind, w) in cfg.weights() {
        if w == 0.0 {
            continue;
        }
        let pool = pools.get(&kind).map(Vec::as_slice).unwrap_or_default();
        if pool.is_empty() {
            return Err(Error::invalid(format!(
                "mixture.{} is {w} but there are no {} examples to train on",
                kind.name(),
                kind.name()
            )));
        }
        let count = if kind == Kind::LatentQa {
            pool.len()
        } else {
            (total * w / sum).round() as usize
        };
        let mut order: Vec<usize> = (0..pool.len()).collect();
        SplitMix64::derive(seed, 0x3140_0000 + kind as u64).shuffle(&mut order);
        out.extend((0..count).map(|j| pool[order[j % pool.len()]].clone()));
    }
    Ok(out)
}

/// How many examples of each kind `examples` holds, by [`Kind::name`].
pub fn counts(examples: &[Example]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for e in examples {
        *m.entry(Kind::of(e).name()).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(kind: ItemKind, n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let item = Arc::new(DataItem {
                    kind,
                    label: format!("{kind:?}-{i}"),
                    read: plain_text("x y"),
                    file: PathBuf::new(),
                    index: i,
                });
                example(&item, "q", format!("{i}"))
            })
            .collect()
    }

    #[test]
    fn the_mixture_samples_each_kind_at_its_weight() {
        let mut pools = BTreeMap::new();
        pools.insert(Kind::LatentQa, pool(ItemKind::System, 300));
        pools.insert(Kind::Context, pool(ItemKind::Context, 1000));
        pools.insert(Kind::Classification, pool(ItemKind::Classification, 50));
        let cfg = MixtureConfig {
            context: 0.5,
            classification: 0.25,
            ..Default::default()
        };
        let out = compose(&pools, &cfg, 1).unwrap();
        let c = counts(&out);
        // LatentQA whole (300), the others at 0.5 and 0.25 of it
        assert_eq!(c["latentqa"], 300);
        assert_eq!(c["context"], 150);
        assert_eq!(c["classification"], 75);
        // a pool smaller than its share repeats, each of its examples at least once
        let cls: std::collections::BTreeSet<&str> = out
            .iter()
            .filter(|e| Kind::of(e) == Kind::Classification)
            .map(|e| e.answer.as_str())
            .collect();
        assert_eq!(cls.len(), 50);
        // a larger pool is sampled without repeats, and the draw depends on the seed
        let ctx = |o: &[Example]| -> Vec<String> {
            o.iter()
                .filter(|e| Kind::of(e) == Kind::Context)
                .map(|e| e.answer.clone())
                .collect()
        };
        let a = ctx(&out);
        let set: std::collections::BTreeSet<&String> = a.iter().collect();
        assert_eq!(set.len(), 150);
        assert_eq!(a, ctx(&compose(&pools, &cfg, 1).unwrap()));
        assert_ne!(a, ctx(&compose(&pools, &cfg, 2).unwrap()));
        // the paper's data alone by default
        let only = compose(&pools, &MixtureConfig::default(), 1).unwrap();
        assert_eq!(counts(&only).len(), 1);
        // no LatentQA: each weighted pool whole, scaled by its weight relative to the rest
        let no_lqa = MixtureConfig {
            latentqa: 0.0,
            context: 1.0,
            classification: 1.0,
            ..Default::default()
        };
        let c = counts(&compose(&pools, &no_lqa, 1).unwrap());
        assert_eq!((c["context"], c["classification"]), (525, 525));
        // errors name the field
        let bad = MixtureConfig {
            context: -1.0,
            ..Default::default()
        };
        assert!(compose(&pools, &bad, 1)
            .unwrap_err()
            .to_string()
            .contains("mixture.context"));
        pools.remove(&Kind::Context);
        let e = compose(&pools, &cfg, 1).unwrap_err().to_string();
        assert!(e.contains("no context examples"), "{e}");
    }

    #[test]
    fn context_examples_are_the_words_around_a_window() {
        let text: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
        let passages = vec![text.join(" "), "too short".to_string()];
        let cfg = MixtureConfig {
            window_words: 8,
            answer_words: 5,
            ..Default::default()
        };
        let ex = context_examples(&passages, Path::new("p.json"), &cfg, 3);
        assert_eq!(ex.len(), 2, "the short passage is skipped");
        let idx = |w: &str| w[1..].parse::<usize>().unwrap();
        for e in &ex {
            assert_eq!(e.item.kind, ItemKind::Context);
            assert_eq!(e.item.label, "context-p-0");
            assert_eq!(e.item.read.mask, VerbMask::None);
            let window: Vec<usize> = e.item.read.messages[0]
                .content
                .split(' ')
                .map(idx)
                .collect();
            let answer: Vec<usize> = e.answer.split(' ').map(idx).collect();
            assert!(window.len() >= 4 && window.len() <= 8, "{window:?}");
            assert_eq!(answer.len(), 5);
            let contiguous = |v: &[usize]| v.windows(2).all(|p| p[1] == p[0] + 1);
            assert!(contiguous(&window) && contiguous(&answer));
            if e.question == NEXT_QUESTION {
                assert_eq!(answer[0], window[window.len() - 1] + 1);
            } else {
                assert_eq!(e.question, PREVIOUS_QUESTION);
                assert_eq!(answer[4] + 1, window[0]);
            }
        }
    }

    #[test]
    fn classification_questions_are_one_true_one_false_per_attribute() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        let file = serde_json::json!({
            "attributes": {
                "topic": {"values": ["food", "sports", "music"], "question": "Is the text about {value}?"},
                "tense": {"values": ["past", "present"], "question": "Is it in the {value} tense?"}
            },
            "items": [
                {"text": "We ate soup.", "topic": "food", "tense": "past"},
                {"text": "They play chess.", "topic": "sports", "tense": "present"}
            ]
        });
        std::fs::write(&p, file.to_string()).unwrap();
        let ex = classification_examples(&p, 0).unwrap();
        assert_eq!(ex.len(), 8);
        let first: Vec<(&str, &str)> = ex[..4]
            .iter()
            .map(|e| (e.question.as_str(), e.answer.as_str()))
            .collect();
        assert_eq!(first[0], ("Is it in the past tense?", "Yes"));
        assert_eq!(first[1], ("Is it in the present tense?", "No"));
        assert_eq!(first[2], ("Is the text about food?", "Yes"));
        assert_eq!(first[3].1, "No");
        assert_ne!(first[3].0, "Is the text about food?");
        assert!(ex.iter().all(|e| e.item.label.starts_with("classify-")));
        // a value outside the attribute's list is an error naming the item
        let mut bad = file.clone();
        bad["items"][1]["tense"] = "future".into();
        std::fs::write(&p, bad.to_string()).unwrap();
        let e = classification_examples(&p, 0).unwrap_err().to_string();
        assert!(
            e.contains("c.json") && e.contains("item 1") && e.contains("future"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_classification_set_is_balanced_and_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/classification.json");
        let ex = classification_examples(&p, 0).unwrap();
        assert_eq!(ex.len(), 400 * 4 * 2);
        let yes = ex.iter().filter(|e| e.answer == "Yes").count();
        assert_eq!(yes * 2, ex.len());
    }

    #[test]
    fn extra_labels_split_apart_from_latentqa() {
        let mut ex = pool(ItemKind::Context, 20);
        ex.extend(pool(ItemKind::Classification, 10));
        let mut split = LabelSplit::default();
        split.train.insert("system-a".into());
        split_extra(&ex, 0.2, 1, &mut split);
        let held = |p: &str| split.eval.iter().filter(|l| l.starts_with(p)).count();
        assert_eq!((held("Context"), held("Classification")), (4, 2));
        assert_eq!(split.train.len() + split.eval.len(), 31);
    }
}
