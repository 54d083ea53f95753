//! A training run on disk and its step loop, the same for LIT and control.
//!
//! `out_dir/` holds `metrics.jsonl` (one JSON line per step), `checkpoint/` (written atomically:
//! the previous one is replaced only once the new one is complete; `state.json` marks a complete
//! checkpoint) and `loss.svg`.

use super::plot::{write_loss_curve, Series};
use crate::util::{atomic_dir, atomic_write, recover_dir};
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The state file that marks a complete checkpoint.
pub const STATE_FILE: &str = "state.json";

/// Stats of one step, as a line of `metrics.jsonl`.
pub trait StepRecord: Serialize + DeserializeOwned + Clone {
    /// The step these stats are of (1-based: the step just taken).
    fn step(&self) -> usize;
}

/// A run's output directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: impl Into<PathBuf>) -> RunDir {
        RunDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `out_dir/checkpoint`.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    fn metrics_file(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// The checkpoint, if there is a complete one (a swap interrupted between its two renames
    /// leaves `checkpoint.old`: that is recovered first).
    pub fn find_checkpoint(&self) -> Result<Option<PathBuf>> {
        let ck = self.checkpoint_dir();
        recover_dir(&ck)?;
        Ok(ck.join(STATE_FILE).exists().then_some(ck))
    }

    /// The checkpoint's state, if there is a checkpoint; `what` names the kind of run in the
    /// error for a state file of another shape.
    pub fn read_state<S: DeserializeOwned>(&self, what: &str) -> Result<Option<S>> {
        let Some(ck) = self.find_checkpoint()? else {
            return Ok(None);
        };
        let p = ck.join(STATE_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::bad_file(&p, format!("not a {what} checkpoint state: {e}")))
    }

    /// Write a checkpoint atomically: `fill` writes its files into a temporary directory, which
    /// then replaces `checkpoint/`.
    pub fn write_checkpoint(&self, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let ck = self.checkpoint_dir();
        atomic_dir(&ck, fill)?;
        Ok(ck)
    }

    /// A new run: create the directory and start an empty `metrics.jsonl`.
    pub fn start(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        atomic_write(&self.metrics_file(), b"")
    }

    /// A resumed run at `step`: the metrics up to the checkpoint, with the file trimmed to them
    /// (the resumed run rewrites what follows).
    pub fn resume_metrics<S: StepRecord>(&self, step: usize) -> Result<Vec<S>> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let metrics = self.metrics_file();
        let kept: Vec<S> = if metrics.exists() {
            let text = std::fs::read_to_string(&metrics).map_err(|e| Error::io(&metrics, e))?;
            text.lines()
                .filter_map(|l| serde_json::from_str::<S>(l).ok())
                .filter(|s| s.step() <= step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for s in &kept {
            text += &json_line(s, &metrics)?;
        }
        atomic_write(&metrics, text.as_bytes())?;
        Ok(kept)
    }

    /// Append one step's stats to `metrics.jsonl`.
    pub fn append_metrics<S: Serialize>(&self, stats: &S) -> Result<()> {
        let p = self.metrics_file();
        let line = json_line(stats, &p)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.write_all(line.as_bytes()).map_err(|e| Error::io(&p, e))
    }

    /// Write `loss.svg`.
    pub fn plot(&self, series: &[Series], title: &str, y_label: &str) -> Result<PathBuf> {
        let path = self.dir.join("loss.svg");
        write_loss_curve(&path, series, title, "step", y_label)?;
        Ok(path)
    }
}

fn json_line(v: &impl Serialize, file: &Path) -> Result<String> {
    serde_json::to_string(v)
        .map(|s| s + "\n")
        .map_err(|e| Error::bad_file(file, e))
}

/// The fields (by path, `lora.r`) in which two configs differ, `ignore`d top-level fields left
/// out; numbers compare by value (`1` equals `1.0`).
pub fn config_differences<C: Serialize>(saved: &C, asked: &C, ignore: &[&str]) -> Vec<String> {
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            // to 1e-12, relative: a config read back from JSON need not keep a float's last bit
            (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                _ => x == y,
            },
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            _ => a == b,
        }
    }
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let (v, w) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    walk(&format!("{prefix}{k}."), v, w, out);
                }
            }
            _ if !same(a, b) => out.push(format!(
                "{}: checkpoint {a}, asked {b}",
                prefix.trim_end_matches('.')
            )),
            _ => {}
        }
    }
    let (Ok(mut a), Ok(mut b)) = (serde_json::to_value(saved), serde_json::to_value(asked)) else {
        return vec!["the config cannot be written as JSON".into()];
    };
    for k in ignore {
        for v in [&mut a, &mut b] {
            if let Some(m) = v.as_object_mut() {
                m.remove(*k);
            }
        }
    }
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// The one resume rule: a run resumes only with the config its checkpoint was made with
/// (`ignore`d fields, such as how often to checkpoint, may change). `state` names the file.
pub fn check_resume_config<C: Serialize>(
    state: &Path,
    saved: &C,
    asked: &C,
    ignore: &[&str],
) -> Result<()> {
    let diff = config_differences(saved, asked, ignore);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::bad_file(
        state,
        format!(
            "the checkpoint was made with another config: {}",
            diff.join("; ")
        ),
    ))
}

