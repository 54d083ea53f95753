//! A training or control loop run from a script: one progress bar (steps, loss, elapsed, ETA)
//! and the script's `on_step` callback, the same for the `Trainer` and `ControlOptimizer`.

use super::error::{ScriptResult, ToScript};
use super::to_map;
use crate::train::run::StepRecord;
use rhai::{Dynamic, EvalAltResult, FnPtr, NativeCallContext};

/// Call a loop's `on_step` callback (if set) with the step's stats; it returns `false` to stop.
pub fn call_on_step(
    ctx: &NativeCallContext,
    on_step: Option<&FnPtr>,
    stats: &impl serde::Serialize,
) -> ScriptResult<bool> {
    match on_step {
        None => Ok(true),
        Some(f) => {
            let r: Dynamic = f.call_within_context(ctx, (Dynamic::from_map(to_map(stats)),))?;
            Ok(r.as_bool().unwrap_or(true))
        }
    }
}

/// The progress bar of a loop: steps, a message (loss...), elapsed and ETA.
pub fn step_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar.set_position(done as u64);
    bar
}

/// Drive a loop (`run` is the loop's own `train`/`run`, given the per-step callback) with the
/// progress bar and the script's callback. An error in the callback stops the loop (after its
/// checkpoint) and is the call's error, with its own position.
pub fn drive<S: StepRecord>(
    ctx: &NativeCallContext,
    on_step: Option<&FnPtr>,
    (done, total): (usize, usize),
    message: impl Fn(&S) -> String,
    run: impl FnOnce(&mut dyn FnMut(&S) -> crate::Result<bool>) -> crate::Result<()>,
) -> ScriptResult<()> {
    let bar = step_bar(total, done);
    let mut err: Option<Box<EvalAltResult>> = None;
    let res = run(&mut |s: &S| {
        bar.set_position(s.step() as u64);
        bar.set_message(message(s));
        match call_on_step(ctx, on_step, s) {
            Ok(go) => Ok(go),
            Err(e) => {
                err = Some(e);
                Ok(false)
            }
        }
    });
    bar.finish();
    if let Some(e) = err {
        return Err(e);
    }
    res.at(ctx)
}
