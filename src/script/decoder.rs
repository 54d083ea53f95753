//! The `Decoder` script object: `load_decoder(target)` / `load_decoder(target, path)`,
//! `d.score(dialog, question, answer)`, `d.ask(dialogs, questions)` and
//! `d.read_table(dialogs, questions)`.
//!
//! A dialog is a string (one user turn) or an array of message maps; `dialogs` is one dialog or
//! an array of them.

use super::error::{ctx_err, ScriptResult, ToScript};
use super::model::{messages_named, GenOpts, ScriptModel};
use super::options::{options, parse_split};
use crate::chat::Message;
use crate::latentqa::decoder::Decoder;
use crate::latentqa::read::AskOptions;
use crate::latentqa::Activations;
use crate::lit::eval::EvalOptions;
use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// A decoder as the Rhai type `Decoder`: a shared handle.
#[derive(Clone)]
pub struct ScriptDecoder(pub Arc<Decoder>);

/// `score` options.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ScoreOpts {
    /// Patch the whole dialog, control included.
    patch_all: bool,
    /// `"read"` (default) or `"none"` (nothing written: the no-activation baseline).
    activations: Option<String>,
}

fn activations(ctx: &NativeCallContext, name: Option<&str>) -> ScriptResult<Activations> {
    name.map_or(Ok(Activations::Read), Activations::parse)
        .map_err(|e| ctx_err(ctx, e))
}

fn score(
    ctx: &NativeCallContext,
    d: &ScriptDecoder,
    dialog: &Dynamic,
    q: &str,
    a: &str,
    opts: &Map,
) -> ScriptResult<f64> {
    let msgs = dialog_from(ctx, dialog, "the dialog")?;
    let o: ScoreOpts = options(ctx, opts, "score")?;
    let act = activations(ctx, o.activations.as_deref())?;
    let read = Decoder::read_dialog(&msgs, o.patch_all);
    let items = [(read, q.to_string(), a.to_string())];
    Ok(d.0.score_reads(&items, act).at(ctx)?[0])
}

/// One dialog: a string (a single user turn), an array of message maps, or a map with
/// `messages` (and any other fields, e.g. a `name`).
fn dialog_from(ctx: &NativeCallContext, v: &Dynamic, what: &str) -> ScriptResult<Vec<Message>> {
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        if s.trim().is_empty() {
            return Err(ctx_err(ctx, format!("{what} is an empty string")));
        }
        return Ok(vec![Message::new("user", s.as_str())]);
    }
    if let Some(m) = v.read_lock::<Map>() {
        let msgs = m.get("messages").ok_or_else(|| {
            ctx_err(
                ctx,
                format!("{what} is a map without `messages` (expected #{{messages: [...]}})"),
            )
        })?;
        return dialog_from(ctx, msgs, &format!("{what}.messages"));
    }
    if let Some(a) = v.read_lock::<Array>() {
        if a.is_empty() {
            return Err(ctx_err(ctx, format!("{what} has no messages")));
        }
        return messages_named(ctx, &a, what);
    }
    Err(ctx_err(
        ctx,
        format!(
            "{what} is a {}, expected a string or an array of #{{role, content}} maps",
            v.type_name()
        ),
    ))
}

/// One dialog or many: a string or an array of maps is one dialog; an array of strings or
/// arrays is many. Returns the dialogs and whether one was given.
fn dialogs_from(ctx: &NativeCallContext, v: &Dynamic) -> ScriptResult<(Vec<Vec<Message>>, bool)> {
    dialogs_named(ctx, v, "dialogs")
}

/// [`dialogs_from`] with errors naming the value `what` (a file, say).
fn dialogs_named(
    ctx: &NativeCallContext,
    v: &Dynamic,
    what: &str,
) -> ScriptResult<(Vec<Vec<Message>>, bool)> {
    if let Some(a) = v.read_lock::<Array>() {
        // an array of message maps is one dialog; anything else in an array is many
        let many = a
            .first()
            .is_some_and(|x| !x.read_lock::<Map>().is_some_and(|m| m.contains_key("role")));
        if many {
            let ds = a
                .iter()
                .enumerate()
                .map(|(i, d)| dialog_from(ctx, d, &format!("{what}[{i}]")))
                .collect::<ScriptResult<Vec<_>>>()?;
            return Ok((ds, false));
        }
        if a.is_empty() {
            return Err(ctx_err(ctx, format!("{what} is empty")));
        }
    }
    Ok((vec![dialog_from(ctx, v, what)?], true))
}

