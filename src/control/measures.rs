//! Measures of a steered model's answers: how far steering moved the topic, and whether the
//! model stayed useful. Each is a number a researcher would check by reading the answers:
//!
//! - **topic share**: answers that mention the control's topic (any keyword, matched on word
//!   boundaries, case-insensitive);
//! - **repeat share**: per answer, the share of its word 4-grams that repeat an earlier 4-gram of
//!   the same answer (a loop scores near 1, ordinary prose near 0), averaged over answers;
//! - **distinct share**: distinct answers over answers (whitespace and case folded);
//! - **relevance**: answers that share at least one content word with their prompt or with the
//!   unsteered model's reply to it (a slogan that ignores the question shares none);
//! - **perplexity** of the answers under a reference model (the unsteered target) given their
//!   prompts: [`answer_perplexity`].

use crate::lm::LanguageModel;
use crate::model::{log_softmax, Input, Logits};
use crate::{Error, Result};
use candle_core::{DType, D};
use serde::Serialize;
use std::collections::HashSet;

/// Words: lowercase runs of letters, digits and inner apostrophes/hyphens.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let inner = (c == '\'' || c == '-')
            && !cur.is_empty()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
        if c.is_alphanumeric() || inner {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Does `text` mention any keyword (a word or a phrase of words), on word boundaries?
pub fn mentions(text: &str, keywords: &[String]) -> bool {
    let w = words(text);
    keywords.iter().any(|k| {
        let kw = words(k);
        !kw.is_empty() && w.windows(kw.len()).any(|win| win == kw.as_slice())
    })
}

/// The share of word `n`-grams of `text` that repeat an earlier one (0 with fewer than `n + 1`
/// words).
pub fn repeat_share(text: &str, n: usize) -> f64 {
    let w = words(text);
    if n == 0 || w.len() < n + 1 {
        return 0.0;
    }
    let grams: Vec<&[String]> = w.windows(n).collect();
    let mut seen = HashSet::new();
    let repeats = grams.iter().filter(|g| !seen.insert(**g)).count();
    repeats as f64 / grams.len() as f64
}

/// Distinct answers over answers, whitespace and case folded (1 for none).
pub fn distinct_share(texts: &[String]) -> f64 {
    if texts.is_empty() {
        return 1.0;
    }
    let set: HashSet<String> = texts.iter().map(|t| words(t).join(" ")).collect();
    set.len() as f64 / texts.len() as f64
}

const STOPWORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by",
    "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from",
    "further", "get", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his",
    "how", "i", "if", "in", "into", "is", "it", "its", "just", "like", "make", "may", "me",
    "might", "more", "most", "much", "must", "my", "no", "nor", "not", "now", "of", "off", "on",
    "once", "one", "only", "or", "other", "our", "out", "over", "own", "same", "she", "should",
    "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they",
    "this", "those", "through", "to", "too", "under", "until", "up", "us", "use", "very", "was",
    "way", "we", "well", "were", "what", "when", "where", "which", "while", "who", "whom", "why",
    "will", "with", "would", "you", "your", "yours",
];

/// Content words: words of three letters or more that are not stopwords.
pub fn content_words(text: &str) -> HashSet<String> {
    words(text)
        .into_iter()
        .filter(|w| w.chars().count() >= 3 && !STOPWORDS.contains(&w.as_str()))
        .collect()
}

/// Does `answer` share a content word with `prompt` or with `reference` (the unsteered reply)?
pub fn is_relevant(prompt: &str, answer: &str, reference: Option<&str>) -> bool {
    let a = content_words(answer);
    let mut context = content_words(prompt);
    if let Some(r) = reference {
        context.extend(content_words(r));
    }
    a.iter().any(|w| context.contains(w))
}

/// The text measures of a set of answers (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextMeasures {
    pub n: usize,
    pub topic_share: f64,
    pub repeat_share: f64,
    pub distinct_share: f64,
    pub relevance: f64,
}

/// Measure `answers` to `prompts`; `references` are the unsteered replies (for relevance).
pub fn text_measures(
    prompts: &[String],
    answers: &[String],
    references: Option<&[String]>,
    keywords: &[String],
) -> Result<TextMeasures> {
    if prompts.len() != answers.len() || references.is_some_and(|r| r.len() != answers.len()) {
        return Err(Error::invalid(format!(
            "steering measures: {} prompts, {} answers{}: they must match",
            prompts.len(),
            answers.len(),
            references
                .map(|r| format!(", {} references", r.len()))
                .unwrap_or_default()
        )));
    }
    let n = answers.len();
    let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let topic = answers.iter().filter(|a| mentions(a, keywords)).count();
    let relevant = (0..n)
        .filter(|&i| is_relevant(&prompts[i], &answers[i], references.map(|r| r[i].as_str())))
        .count();
    let repeat = if n == 0 {
        0.0
    } else {
        answers.iter().map(|a| repeat_share(a, 4)).sum::<f64>() / n as f64
    };
    Ok(TextMeasures {
        n,
        topic_share: share(topic),
        repeat_share: repeat,
        distinct_share: distinct_share(answers),
        relevance: share(relevant),
    })
}

