//! `steering_measures(model, prompts, answers, #{references, keywords, perplexity})`: the
//! measures of [`crate::control::measures`] on a steered model's answers, as a map
//! (`n`, `topic_share`, `repeat_share`, `distinct_share`, `relevance`, and `perplexity` of the
//! answers under `model` given each prompt rendered with its chat template).

use super::error::{ctx_err, ScriptResult, ToScript};
use super::model::ScriptModel;
use super::options::options;
use crate::chat::Message;
use crate::control::measures::{answer_perplexity, text_measures};
use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct MeasureOptions {
    /// The unsteered replies, one per prompt (for relevance).
    references: Option<Vec<String>>,
    /// Words or phrases of the control's topic.
    keywords: Vec<String>,
    /// Compute the perplexity of the answers under the model (default true).
    perplexity: Option<bool>,
}

fn strings(ctx: &NativeCallContext, a: &Array, what: &str) -> ScriptResult<Vec<String>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.clone().into_string().map_err(|t| {
                ctx_err(
                    ctx,
                    format!("steering_measures: {what}[{i}] is a {t}, expected a string"),
                )
            })
        })
        .collect()
}

pub fn register(engine: &mut Engine) {
    engine.register_fn(
        "steering_measures",
        |ctx: NativeCallContext,
         m: ScriptModel,
         prompts: Array,
         answers: Array,
         opts: Map|
         -> ScriptResult<Map> {
            let o: MeasureOptions = options(&ctx, &opts, "steering_measures")?;
            let prompts = strings(&ctx, &prompts, "prompts")?;
            let answers = strings(&ctx, &answers, "answers")?;
            let t =
                text_measures(&prompts, &answers, o.references.as_deref(), &o.keywords).at(&ctx)?;
            let mut map = super::to_map(&t);
            if o.perplexity.unwrap_or(true) {
                let template = m.template().at(&ctx)?;
                let contexts = prompts
                    .iter()
                    .map(|p| template.render(&[Message::new("user", p.clone())], true))
                    .collect::<crate::Result<Vec<_>>>()
                    .at(&ctx)?;
                let ppl = answer_perplexity(&m.lm, &contexts, &answers).at(&ctx)?;
                map.insert("perplexity".into(), Dynamic::from_float(ppl));
            }
            Ok(map)
        },
    );
}
