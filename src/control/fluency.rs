//! Early stopping on a held-out fluency criterion: every few steps the steered model answers a
//! few held-out instructions (greedy), and the run stops, keeping the last adapter that passed,
//! as soon as its answers become text the unsteered model finds unlikely (their perplexity
//! under it, against that of its own answers), loop (a high share of repeated word 4-grams) or
//! collapse into one answer (a low share of distinct answers). Strength and fluency trade off
//! along a control run; this finds the point where fluency breaks, per control, without a
//! held-out sweep.

use super::measures::{answer_perplexity, distinct_share, repeat_share};
use crate::chat::Message;
use crate::generate::GenOptions;
use crate::lm::LanguageModel;
use crate::model::Model;
use crate::Result;
use serde::{Deserialize, Serialize};

/// When and how the fluency check runs (`early_stop` in the control config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStop {
    /// Check every this many steps (and at the end of the pass).
    pub every: usize,
    /// Held-out instructions answered at each check: instructions of the instruction set that
    /// no sample of the run reads.
    pub prompts: usize,
    /// Tokens generated per answer.
    pub max_new_tokens: usize,
    /// A check fails when the answers' mean share of repeated word 4-grams is above this, or
    /// above the unsteered model's share plus [`EarlyStop::repeat_margin`], whichever is larger.
    pub max_repeat_share: f64,
    /// See [`EarlyStop::max_repeat_share`].
    pub repeat_margin: f64,
    /// A check fails when fewer than this share of the answers are distinct.
    pub min_distinct_share: f64,
    /// A check fails when the answers' perplexity under the unsteered model is above this many
    /// times that of the unsteered model's own answers.
    pub max_perplexity_ratio: f64,
}

impl Default for EarlyStop {
    fn default() -> Self {
        EarlyStop {
            every: 10,
            prompts: 16,
            max_new_tokens: 40,
            max_repeat_share: 0.15,
            repeat_margin: 0.1,
            min_distinct_share: 0.9,
            max_perplexity_ratio: 2.5,
        }
    }
}

impl EarlyStop {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(crate::Error::invalid(format!("early_stop: {what}")));
        if self.every == 0 || self.prompts == 0 || self.max_new_tokens == 0 {
            return bad(format!(
                "every, prompts and max_new_tokens must be > 0 (got {}, {}, {})",
                self.every, self.prompts, self.max_new_tokens
            ));
        }
        for (name, v) in [
            ("max_repeat_share", self.max_repeat_share),
            ("repeat_margin", self.repeat_margin),
            ("min_distinct_share", self.min_distinct_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        if !(self.max_perplexity_ratio.is_finite() && self.max_perplexity_ratio >= 1.0) {
            return bad(format!(
                "max_perplexity_ratio must be a number >= 1, got {}",
                self.max_perplexity_ratio
            ));
        }
        Ok(())
    }

    /// The largest repeat share that passes, given the unsteered model's.
    pub fn repeat_limit(&self, unsteered: &Fluency) -> f64 {
        self.max_repeat_share
            .max(unsteered.repeat_share + self.repeat_margin)
    }

    /// Whether `f` passes, given the unsteered model's score.
    pub fn passes(&self, f: &Fluency, unsteered: &Fluency) -> bool {
        f.repeat_share <= self.repeat_limit(unsteered)
            && f.distinct_share >= self.min_distinct_share
            && f.perplexity <= self.max_perplexity_ratio * unsteered.perplexity
    }
}

/// A fluency score of a model's greedy answers to the held-out instructions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fluency {
    /// Mean share of repeated word 4-grams per answer.
    pub repeat_share: f64,
    /// Share of distinct answers.
    pub distinct_share: f64,
    /// Perplexity of the answers under the unsteered model.
    #[serde(default)]
    pub perplexity: f64,
}

impl Fluency {
    /// Score answers whose perplexity under the unsteered model is `perplexity`.
    pub fn of(answers: &[String], perplexity: f64) -> Fluency {
        let n = answers.len().max(1) as f64;
        Fluency {
            repeat_share: answers.iter().map(|a| repeat_share(a, 4)).sum::<f64>() / n,
            distinct_share: distinct_share(answers),
            perplexity,
        }
    }

    /// Greedy answers of `model` (the target's weights, or a steered copy) to `prompts`
    /// (user turns, rendered with the target's chat template), and their score; perplexity is
    /// under `target`, the unsteered model.
    pub fn measure(
        target: &LanguageModel,
        model: &Model,
        prompts: &[String],
        max_new_tokens: usize,
    ) -> Result<(Fluency, Vec<String>)> {
        let template = target.template()?;
        let chats = prompts
            .iter()
            .map(|p| template.render(&[Message::new("user", p.as_str())], true))
            .collect::<Result<Vec<_>>>()?;
        let opts = GenOptions {
            max_new_tokens,
            stop_ids: target.stop_ids(),
            ..Default::default()
        };
        let lm = target.with_model(model.clone());
        let answers = lm.generate(&chats, &opts, None)?;
        // no answer tokens at all (every answer ended at once): nothing to find unlikely; the
        // distinct share judges such answers
        let ppl = if answers.iter().all(|a| a.trim().is_empty()) {
            1.0
        } else {
            answer_perplexity(target, &chats, &answers)?
        };
        Ok((Fluency::of(&answers, ppl), answers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_and_collapse_fail_varied_answers_pass() {
        let es = EarlyStop::default();
        let unsteered = Fluency {
            repeat_share: 0.02,
            distinct_share: 1.0,
            perplexity: 2.0,
        };
        let varied: Vec<String> = [
            "Pack sandwiches, fruit and water.",
            "Boil the egg for six minutes.",
            "Try painting or hiking.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(es.passes(&Fluency::of(&varied, 3.0), &unsteered));
        let looped: Vec<String> = (0..3)
            .map(|i| format!("answer {i}: a vegan who supports veganism is a vegan who supports veganism is a vegan who supports veganism"))
            .collect();
        let f = Fluency::of(&looped, 3.0);
        assert!(f.repeat_share > 0.3, "{f:?}");
        assert!(!es.passes(&f, &unsteered));
        let same = vec!["Go vegan.".to_string(); 3];
        let f = Fluency::of(&same, 3.0);
        assert!(f.distinct_share < 0.5, "{f:?}");
        assert!(!es.passes(&f, &unsteered));
        // a model that already repeats itself is judged against its own share plus the margin
        let loopy = Fluency {
            repeat_share: 0.3,
            distinct_share: 1.0,
            perplexity: 2.0,
        };
        assert!((es.repeat_limit(&loopy) - 0.4).abs() < 1e-12);
        // varied, loop-free answers the unsteered model finds unlikely fail too
        assert!(!es.passes(&Fluency::of(&varied, 5.1), &unsteered));
    }

    #[test]
    fn bad_settings_are_errors() {
        let bad = EarlyStop {
            every: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("every"));
        let bad = EarlyStop {
            max_perplexity_ratio: 0.5,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_perplexity_ratio"));
        let bad = EarlyStop {
            min_distinct_share: 1.5,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_distinct_share"));
        EarlyStop::default().validate().unwrap();
    }
}