/// A JSON file's value, errors naming the file.
fn read_json_file(ctx: &NativeCallContext, path: &str) -> ScriptResult<Dynamic> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::io(path, e))
        .at(ctx)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::Error::bad_file(path, format!("invalid JSON: {e}")))
        .at(ctx)?;
    Ok(super::globals::json_to_dynamic(v))
}

/// `load_dialogs(path)`: a JSON array of dialogs (strings, message arrays, or maps with
/// `messages`), checked item by item; returns them as arrays of message maps.
fn load_dialogs(ctx: &NativeCallContext, path: &str) -> ScriptResult<Array> {
    let v = read_json_file(ctx, path)?;
    if !v.is_array() {
        return Err(ctx_err(
            ctx,
            format!(
                "{path}: expected a JSON array of dialogs, found a {}",
                v.type_name()
            ),
        ));
    }
    let (ds, _) = dialogs_named(ctx, &v, &format!("{path}: dialogs"))?;
    Ok(ds
        .into_iter()
        .map(|d| {
            Dynamic::from_array(
                d.into_iter()
                    .map(|m| {
                        let mut map = Map::new();
                        map.insert("role".into(), m.role.into());
                        map.insert("content".into(), m.content.into());
                        map.into()
                    })
                    .collect(),
            )
        })
        .collect())
}

/// `load_questions(path)`: a JSON array of strings, or a controls file
/// (`{prompt: [[question, answer], ...]}`, whose questions are taken).
fn load_questions(ctx: &NativeCallContext, path: &str) -> ScriptResult<Array> {
    let v = read_json_file(ctx, path)?;
    if let Some(m) = v.read_lock::<Map>() {
        let (_, pairs) = m
            .iter()
            .next()
            .ok_or_else(|| ctx_err(ctx, format!("{path}: the controls file has no prompt")))?;
        let pairs = pairs.read_lock::<Array>().ok_or_else(|| {
            ctx_err(
                ctx,
                format!("{path}: a prompt's value must be [[question, answer], ...]"),
            )
        })?;
        return pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.read_lock::<Array>()
                    .filter(|a| a.len() == 2 && a[0].is_string())
                    .map(|a| a[0].clone())
                    .ok_or_else(|| {
                        ctx_err(
                            ctx,
                            format!("{path}: pair {i} is not [question, answer] (strings)"),
                        )
                    })
            })
            .collect();
    }
    let what = format!("{path}: questions");
    let (qs, one) = questions_named(ctx, &v, &what)?;
    if one {
        return Err(ctx_err(
            ctx,
            format!("{what}: expected a JSON array of strings"),
        ));
    }
    Ok(qs.into_iter().map(Dynamic::from).collect())
}

/// One question (a string) or many (an array of strings).
fn questions_from(ctx: &NativeCallContext, v: &Dynamic) -> ScriptResult<(Vec<String>, bool)> {
    questions_named(ctx, v, "questions")
}

fn questions_named(
    ctx: &NativeCallContext,
    v: &Dynamic,
    what: &str,
) -> ScriptResult<(Vec<String>, bool)> {
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        return Ok((vec![s.to_string()], true));
    }
    if let Some(a) = v.read_lock::<Array>() {
        let qs = a
            .iter()
            .enumerate()
            .map(|(i, q)| {
                q.clone()
                    .into_string()
                    .map_err(|t| ctx_err(ctx, format!("{what}[{i}] is a {t}, expected a string")))
            })
            .collect::<ScriptResult<Vec<_>>>()?;
        if qs.is_empty() {
            return Err(ctx_err(ctx, format!("{what} is empty")));
        }
        return Ok((qs, false));
    }
    Err(ctx_err(
        ctx,
        format!(
            "{what} is a {}, expected a string or an array of strings",
            v.type_name()
        ),
    ))
}

/// The decoder's own options of `ask` and `read_table` (the generation options come beside them).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AskOpts {
    /// Read the target at this layer instead of the decoder's own.
    read_layer: Option<usize>,
    /// Patch the whole dialog, control included (the paper's unmasked reading).
    patch_all: bool,
    /// `"read"` (default) or `"none"` (nothing written: the no-activation baseline).
    activations: Option<String>,
}

fn ask_options(ctx: &NativeCallContext, d: &Decoder, opts: &Map) -> ScriptResult<AskOptions> {
    let (g, a): (GenOpts, AskOpts) = parse_split(opts, "ask").map_err(|e| ctx_err(ctx, e))?;
    let mut o = AskOptions::default();
    if let Some(l) = a.read_layer {
        let n = d.target.model.n_layers();
        if l >= n {
            return Err(ctx_err(
                ctx,
                format!(
                    "read_layer {l} is out of range: the target has {n} layers (0..{})",
                    n - 1
                ),
            ));
        }
        o.read_layer = Some(l);
    }
    o.patch_all = a.patch_all;
    o.activations = activations(ctx, a.activations.as_deref())?;
    o.gen = g.resolve(&d.target, o.gen.max_new_tokens);
    Ok(o)
}