/// Stop a run whose loss is not finite (`what`: "LIT", "control"), before the update of `step`
/// (1-based) is applied: the weights in memory and the last checkpoint stay as they were.
pub fn check_finite_loss(what: &str, step: usize, loss: f64) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} step {step}: the loss is {loss}; training stopped before this step's update \
         (the last checkpoint is intact: lower the learning rate, or check the data)"
    )))
}

/// Stop before an optimizer update whose gradient for `name` holds a NaN or an infinity.
pub fn check_finite_grad(name: &str, grad: &candle_core::Tensor, step: usize) -> Result<()> {
    // one reduction decides; only a bad gradient is searched for its first bad index
    let sum = grad
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    if sum.is_finite() {
        return Ok(());
    }
    let at = match crate::hooks::first_non_finite(grad)? {
        Some((index, x)) => format!("{x} at index {index:?}"),
        None => "values whose sum overflows".to_string(),
    };
    Err(Error::invalid(format!(
        "step {step}: the gradient of `{name}` holds {at}; training stopped before this \
         step's update (the last checkpoint is intact: lower the learning rate, or check the data)"
    )))
}

/// Whether something scheduled every `n` steps (0: never) is due at `step`.
pub fn every(n: usize, step: usize) -> bool {
    n > 0 && step.is_multiple_of(n)
}

/// A run the step loop drives.
pub trait Steps {
    type Stats;
    fn is_done(&self) -> bool;
    /// Take one step (and whatever is due with it, e.g. an evaluation) and record its stats.
    fn next_step(&mut self) -> Result<Self::Stats>;
    /// Whether a checkpoint is due after `stats` on the run's own schedule.
    fn checkpoint_due(&self, stats: &Self::Stats) -> bool;
    /// Write the checkpoint and the plot (a run without a directory does nothing).
    fn save_point(&mut self) -> Result<()>;
}

