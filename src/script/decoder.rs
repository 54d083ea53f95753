//! The `Decoder` script object: `load_decoder(target)` / `load_decoder(target, path)` and
//! `d.score(dialog, question, answer)`.

use super::error::{ctx_err, ScriptResult, ToScript};
use super::model::{messages_from, ScriptModel};
use crate::latentqa::decoder::Decoder;
use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};
use std::path::Path;
use std::sync::Arc;

/// A decoder as the Rhai type `Decoder`: a shared handle.
#[derive(Clone)]
pub struct ScriptDecoder(pub Arc<Decoder>);

fn patch_all(ctx: &NativeCallContext, opts: &Map) -> ScriptResult<bool> {
    if let Some(k) = opts.keys().find(|k| k.as_str() != "patch_all") {
        return Err(ctx_err(
            ctx,
            format!("unknown option `{k}` (known: patch_all)"),
        ));
    }
    match opts.get("patch_all") {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .map_err(|t| ctx_err(ctx, format!("patch_all is a {t}, expected true or false"))),
    }
}

fn score(
    ctx: &NativeCallContext,
    d: &ScriptDecoder,
    dialog: &Array,
    q: &str,
    a: &str,
    opts: &Map,
) -> ScriptResult<f64> {
    let msgs = messages_from(ctx, dialog)?;
    d.0.score(&msgs, q, a, patch_all(ctx, opts)?).at(ctx)
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptDecoder>("Decoder");
    engine.register_fn(
        "load_decoder",
        |ctx: NativeCallContext, m: ScriptModel| -> ScriptResult<ScriptDecoder> {
            Ok(ScriptDecoder(Arc::new(
                Decoder::load(m.lm.clone(), None).at(&ctx)?,
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
        |ctx: NativeCallContext, d: &mut ScriptDecoder, dialog: Array, q: &str, a: &str| {
            score(&ctx, d, &dialog, q, a, &Map::new())
        },
    );
    engine.register_fn(
        "score",
        |ctx: NativeCallContext,
         d: &mut ScriptDecoder,
         dialog: Array,
         q: &str,
         a: &str,
         opts: Map| { score(&ctx, d, &dialog, q, a, &opts) },
    );
    engine.register_fn("info", |d: &mut ScriptDecoder| {
        let mut m = Map::new();
        m.insert("base_model".into(), d.0.meta.base_model.clone().into());
        m.insert("read_layer".into(), (d.0.meta.read_layer as i64).into());
        m.insert("write_layer".into(), (d.0.meta.write_layer as i64).into());
        m.insert("path".into(), d.0.path.display().to_string().into());
        m
    });
    engine.register_fn("to_string", |d: &mut ScriptDecoder| {
        format!(
            "Decoder({}: reads blocks.{}.hook_resid_post, writes blocks.{}, from {})",
            d.0.meta.base_model,
            d.0.meta.read_layer,
            d.0.meta.write_layer,
            d.0.path.display()
        )
    });
    let _ = Dynamic::UNIT;
}

/// `evaluate_reading(decoder, #{data_dir, split, limit, batch_size, seed})`: the held-out
/// reading test (true vs shuffled activations); `split` is the `split.json` a training run
/// wrote.
pub fn register_eval(engine: &mut Engine) {
    engine.register_fn(
        "evaluate_reading",
        |ctx: NativeCallContext, d: ScriptDecoder, opts: Map| -> ScriptResult<Map> {
            const KEYS: &[&str] = &["data_dir", "split", "limit", "batch_size", "seed"];
            if let Some(k) = opts.keys().find(|k| !KEYS.contains(&k.as_str())) {
                return Err(ctx_err(
                    &ctx,
                    format!("unknown option `{k}` (known: {})", KEYS.join(", ")),
                ));
            }
            let s = |k: &str| opts.get(k).map(|v| v.to_string());
            let n = |k: &str, def: i64| opts.get(k).and_then(|v| v.as_int().ok()).unwrap_or(def);
            let data_dir = s("data_dir").unwrap_or_else(|| "../shared/latentqa-data".into());
            let split_path = s("split").ok_or_else(|| {
                ctx_err(
                    &ctx,
                    "evaluate_reading needs `split` (a split.json from training)",
                )
            })?;
            let data =
                crate::lit::data::LitData::load_dir(Path::new(&data_dir), &Default::default())
                    .at(&ctx)?;
            let split = crate::lit::data::LabelSplit::load(Path::new(&split_path)).at(&ctx)?;
            let limit = opts
                .get("limit")
                .and_then(|v| v.as_int().ok())
                .map(|l| l.max(0) as usize);
            let r = crate::lit::eval::reading_gap(
                &d.0,
                &data,
                &split,
                limit,
                n("batch_size", 8).max(1) as usize,
                n("seed", 0) as u64,
            )
            .at(&ctx)?;
            let v = serde_json::to_value(&r).expect("json");
            Ok(super::globals::json_to_dynamic(v)
                .try_cast::<Map>()
                .unwrap_or_default())
        },
    );
    let _: Option<Array> = None;
}
