//! Interrupted writes: `lqa` running LIT training and control on the tiny chat model is killed
//! with SIGKILL at seeded random moments (mid-step, mid-checkpoint swap, at load) and started
//! again with `resume: true` until it finishes. Every restart must resume (no torn checkpoint is
//! ever read) and the final adapter and optimizer state must be byte-identical to those of an
//! uninterrupted run.

mod common;

use common::chat_model::{write_tiny_chat_model, write_toy_latentqa_data};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIT: &str = r#"
let m = load_model(ARGS[0]);
let t = lit_trainer(m, #{
    data_dir: ARGS[1], out_dir: ARGS[2], resume: true, seed: 3, eval_fraction: 0.34,
    batch_size: 2, grad_accum: 1, max_steps: 6, checkpoint_every: 1, eval_every: 3,
    min_read_layer: 0, max_read_layer: 1, write_layer: 0, lr: 0.003,
    lora: #{r: 2, lora_alpha: 4.0}
});
t.train();
if ARGS.len() > 3 { t.save(ARGS[3]); }
"#;

const CONTROL: &str = r#"
let m = load_model(ARGS[0]);
let d = load_decoder(m, ARGS[1]);
let c = control_optimizer(m, d, #{
    control: ARGS[2], prompts: ARGS[3], out_dir: ARGS[4], resume: true,
    samples: 8, batch_size: 2, lr: 0.003, r: 2, lora_alpha: 4.0,
    layers_to_optimize: [0, 1], checkpoint_every: 1, seed: 5
});
c.run();
"#;