/// Step to the end. `on_step` sees each step's stats and returns `false` to stop; a checkpoint
/// is written when due, on a stop and at the end (once per step). An interrupt (Ctrl-C) is an
/// error from the step and leaves the last checkpoint as it was.
pub fn run_steps<R: Steps>(
    run: &mut R,
    mut on_step: impl FnMut(&R::Stats) -> Result<bool>,
) -> Result<()> {
    let mut saved = false;
    while !run.is_done() {
        let stats = run.next_step()?;
        let go_on = on_step(&stats)?;
        saved = false;
        if run.checkpoint_due(&stats) || run.is_done() || !go_on {
            run.save_point()?;
            saved = true;
        }
        if !go_on {
            break;
        }
    }
    if !saved {
        // a run that took no step (resumed at its end) still leaves its plot and checkpoint
        run.save_point()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Cfg {
        lr: f64,
        every: usize,
        lora: Lora,
    }
    #[derive(Serialize)]
    struct Lora {
        r: usize,
        modules: Vec<&'static str>,
    }

    fn cfg(lr: f64, every: usize, r: usize) -> Cfg {
        Cfg {
            lr,
            every,
            lora: Lora {
                r,
                modules: vec!["q_proj"],
            },
        }
    }

    #[test]
    fn differences_name_nested_fields_and_skip_the_ignored() {
        assert!(config_differences(&cfg(1e-3, 5, 4), &cfg(1e-3, 9, 4), &["every"]).is_empty());
        let d = config_differences(&cfg(1e-3, 5, 4), &cfg(2e-3, 5, 8), &[]);
        assert_eq!(
            d,
            [
                "lora.r: checkpoint 4, asked 8",
                "lr: checkpoint 0.001, asked 0.002"
            ]
        );
        // a float read back from JSON with its last bit off still matches
        let x = 0.1f64 + 0.2;
        assert!(config_differences(
            &cfg(x, 5, 4),
            &cfg(f64::from_bits(x.to_bits() + 1), 5, 4),
            &[]
        )
        .is_empty());
    }

    /// A run of `n` steps that records when it saved.
    struct Counting {
        step: usize,
        n: usize,
        every: usize,
        saved: Vec<usize>,
    }

    impl Steps for Counting {
        type Stats = usize;
        fn is_done(&self) -> bool {
            self.step >= self.n
        }
        fn next_step(&mut self) -> Result<usize> {
            self.step += 1;
            Ok(self.step)
        }
        fn checkpoint_due(&self, s: &usize) -> bool {
            every(self.every, *s)
        }
        fn save_point(&mut self) -> Result<()> {
            self.saved.push(self.step);
            Ok(())
        }
    }

    #[test]
    fn the_loop_saves_when_due_on_a_stop_and_at_the_end_once() {
        let mut r = Counting {
            step: 0,
            n: 7,
            every: 3,
            saved: vec![],
        };
        run_steps(&mut r, |_| Ok(true)).unwrap();
        assert_eq!(r.saved, [3, 6, 7]);
        let mut r = Counting {
            step: 0,
            n: 7,
            every: 3,
            saved: vec![],
        };
        run_steps(&mut r, |s| Ok(*s < 4)).unwrap();
        assert_eq!((r.step, r.saved), (4, vec![3, 4]));
        let mut r = Counting {
            step: 0,
            n: 6,
            every: 3,
            saved: vec![],
        };
        run_steps(&mut r, |_| Ok(true)).unwrap();
        assert_eq!(r.saved, [3, 6]);
        // resumed at its end: no step, one save (the plot and checkpoint exist)
        let mut r = Counting {
            step: 6,
            n: 6,
            every: 3,
            saved: vec![],
        };
        run_steps(&mut r, |_| Ok(true)).unwrap();
        assert_eq!(r.saved, [6]);
        // an error in a step stops the loop without a save
        struct Failing;
        impl Steps for Failing {
            type Stats = ();
            fn is_done(&self) -> bool {
                false
            }
            fn next_step(&mut self) -> Result<()> {
                Err(Error::Interrupted)
            }
            fn checkpoint_due(&self, _: &()) -> bool {
                true
            }
            fn save_point(&mut self) -> Result<()> {
                panic!("no save after a failed step")
            }
        }
        assert!(run_steps(&mut Failing, |_| Ok(true)).is_err());
    }

    #[test]
    fn metrics_are_trimmed_to_the_resumed_step() {
        #[derive(Clone, Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            step: usize,
        }
        impl StepRecord for S {
            fn step(&self) -> usize {
                self.step
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path().join("run"));
        run.start().unwrap();
        for step in 1..=5 {
            run.append_metrics(&S { step }).unwrap();
        }
        let kept: Vec<S> = run.resume_metrics(3).unwrap();
        assert_eq!(kept, [S { step: 1 }, S { step: 2 }, S { step: 3 }]);
        let text = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
        assert_eq!(text, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
        assert_eq!(run.find_checkpoint().unwrap(), None);
        let ck = run
            .write_checkpoint(|d| {
                std::fs::write(d.join(STATE_FILE), "{}").map_err(|e| Error::io(d, e))
            })
            .unwrap();
        assert_eq!(run.find_checkpoint().unwrap(), Some(ck));
    }
}