fn ask(
    ctx: &NativeCallContext,
    d: &ScriptDecoder,
    dialogs: &Dynamic,
    questions: &Dynamic,
    opts: &Map,
) -> ScriptResult<Dynamic> {
    let (ds, one_dialog) = dialogs_from(ctx, dialogs)?;
    let (qs, one_question) = questions_from(ctx, questions)?;
    let o = ask_options(ctx, &d.0, opts)?;
    let answers = d.0.ask(&ds, &qs, &o).at(ctx)?;
    let per_dialog: Vec<Dynamic> = answers
        .into_iter()
        .map(|a| {
            if one_question {
                Dynamic::from(a.into_iter().next().unwrap_or_default())
            } else {
                Dynamic::from_array(a.into_iter().map(Dynamic::from).collect())
            }
        })
        .collect();
    Ok(if one_dialog {
        per_dialog.into_iter().next().unwrap_or(Dynamic::UNIT)
    } else {
        Dynamic::from_array(per_dialog)
    })
}

/// A dialog as one line of text for a table: `user: ... | assistant: ...`.
fn dialog_text(d: &[Message]) -> String {
    d.iter()
        .map(|m| format!("{}: {}", m.role, m.content.replace('\n', " ")))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn read_table(
    ctx: &NativeCallContext,
    d: &ScriptDecoder,
    dialogs: &Dynamic,
    questions: &Dynamic,
    opts: &Map,
) -> ScriptResult<Array> {
    let (ds, _) = dialogs_from(ctx, dialogs)?;
    let (qs, _) = questions_from(ctx, questions)?;
    let o = ask_options(ctx, &d.0, opts)?;
    let answers = d.0.ask(&ds, &qs, &o).at(ctx)?;
    let mut rows = Array::new();
    for (dialog, ans) in ds.iter().zip(answers) {
        for (q, a) in qs.iter().zip(ans) {
            let mut m = Map::new();
            m.insert("dialog".into(), dialog_text(dialog).into());
            m.insert("question".into(), q.clone().into());
            m.insert("answer".into(), a.into());
            rows.push(m.into());
        }
    }
    Ok(rows)
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptDecoder>("Decoder");
    engine.register_fn(
        "load_decoder",
        |ctx: NativeCallContext, m: ScriptModel| -> ScriptResult<ScriptDecoder> {
            let dir = crate::latentqa::decoder::find_shipped_decoder(
                &m.lm.name,
                super::script_dir(&ctx).as_deref(),
            )
            .at(&ctx)?;
            Ok(ScriptDecoder(Arc::new(
                Decoder::load(m.lm.clone(), Some(&dir)).at(&ctx)?,
            )))
        },
    );
    engine.register_fn(
        "load_decoder",
        |ctx: NativeCallContext, m: ScriptModel, path: &str| -> ScriptResult<ScriptDecoder> {
            Ok(ScriptDecoder(Arc::new(
                Decoder::load(m.lm.clone(), Some(Path::new(path))).at(&ctx)?,
            )))
        },
    );
    engine.register_fn(
        "score",
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialog: Dynamic, q: &str, a: &str| {
            score(&ctx, d, &dialog, q, a, &Map::new())
        },
    );
    engine.register_fn(
        "score",
        |ctx: NativeCallContext,
         d: &mut ScriptDecoder,
         dialog: Dynamic,
         q: &str,
         a: &str,
         opts: Map| { score(&ctx, d, &dialog, q, a, &opts) },
    );
    engine.register_fn(
        "ask",
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialogs: Dynamic, q: Dynamic| {
            ask(&ctx, d, &dialogs, &q, &Map::new())
        },
    );
    engine.register_fn(
        "ask",
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialogs: Dynamic, q: Dynamic, o: Map| {
            ask(&ctx, d, &dialogs, &q, &o)
        },
    );
    engine.register_fn(
        "read_table",
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialogs: Dynamic, q: Dynamic| {
            read_table(&ctx, d, &dialogs, &q, &Map::new())
        },
    );
    engine.register_fn(
        "read_table",
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialogs: Dynamic, q: Dynamic, o: Map| {
            read_table(&ctx, d, &dialogs, &q, &o)
        },
    );
    engine.register_fn("load_dialogs", |ctx: NativeCallContext, path: &str| {
        load_dialogs(&ctx, path)
    });
    engine.register_fn("load_questions", |ctx: NativeCallContext, path: &str| {
        load_questions(&ctx, path)
    });
    engine.register_fn("info", |d: &mut ScriptDecoder| {
        let mut m = Map::new();
        m.insert("base_model".into(), d.0.meta.base_model.clone().into());
        m.insert("read_layer".into(), (d.0.meta.layers.read as i64).into());
        m.insert("write_layer".into(), (d.0.meta.layers.write as i64).into());
        m.insert("injection".into(), d.0.meta.layers.inject.name().into());
        m.insert("contrast".into(), d.0.meta.layers.contrast.into());
        let layers: Array = (d.0.meta.read_layers.iter())
            .map(|&l| Dynamic::from(l as i64))
            .collect();
        m.insert("read_layers".into(), layers.into());
        m.insert("path".into(), d.0.path.display().to_string().into());
        m
    });
    engine.register_fn("to_string", |d: &mut ScriptDecoder| {
        let m = &d.0.meta;
        let reads = if m.names_layer() {
            format!(
                "blocks.{{{}}}",
                m.read_layers
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        } else {
            format!("blocks.{}", m.layers.read)
        };
        format!(
            "Decoder({}: reads {reads}.hook_resid_post{}, writes blocks.{} by {}, from {})",
            m.base_model,
            if m.layers.contrast {
                " by contrast"
            } else {
                ""
            },
            m.layers.write,
            m.layers.inject.name(),
            d.0.path.display()
        )
    });
    let _ = Dynamic::UNIT;
}

/// `evaluate_reading` options.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EvalOpts {
    /// The LatentQA data directory.
    data_dir: Option<String>,
    /// The `split.json` a training run wrote (required).
    split: Option<String>,
    /// At most this many held-out items of each kind.
    limit: Option<usize>,
    batch_size: usize,
    seed: u64,
    /// Generate answers for this many items of each kind (the generic-answer share).
    generate: usize,
    max_new_tokens: usize,
    /// Keep masked items whose control shows in the target's own reply.
    behaviour_shown: bool,
    /// Labelled sentences for the classification kind (default `data/classification.json`);
    /// `""` leaves the kind out.
    classification: Option<String>,
}

impl Default for EvalOpts {
    fn default() -> Self {
        let d = EvalOptions::default();
        EvalOpts {
            data_dir: None,
            split: None,
            limit: None,
            batch_size: d.batch_size,
            seed: d.seed,
            generate: d.generate,
            max_new_tokens: d.max_new_tokens,
            behaviour_shown: false,
            classification: None,
        }
    }
}

/// `evaluate_reading(decoder, #{split, data_dir, limit, batch_size, seed, generate,
/// max_new_tokens, behaviour_shown, classification})`: held-out items per kind scored with
/// true, mismatched and no activations (see [`crate::lit::eval`]); `split` is the
/// `split.json` a training run wrote.
pub fn register_eval(engine: &mut Engine) {
    engine.register_fn(
        "evaluate_reading",
        |ctx: NativeCallContext, d: ScriptDecoder, opts: Map| -> ScriptResult<Map> {
            let o: EvalOpts = options(&ctx, &opts, "evaluate_reading")?;
            let data_dir = o
                .data_dir
                .map_or_else(crate::assets::latentqa_data, Into::into);
            let split_path = o.split.ok_or_else(|| {
                ctx_err(
                    &ctx,
                    "evaluate_reading needs `split` (a split.json from training)",
                )
            })?;
            let data =
                crate::lit::data::LitData::load_dir(Path::new(&data_dir), &Default::default())
                    .at(&ctx)?;
            let split = crate::lit::data::LabelSplit::load(Path::new(&split_path)).at(&ctx)?;
            let script_dir = super::script_dir(&ctx);
            let classification = match o.classification.as_deref() {
                Some("") => None,
                Some(p) => Some(p.into()),
                None => Some(crate::assets::data_file(
                    "classification.json",
                    script_dir.as_deref(),
                )),
            };
            let eo = EvalOptions {
                limit: o.limit,
                batch_size: o.batch_size.max(1),
                seed: o.seed,
                generate: o.generate,
                max_new_tokens: o.max_new_tokens.max(1),
                behaviour_shown: o.behaviour_shown,
                classification_file: classification,
            };
            let r = crate::lit::eval::evaluate_reading(&d.0, &data, &split, &eo).at(&ctx)?;
            let v = serde_json::to_value(&r).map_err(|e| ctx_err(&ctx, e))?;
            Ok(super::globals::json_to_dynamic(v)
                .try_cast::<Map>()
                .unwrap_or_default())
        },
    );
}
