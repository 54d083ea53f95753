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
