//! The `Trainer` script object: `lit_trainer(target, config)` with `step()`, `train()`,
//! `evaluate()`, `save(dir)`, `checkpoint()` and an `on_step` callback.

use super::error::{ctx_err, ScriptResult, ToScript};
use super::model::ScriptModel;
use super::options::parse_over;
use crate::lit::trainer::{StepStats, TrainConfig, Trainer};
use rhai::{Engine, FnPtr, Map, NativeCallContext};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A training run as the Rhai type `Trainer` (a shared handle).
#[derive(Clone)]
pub struct ScriptTrainer {
    pub inner: Arc<Mutex<Trainer>>,
    pub on_step: Option<FnPtr>,
}

/// Build a config from a script map: keys are `TrainConfig` fields (`lora` a map of PEFT keys);
/// `resume: true` continues the run checkpointed in `out_dir`.
fn config_from(ctx: &NativeCallContext, map: &Map) -> ScriptResult<(TrainConfig, bool)> {
    let mut map = map.clone();
    let resume = match map.remove("resume") {
        None => false,
        Some(v) => v
            .as_bool()
            .map_err(|t| ctx_err(ctx, format!("resume is a {t}, expected true or false")))?,
    };
    let cfg: TrainConfig = parse_over(&map, &TrainConfig::default(), "trainer config", &["resume"])
        .map_err(|e| ctx_err(ctx, e))?;
    Ok((cfg, resume))
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptTrainer>("Trainer");
    engine.register_fn(
        "lit_trainer",
        |ctx: NativeCallContext, target: ScriptModel, config: Map| -> ScriptResult<ScriptTrainer> {
            let (cfg, resume) = config_from(&ctx, &config)?;
            let t = Trainer::open(target.lm.clone(), cfg, resume).at(&ctx)?;
            Ok(ScriptTrainer {
                inner: Arc::new(Mutex::new(t)),
                on_step: None,
            })
        },
    );
    engine.register_fn("on_step", |t: &mut ScriptTrainer, f: FnPtr| {
        t.on_step = Some(f);
    });
    engine.register_fn(
        "step",
        |ctx: NativeCallContext, t: &mut ScriptTrainer| -> ScriptResult<Map> {
            let stats = {
                let mut tr = t
                    .inner
                    .lock()
                    .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?;
                let s = tr.step().at(&ctx)?;
                tr.record(&s).at(&ctx)?;
                s
            };
            Ok(super::to_map(&stats))
        },
    );
    engine.register_fn(
        "evaluate",
        |ctx: NativeCallContext, t: &mut ScriptTrainer| -> ScriptResult<f64> {
            t.inner
                .lock()
                .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?
                .evaluate()
                .at(&ctx)
        },
    );
    engine.register_fn(
        "checkpoint",
        |ctx: NativeCallContext, t: &mut ScriptTrainer| -> ScriptResult<String> {
            let tr = t
                .inner
                .lock()
                .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?;
            tr.plot().at(&ctx)?;
            Ok(tr.checkpoint().at(&ctx)?.display().to_string())
        },
    );
    engine.register_fn(
        "save",
        |ctx: NativeCallContext, t: &mut ScriptTrainer, dir: &str| -> ScriptResult<()> {
            let mut tr = t
                .inner
                .lock()
                .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?;
            tr.save_adapter(Path::new(dir), candle_core::DType::BF16)
                .at(&ctx)
        },
    );
    engine.register_fn(
        "info",
        |ctx: NativeCallContext, t: &mut ScriptTrainer| -> ScriptResult<Map> {
            let tr = t
                .inner
                .lock()
                .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?;
            let mut m = Map::new();
            m.insert("step".into(), (tr.step_count() as i64).into());
            m.insert("total_steps".into(), (tr.total_steps() as i64).into());
            m.insert("train_examples".into(), (tr.n_train() as i64).into());
            m.insert("eval_examples".into(), (tr.n_eval() as i64).into());
            m.insert(
                "trainable_parameters".into(),
                (tr.adapter().num_parameters() as i64).into(),
            );
            let counts = serde_json::to_value(tr.kind_counts()).unwrap_or_default();
            m.insert("kinds".into(), super::globals::json_to_dynamic(counts));
            m.insert(
                "out_dir".into(),
                tr.config.out_dir.display().to_string().into(),
            );
            Ok(m)
        },
    );
    engine.register_fn(
        "train",
        |ctx: NativeCallContext, t: &mut ScriptTrainer| -> ScriptResult<()> {
            let inner = t.inner.clone();
            let mut tr = inner
                .lock()
                .map_err(|_| ctx_err(&ctx, "trainer lock poisoned"))?;
            let steps = (tr.step_count(), tr.total_steps());
            let message = |s: &StepStats| {
                let eval = s
                    .eval_loss
                    .map(|e| format!(" eval {e:.3}"))
                    .unwrap_or_default();
                format!("loss {:.3}{eval}  lr {:.2e}", s.loss, s.lr)
            };
            super::progress::drive(&ctx, t.on_step.as_ref(), steps, message, |f| tr.train(f))
        },
    );
}
