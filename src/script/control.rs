//! The `ControlOptimizer` script object: `control_optimizer(target, decoder, config)` with
//! `step()`, `run()`, `checkpoint()`, `save(dir)`, `steered()`, `info()` and an `on_step`
//! callback.
//!
//! `config` keys: `control` (a name in `controls/` or a path), `prompts` (an instruction set,
//! default `data/instructions.json`; both found as in [`crate::assets`]), `out_dir` (metrics, loss curve, checkpoints), `resume`
//! (`true`: continue the run checkpointed in `out_dir`, or start a new one when there is no
//! checkpoint), and the fields of [`ControlConfig`] (`samples`, `batch_size`, `lr`,
//! `lora_modules`, `r`, `lora_alpha`, `lora_dropout`, `layers_to_optimize`, `read_layer`,
//! `write_layer`, `per_layer_loss`, `seed`, `max_tokens`, `checkpoint_every`, `kl_weight`,
//! `early_stop`: a map of [`crate::control::fluency::EarlyStop`]'s fields, or `()` for off,
//! `recompute`: blocks run again in the backward pass instead of keeping their activations).

use super::decoder::ScriptDecoder;
use super::error::{ctx_err, ScriptResult, ToScript};
use super::model::ScriptModel;
use super::options::parse_over;
use crate::assets;
use crate::control::data::{load_instructions, Control};
use crate::control::{ControlConfig, ControlOptimizer, ControlStats};
use rhai::{Engine, FnPtr, Map, NativeCallContext};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A control run as the Rhai type `ControlOptimizer` (a shared handle).
#[derive(Clone)]
pub struct ScriptControl {
    pub inner: Arc<Mutex<ControlOptimizer>>,
    pub on_step: Option<FnPtr>,
    pub out_dir: Option<PathBuf>,
}

struct Parsed {
    config: ControlConfig,
    control: PathBuf,
    prompts: PathBuf,
    out_dir: Option<PathBuf>,
    resume: bool,
}

fn parse_config(ctx: &NativeCallContext, map: &Map) -> ScriptResult<Parsed> {
    let mut map = map.clone();
    let mut take_str = |k: &str| -> ScriptResult<Option<String>> {
        match map.remove(k) {
            None => Ok(None),
            Some(v) => v
                .into_string()
                .map(Some)
                .map_err(|t| ctx_err(ctx, format!("`{k}` is a {t}, expected a string"))),
        }
    };
    let control = take_str("control")?
        .ok_or_else(|| ctx_err(ctx, "the config needs `control` (a controls name or file)"))?;
    let prompts = take_str("prompts")?.map(PathBuf::from);
    let out_dir = take_str("out_dir")?.map(PathBuf::from);
    let resume = match map.remove("resume") {
        None => false,
        Some(v) => v
            .as_bool()
            .map_err(|t| ctx_err(ctx, format!("`resume` is a {t}, expected true or false")))?,
    };
    if resume && out_dir.is_none() {
        return Err(ctx_err(
            ctx,
            "`resume: true` needs `out_dir` (where the run's checkpoint is)",
        ));
    }
    let config: ControlConfig = parse_over(
        &map,
        &ControlConfig::default(),
        "control config",
        &["control", "prompts", "out_dir", "resume"],
    )
    .map_err(|e| ctx_err(ctx, e))?;
    let here = super::script_dir(ctx);
    Ok(Parsed {
        config,
        control: assets::control_path(&control, here.as_deref()),
        prompts: prompts.unwrap_or_else(|| assets::data_file("instructions.json", here.as_deref())),
        out_dir,
        resume,
    })
}