/// Run `script` with `args` to the end, killing it with SIGKILL up to `max_kills` times: half
/// the time at a seeded random moment within `span`, half the time a few milliseconds after
/// the run's `metrics` file grows (a step has ended: its checkpoint is being written). Every
/// start after a kill resumes and must succeed; returns the number of kills.
fn run_with_kills(
    dir: &Path,
    script: &Path,
    args: &[&str],
    seed: u64,
    max_kills: usize,
    span: Duration,
) -> usize {
    let metrics = dir.join(args.last().unwrap()).join("metrics.jsonl");
    let size = || std::fs::metadata(&metrics).map_or(0, |m| m.len());
    let mut rng = lqa::rng::SplitMix64::new(seed);
    let mut kills = 0;
    for attempt in 0.. {
        assert!(attempt < 3 * max_kills + 5, "the run never finished");
        let start_size = size();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lqa"))
            .arg(script)
            .args(args)
            .current_dir(dir)
            .env("LQA_HOME", dir.join("home"))
            .env_remove("LQA_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let after_step = rng.below(2) == 1;
        let mut deadline = (kills < max_kills && !after_step)
            .then(|| Instant::now() + span.mul_f64(rng.below(1000) as f64 / 1000.0));
        let step_delay = Duration::from_millis(rng.below(40));
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "a restart failed: {err}");
                return kills;
            }
            if kills < max_kills && after_step && deadline.is_none() && size() > start_size {
                deadline = Some(Instant::now() + step_delay);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    unreachable!()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Two safetensors files hold the same tensors (names, dtypes, shapes, bytes) and metadata
/// (the header's metadata map is written in hash order, so the files' bytes may differ).
fn same_safetensors(a: &Path, b: &Path) -> bool {
    let (x, y) = (read(a), read(b));
    let (hx, mx) = safetensors::SafeTensors::read_metadata(&x).unwrap();
    let (hy, my) = safetensors::SafeTensors::read_metadata(&y).unwrap();
    let (tx, ty) = (
        safetensors::SafeTensors::deserialize(&x).unwrap(),
        safetensors::SafeTensors::deserialize(&y).unwrap(),
    );
    let mut names = tx.names();
    names.sort();
    let mut other = ty.names();
    other.sort();
    names == other
        && mx.metadata() == my.metadata()
        && hx == hy
        && names.iter().all(|n| {
            let (p, q) = (tx.tensor(n).unwrap(), ty.tensor(n).unwrap());
            p.dtype() == q.dtype() && p.shape() == q.shape() && p.data() == q.data()
        })
}

/// Run to the end without kills; returns how long it took.
fn timed(dir: &Path, script: &Path, args: &[&str]) -> Duration {
    let t0 = Instant::now();
    assert_eq!(run_with_kills(dir, script, args, 0, 0, Duration::ZERO), 0);
    t0.elapsed()
}

#[test]
fn killed_lit_and_control_runs_resume_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // LQA_KILL_KEEP=1 keeps the runs to look at
    let _tmp = if std::env::var_os("LQA_KILL_KEEP").is_some() {
        println!("kept {}", tmp.keep().display());
        None
    } else {
        Some(tmp)
    };
    let d = dir.as_path();
    let model = write_tiny_chat_model(&d.join("model"), 7);
    write_toy_latentqa_data(&d.join("data"));
    std::fs::write(d.join("lit.rhai"), LIT).unwrap();
    std::fs::write(d.join("control.rhai"), CONTROL).unwrap();
    std::fs::write(
        d.join("cat.json"),
        r#"{"be a cat": [["who is the assistant?", "a cat"], ["what will it say?", "meow"]]}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("instructions.json"),
        r#"[{"instruction": "name a color", "response": "blue"},
            {"instruction": "say hi", "response": "hi there"},
            {"instruction": "add two and two", "response": "four"}]"#,
    )
    .unwrap();
    let (m, data) = (model.to_str().unwrap(), d.join("data"));
    let data = data.to_str().unwrap();

    // LQA_KILL_SEED / LQA_KILL_MAX (kills per run) vary the kills for longer runs
    let seed: u64 = std::env::var("LQA_KILL_SEED").map_or(14, |s| s.parse().unwrap());
    let max: usize = std::env::var("LQA_KILL_MAX").map_or(6, |s| s.parse().unwrap());

    // LIT: the uninterrupted run (it also saves the decoder control uses), then a killed one
    // whose kills fall anywhere in as long as the uninterrupted run took
    let lit = d.join("lit.rhai");
    let span = timed(d, &lit, &[m, data, "lit-ref", "decoder"]);
    let lit_kills = run_with_kills(d, &lit, &[m, data, "lit-killed"], seed, max, span);
    let (a, b) = (
        d.join("lit-ref/checkpoint"),
        d.join("lit-killed/checkpoint"),
    );
    let adapter = "adapter/adapter_model.safetensors";
    assert!(
        read(&a.join(adapter)) == read(&b.join(adapter)),
        "the LIT adapter differs after {lit_kills} kills"
    );
    let opt = "optimizer.safetensors";
    assert!(
        same_safetensors(&a.join(opt), &b.join(opt)),
        "the LIT optimizer state differs after {lit_kills} kills"
    );

    // control with the decoder just trained
    let control = d.join("control.rhai");
    let args = |out: &'static str| [m, "decoder", "cat.json", "instructions.json", out];
    let span = timed(d, &control, &args("control-ref"));
    let control_kills = run_with_kills(d, &control, &args("control-killed"), seed + 1, max, span);
    let (a, b) = (
        d.join("control-ref/checkpoint"),
        d.join("control-killed/checkpoint"),
    );
    assert!(
        read(&a.join(adapter)) == read(&b.join(adapter)),
        "the control adapter differs after {control_kills} kills"
    );
    let mut optimizers = 0;
    for e in std::fs::read_dir(&a).unwrap() {
        let f = e.unwrap().file_name();
        if f.to_string_lossy().ends_with(".safetensors") {
            optimizers += 1;
            assert!(
                same_safetensors(&a.join(&f), &b.join(&f)),
                "control {f:?} differs after {control_kills} kills"
            );
        }
    }
    assert!(optimizers > 0);
    // no temporary checkpoint folders are left behind
    for run in ["lit-killed", "control-killed"] {
        let left: Vec<_> = std::fs::read_dir(d.join(run))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp") || n.ends_with(".old"))
            .collect();
        assert!(left.is_empty(), "{run}: {left:?}");
    }
    println!("LIT: {lit_kills} kills, control: {control_kills} kills");
    assert!(lit_kills > 0 && control_kills > 0);
}