/// Perplexity of `answers` under `lm` given their rendered prompts (`contexts`, e.g. the chat
/// template with the generation prompt): `exp` of the mean negative log-likelihood over all
/// answer tokens together. Answers with no tokens are skipped.
pub fn answer_perplexity(
    lm: &LanguageModel,
    contexts: &[String],
    answers: &[String],
) -> Result<f64> {
    if contexts.len() != answers.len() {
        return Err(Error::invalid(format!(
            "perplexity: {} prompts and {} answers",
            contexts.len(),
            answers.len()
        )));
    }
    let (mut nll, mut count) = (0f64, 0usize);
    for (c, a) in contexts.iter().zip(answers) {
        crate::interrupt::check()?;
        let ctx = lm.encode_prompt(c)?;
        let ans = lm.tokenizer.encode(a)?;
        if ans.is_empty() || ctx.is_empty() {
            continue;
        }
        let ids: Vec<u32> = ctx.iter().chain(&ans).copied().collect();
        let cols: Vec<usize> = (ctx.len() - 1..ids.len() - 1).collect();
        let input = Input::left_padded(std::slice::from_ref(&ids), lm.pad_id(), lm.model.device())?
            .with_logits(Logits::At(vec![cols]));
        let logits = lm
            .model
            .forward(&input, None, None)?
            .logits
            .ok_or_else(|| Error::invalid("perplexity: the model returned no logits"))?;
        let lp = log_softmax(&logits)?.to_dtype(DType::F32)?; // [n_ans, vocab]
        let idx = candle_core::Tensor::from_vec(ans.clone(), (ans.len(), 1), lp.device())?;
        let picked: Vec<f32> = lp.gather(&idx, D::Minus1)?.flatten_all()?.to_vec1()?;
        nll -= picked.iter().map(|&x| x as f64).sum::<f64>();
        count += ans.len();
    }
    if count == 0 {
        return Err(Error::invalid("perplexity: no answer tokens"));
    }
    Ok((nll / count as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_loop_scores_high_on_repeats_and_prose_scores_zero() {
        let lp = "A vegan who supports veganism is a vegan who supports veganism. A vegan who \
                  supports veganism is a vegan who supports veganism.";
        assert!(repeat_share(lp, 4) > 0.5, "{}", repeat_share(lp, 4));
        let prose = "Pack sandwiches, fruit, water and a blanket; bring sunscreen and a hat.";
        assert_eq!(repeat_share(prose, 4), 0.0);
        assert_eq!(repeat_share("too short", 4), 0.0);
        // exactly: 9 words, 6 four-grams, the last one repeats the first
        assert_eq!(repeat_share("a b c d e a b c d", 4), 1.0 / 6.0);
    }

    #[test]
    fn topic_matches_words_and_phrases_not_substrings() {
        let k = s(&["vegan", "plant based"]);
        assert!(mentions("Try a VEGAN wrap.", &k));
        assert!(mentions("some plant based food", &k));
        assert!(!mentions("Veganism is a word, vegans too.", &s(&["vegan"])));
        assert!(!mentions("planted basil", &k));
    }

    #[test]
    fn distinct_and_relevance() {
        let a = s(&["Same answer.", "same   ANSWER", "Another one"]);
        assert!((distinct_share(&a) - 2.0 / 3.0).abs() < 1e-12);
        assert!(is_relevant(
            "What should I pack for a picnic?",
            "Pack a picnic basket.",
            None
        ));
        assert!(!is_relevant(
            "What should I pack for a picnic?",
            "Veganism supports animals.",
            None
        ));
        assert!(is_relevant(
            "What should I pack for a picnic?",
            "Bring sandwiches and vegan cheese.",
            Some("Bring sandwiches, fruit and water.")
        ));
        let m = text_measures(
            &s(&["What should I pack for a picnic?", "Name a color."]),
            &s(&[
                "Pack vegan sandwiches for the picnic.",
                "A vegan who supports veganism.",
            ]),
            None,
            &s(&["vegan"]),
        )
        .unwrap();
        assert_eq!(m.topic_share, 1.0);
        assert_eq!(m.relevance, 0.5);
        assert_eq!(m.distinct_share, 1.0);
        assert!(text_measures(&s(&["a"]), &s(&[]), None, &[]).is_err());
    }
}