fn lock<'a>(
    ctx: &NativeCallContext,
    c: &'a ScriptControl,
) -> ScriptResult<std::sync::MutexGuard<'a, ControlOptimizer>> {
    c.inner
        .lock()
        .map_err(|_| ctx_err(ctx, "control optimizer lock poisoned"))
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptControl>("ControlOptimizer");
    engine.register_fn(
        "control_optimizer",
        |ctx: NativeCallContext,
         target: ScriptModel,
         decoder: ScriptDecoder,
         config: Map|
         -> ScriptResult<ScriptControl> {
            let p = parse_config(&ctx, &config)?;
            if !Arc::ptr_eq(&target.lm, &decoder.0.target)
                && target.lm.name != decoder.0.target.name
            {
                return Err(ctx_err(
                    &ctx,
                    format!(
                        "the decoder reads `{}`, not `{}`",
                        decoder.0.target.name, target.lm.name
                    ),
                ));
            }
            let control = Control::load(&p.control).at(&ctx)?;
            let checkpoint = match (&p.out_dir, p.resume) {
                (Some(d), true) => ControlOptimizer::find_checkpoint(d).at(&ctx)?,
                _ => None,
            };
            let opt = match (&p.out_dir, checkpoint) {
                (Some(d), Some(_)) => {
                    ControlOptimizer::resume(&decoder.0, control, p.config, d).at(&ctx)?
                }
                (d, _) => {
                    if let (Some(d), true) = (d, p.resume) {
                        tracing::warn!("no checkpoint in {}: starting a new run", d.display());
                    }
                    let instructions = load_instructions(&p.prompts).at(&ctx)?;
                    let opt = ControlOptimizer::new(&decoder.0, control, &instructions, p.config)
                        .at(&ctx)?;
                    match d {
                        Some(d) => opt.with_out_dir(d).at(&ctx)?,
                        None => opt,
                    }
                }
            };
            Ok(ScriptControl {
                inner: Arc::new(Mutex::new(opt)),
                on_step: None,
                out_dir: p.out_dir,
            })
        },
    );
    engine.register_fn("on_step", |c: &mut ScriptControl, f: FnPtr| {
        c.on_step = Some(f);
    });
    engine.register_fn(
        "step",
        |ctx: NativeCallContext, c: &mut ScriptControl| -> ScriptResult<Map> {
            let s = lock(&ctx, c)?.step().at(&ctx)?;
            Ok(super::to_map(&s))
        },
    );
    engine.register_fn(
        "run",
        |ctx: NativeCallContext, c: &mut ScriptControl| -> ScriptResult<()> {
            let cc = c.clone();
            let mut opt = lock(&ctx, &cc)?;
            let steps = (opt.step_count(), opt.total_steps());
            let message = |s: &ControlStats| format!("loss {:.3}", s.loss);
            super::progress::drive(&ctx, cc.on_step.as_ref(), steps, message, |f| opt.run(f))
        },
    );
    engine.register_fn(
        "checkpoint",
        |ctx: NativeCallContext, c: &mut ScriptControl| -> ScriptResult<String> {
            let path = lock(&ctx, c)?.checkpoint().at(&ctx)?;
            Ok(path.display().to_string())
        },
    );
    engine.register_fn(
        "save",
        |ctx: NativeCallContext, c: &mut ScriptControl, dir: &str| -> ScriptResult<()> {
            lock(&ctx, c)?.save(Path::new(dir)).at(&ctx)
        },
    );
    engine.register_fn(
        "steered",
        |ctx: NativeCallContext, c: &mut ScriptControl| -> ScriptResult<ScriptModel> {
            let opt = lock(&ctx, c)?;
            let lm = opt.target().with_model(opt.steered().clone());
            Ok(ScriptModel {
                lm: Arc::new(lm),
                template: None,
            })
        },
    );
    engine.register_fn(
        "info",
        |ctx: NativeCallContext, c: &mut ScriptControl| -> ScriptResult<Map> {
            let opt = lock(&ctx, c)?;
            let mut m = Map::new();
            m.insert("step".into(), (opt.step_count() as i64).into());
            m.insert("total_steps".into(), (opt.total_steps() as i64).into());
            m.insert("samples".into(), (opt.n_samples() as i64).into());
            m.insert(
                "trainable_parameters".into(),
                (opt.num_parameters() as i64).into(),
            );
            m.insert("control".into(), opt.control.prompt.clone().into());
            m.insert("qa_pairs".into(), (opt.control.qa.len() as i64).into());
            if let Some(stopped) = opt.stopped() {
                m.insert("stopped".into(), super::to_map(stopped).into());
            }
            if let Some(d) = &c.out_dir {
                m.insert("out_dir".into(), d.display().to_string().into());
            }
            Ok(m)
        },
    );
}
