//! Loader fuzzing: every file lqa reads from a user (GGUF, safetensors, config.json,
//! tokenizer.json, tokenizer_config.json, PEFT adapters, `lqa_decoder.json`, LatentQA data,
//! controls, instruction and prompt sets, LIT checkpoints) is mutated from a valid seed and
//! loaded; a loader must return an error or a value, never panic, hang or allocate without
//! bound.
//!
//! A *fixtures* folder holds one valid file of each kind (see [`TARGETS`] for the layout; the
//! test `tests/fuzz_loaders.rs` writes it from a tiny random model). A case copies the files a
//! loader needs into a scratch folder, replaces one with the mutated bytes and runs the loader
//! ([`run_case`]). [`Mutator`] makes the bytes (bit flips, interesting integers, truncation,
//! extension, splices, JSON field edits) from a fixed seed, so a run is repeatable; [`drive`]
//! runs cases with a time bound each and counts what happened. The cargo-fuzz targets in
//! `fuzz/` call [`run_case`] with libFuzzer's bytes.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lm::{LanguageModel, LoadOptions};
use crate::rng::SplitMix64;
use crate::sources::ModelSource;
use crate::{Error, Result};

/// A loader under test: the fixture file it mutates and what it loads.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// The file (relative to the fixtures folder) replaced by the mutated bytes.
    pub file: &'static str,
    /// The folder (relative to the fixtures folder) copied into the scratch folder.
    pub copy: &'static str,
    /// Whether the file is JSON (JSON-aware mutations are tried too).
    pub json: bool,
}

/// Every loader, with its fixture file.
pub const TARGETS: &[Target] = &[
    // the default model's own GGUF header (49152 tokens, merges, template, every key) with the
    // model shrunk to one small layer; present when the default model is cached
    Target {
        name: "gguf_default",
        file: "default.gguf",
        copy: "default.gguf",
        json: false,
    },
    Target {
        name: "gguf",
        file: "model.gguf",
        copy: "model.gguf",
        json: false,
    },
    Target {
        name: "safetensors",
        file: "model/model.safetensors",
        copy: "model",
        json: false,
    },
    Target {
        name: "config_json",
        file: "model/config.json",
        copy: "model",
        json: true,
    },
    Target {
        name: "tokenizer_json",
        file: "model/tokenizer.json",
        copy: "model",
        json: true,
    },
    Target {
        name: "tokenizer_config_json",
        file: "model/tokenizer_config.json",
        copy: "model",
        json: true,
    },
    Target {
        name: "load_tensors",
        file: "tensors.safetensors",
        copy: "tensors.safetensors",
        json: false,
    },
    Target {
        name: "adapter_config",
        file: "decoder/adapter_config.json",
        copy: "decoder",
        json: true,
    },
    Target {
        name: "adapter_model",
        file: "decoder/adapter_model.safetensors",
        copy: "decoder",
        json: false,
    },
    Target {
        name: "lqa_decoder_json",
        file: "decoder/lqa_decoder.json",
        copy: "decoder",
        json: true,
    },
    Target {
        name: "lit_qa",
        file: "data/qa.json",
        copy: "data",
        json: true,
    },
    Target {
        name: "lit_control",
        file: "data/control.json",
        copy: "data",
        json: true,
    },
    Target {
        name: "lit_stimulus",
        file: "data/stimulus.json",
        copy: "data",
        json: true,
    },
    Target {
        name: "label_split",
        file: "run/split.json",
        copy: "run/split.json",
        json: true,
    },
    Target {
        name: "control",
        file: "control.json",
        copy: "control.json",
        json: true,
    },
    Target {
        name: "instructions",
        file: "instructions.json",
        copy: "instructions.json",
        json: true,
    },
    Target {
        name: "eval_prompts",
        file: "eval_prompts.json",
        copy: "eval_prompts.json",
        json: true,
    },
    Target {
        name: "state_json",
        file: "run/checkpoint/state.json",
        copy: "run",
        json: true,
    },
    Target {
        name: "optimizer_state",
        file: "run/checkpoint/optimizer.safetensors",
        copy: "run",
        json: false,
    },
    Target {
        name: "control_state",
        file: "control-run/checkpoint/state.json",
        copy: "control-run",
        json: true,
    },
    Target {
        name: "control_optimizer",
        file: "control-run/checkpoint/optimizer.safetensors",
        copy: "control-run",
        json: false,
    },
    Target {
        name: "checkpoint_adapter",
        file: "run/checkpoint/adapter/adapter_model.safetensors",
        copy: "run",
        json: false,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The fixture model (`fixtures/model`), loaded once per fixtures folder.
fn fixture_model(fixtures: &Path) -> Result<Arc<LanguageModel>> {
    type Cache = Mutex<BTreeMap<PathBuf, Arc<LanguageModel>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(m) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(fixtures)
    {
        return Ok(m.clone());
    }
    let dir = fixtures.join("model");
    let m = Arc::new(LanguageModel::load(
        dir.to_str()
            .ok_or_else(|| Error::invalid("fixture path is not UTF-8"))?,
        &LoadOptions::default(),
    )?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fixtures.to_path_buf(), m.clone());
    Ok(m)
}

/// The fixture decoder (`fixtures/decoder` on the fixture model), loaded once.
fn fixture_decoder(fixtures: &Path) -> Result<Arc<crate::latentqa::decoder::Decoder>> {
    type Cache = Mutex<BTreeMap<PathBuf, Arc<crate::latentqa::decoder::Decoder>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(d) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(fixtures)
    {
        return Ok(d.clone());
    }
    let d = Arc::new(crate::latentqa::decoder::Decoder::load(
        fixture_model(fixtures)?,
        Some(&fixtures.join("decoder")),
    )?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(fixtures.to_path_buf(), d.clone());
    Ok(d)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        std::fs::copy(from, to).map_err(|e| Error::io(from, e))?;
    }
    Ok(())
}

/// Exercise a loaded model a little: a forward on a short prompt and a chat prompt.
fn use_model(lm: &LanguageModel) -> Result<()> {
    let _ = lm.logits("hi there")?;
    if let Ok(t) = lm.template() {
        let _ = t.render(&[crate::chat::Message::new("user", "hello")], true)?;
    }
    Ok(())
}

/// Run `target`'s loader on `data` as its file, in `scratch` (emptied first); the fixture files
/// it needs besides come from `fixtures`. `Ok` and `Err` are both fine outcomes: what must
/// never happen is a panic, a hang or an unbounded allocation.
pub fn run_case(fixtures: &Path, scratch: &Path, target: &Target, data: &[u8]) -> Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
    copy_tree(&fixtures.join(target.copy), &scratch.join(target.copy))?;
    let file = scratch.join(target.file);
    std::fs::write(&file, data).map_err(|e| Error::io(&file, e))?;
    let path_str = |p: &Path| p.to_string_lossy().into_owned();
    match target.name {
        "gguf" | "gguf_default" => {
            let lm = LanguageModel::from_source(
                "fuzz",
                &ModelSource::Gguf(file.clone()),
                &LoadOptions::default(),
            )?;
            use_model(&lm)
        }
        "safetensors" | "config_json" | "tokenizer_json" | "tokenizer_config_json" => {
            let lm =
                LanguageModel::load(&path_str(&scratch.join("model")), &LoadOptions::default())?;
            use_model(&lm)
        }
        "load_tensors" => {
            for t in crate::budget::safetensors_header(&file)? {
                crate::budget::check_declared("load_tensors", &file, &t)?;
            }
            candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
                .map_err(|e| Error::bad_file(&file, e))?;
            Ok(())
        }
        "adapter_config" | "adapter_model" | "lqa_decoder_json" => {
            let target = fixture_model(fixtures)?;
            let d =
                crate::latentqa::decoder::Decoder::load(target, Some(&scratch.join("decoder")))?;
            drop(d);
            Ok(())
        }
        "lit_qa" | "lit_control" | "lit_stimulus" => {
            let data = crate::lit::data::LitData::load_dir(
                &scratch.join("data"),
                &crate::lit::data::DataOptions::default(),
            )?;
            if !data.qa.is_empty() {
                let _ = data.split_labels(0.34, 1);
            }
            Ok(())
        }
        "label_split" => crate::lit::data::LabelSplit::load(&file).map(drop),
        "control" => crate::control::data::Control::load(&file).map(drop),
        "instructions" => crate::control::data::load_instructions(&file).map(drop),
        "eval_prompts" => crate::control::data::load_prompts(&file).map(drop),
        "state_json" | "optimizer_state" | "checkpoint_adapter" => {
            let cfg_path = fixtures.join("run/config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let mut cfg: crate::lit::trainer::TrainConfig =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e))?;
            cfg.out_dir = scratch.join("run");
            cfg.data_dir = fixtures.join("data");
            let target = fixture_model(fixtures)?;
            crate::lit::trainer::Trainer::open(target, cfg, true).map(drop)
        }
        "control_state" | "control_optimizer" => {
            let cfg_path = fixtures.join("control-run/config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: crate::control::ControlConfig =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e))?;
            let control = crate::control::data::Control::load(&fixtures.join("control.json"))?;
            let decoder = fixture_decoder(fixtures)?;
            crate::control::ControlOptimizer::resume(
                &decoder,
                control,
                cfg,
                &scratch.join("control-run"),
            )
            .map(drop)
        }
        other => Err(Error::invalid(format!("unknown fuzz target `{other}`"))),
    }
}

/// Integers that break size arithmetic.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    64,
    127,
    128,
    255,
    256,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    1 << 40,
    1 << 48,
];

/// Text that breaks parsers and the sizes they read.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "1e999",
    "-1e999",
    "99999999999999999999",
    "18446744073709551616",
    "4294967296",
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "[[[[[[[[",
    "{\"a\":",
    "\\u0000",
    "\\ud800",
    "NaN",
    ",",
    ":",
    "\"",
];

/// Deterministic mutations of seed files.
pub struct Mutator {
    rng: SplitMix64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: SplitMix64::new(seed),
        }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.rng.below(n as u64) as usize
        }
    }

    /// An offset into `len` bytes, half the time in the first eighth (headers live there).
    fn offset(&mut self, len: usize) -> usize {
        if self.rng.next_u64() & 1 == 0 {
            self.below(len.div_ceil(8).max(1).min(len.max(1)))
        } else {
            self.below(len.max(1))
        }
    }

    fn interesting(&mut self) -> u64 {
        let v = INTERESTING[self.below(INTERESTING.len())];
        match self.below(4) {
            0 => v.wrapping_add(1),
            1 => v.wrapping_sub(1),
            _ => v,
        }
    }

    /// One byte-level mutation of `data` in place; `other` is a second seed to splice from.
    fn mutate_bytes(&mut self, data: &mut Vec<u8>, other: &[u8]) {
        let len = data.len();
        match self.below(10) {
            0 if len > 0 => {
                let i = self.offset(len);
                data[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.offset(len);
                data[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'['][self.below(7)];
            }
            2 if len >= 8 => {
                // an interesting integer, little-endian, 4 or 8 bytes wide
                let v = self.interesting();
                let wide = self.rng.next_u64() & 1 == 0;
                let n = if wide { 8 } else { 4 };
                let i = self.offset(len - n + 1);
                data[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            3 => {
                let at = self.below(len + 1);
                data.truncate(at);
            }
            4 => {
                let n = 1 + self.below(64);
                for _ in 0..n {
                    data.push(self.rng.next_u64() as u8);
                }
            }
            5 if len > 0 => {
                // delete a range
                let a = self.offset(len);
                let b = (a + 1 + self.below(256)).min(len);
                data.drain(a..b);
            }
            6 if len > 0 => {
                // duplicate a range in place
                let a = self.offset(len);
                let b = (a + 1 + self.below(256)).min(len);
                let chunk = data[a..b].to_vec();
                let at = self.below(len + 1);
                data.splice(at..at, chunk);
            }
            7 if !other.is_empty() => {
                // splice: our prefix, another seed's suffix
                let a = self.below(len + 1);
                let b = self.below(other.len());
                data.truncate(a);
                data.extend_from_slice(&other[b..]);
            }
            8 => {
                let t = TOKENS[self.below(TOKENS.len())].as_bytes().to_vec();
                let at = self.offset(len + 1).min(len);
                if self.rng.next_u64() & 1 == 0 || at + t.len() > len {
                    data.splice(at..at, t);
                } else {
                    data.splice(at..at + t.len(), t);
                }
            }
            _ if len > 0 => {
                let i = self.below(len);
                data[i] = self.rng.next_u64() as u8;
            }
            _ => data.push(0),
        }
    }

    /// A random value that breaks what reads JSON.
    fn bad_json(&mut self, old: &Value) -> Value {
        match self.below(14) {
            0 => Value::Null,
            1 => Value::from(-1),
            2 => Value::from(u64::MAX),
            3 => Value::from(i64::MIN),
            4 => serde_json::Number::from_f64(1e300).map_or(Value::Null, Value::Number),
            5 => Value::from(""),
            6 => Value::from("x".repeat(1 + self.below(300))),
            7 => Value::Array(vec![]),
            8 => Value::Object(Default::default()),
            9 => Value::from(0),
            10 => Value::Bool(self.rng.next_u64() & 1 == 0),
            11 => {
                // nest deeper
                let mut v = old.clone();
                for _ in 0..1 + self.below(40) {
                    v = Value::Array(vec![v]);
                }
                v
            }
            12 => Value::from(self.interesting()),
            _ => match old {
                Value::Array(a) if !a.is_empty() => a[self.below(a.len())].clone(),
                Value::Object(m) if !m.is_empty() => {
                    m.values().nth(self.below(m.len())).cloned().unwrap()
                }
                Value::String(s) => Value::from(format!("{s}{s}")),
                Value::Number(n) => Value::from(n.as_f64().unwrap_or(0.0) * -3.0),
                v => v.clone(),
            },
        }
    }

    /// Edit one node of a JSON document: replace, delete, duplicate or rename.
    fn mutate_json(&mut self, v: &mut Value) {
        let depth = self.below(6);
        self.edit_at(v, depth);
    }

    /// Walk `depth` levels down a random path (as far as there are children), then edit there.
    fn edit_at(&mut self, node: &mut Value, depth: usize) {
        if depth > 0 {
            match node {
                Value::Array(a) if !a.is_empty() => {
                    let i = self.below(a.len());
                    return self.edit_at(&mut a[i], depth - 1);
                }
                Value::Object(m) if !m.is_empty() => {
                    let i = self.below(m.len());
                    let k = m.keys().nth(i).cloned().expect("in range");
                    return self.edit_at(m.get_mut(&k).expect("present"), depth - 1);
                }
                _ => {}
            }
        }
        match (self.below(4), &mut *node) {
            (0, Value::Object(m)) if !m.is_empty() => {
                let k = m
                    .keys()
                    .nth(self.below(m.len()))
                    .cloned()
                    .expect("in range");
                m.remove(&k);
            }
            (1, Value::Object(m)) if !m.is_empty() => {
                let k = m
                    .keys()
                    .nth(self.below(m.len()))
                    .cloned()
                    .expect("in range");
                let val = m.remove(&k).expect("present");
                let new = ["", "x", "layers", "r", "step", "read", "write", "label"][self.below(8)];
                m.insert(new.to_string(), val);
            }
            (0, Value::Array(a)) if !a.is_empty() => {
                let i = self.below(a.len());
                a.remove(i);
            }
            (1, Value::Array(a)) if !a.is_empty() => {
                let i = self.below(a.len());
                let x = a[i].clone();
                a.push(x);
            }
            _ => {
                let old = node.clone();
                *node = self.bad_json(&old);
            }
        }
    }

    /// A mutated copy of `seed` (`json`: half the time edit the parsed document instead).
    pub fn mutate(&mut self, seed: &[u8], other: &[u8], json: bool) -> Vec<u8> {
        if json && self.rng.next_u64() & 1 == 0 {
            if let Ok(mut v) = serde_json::from_slice::<Value>(seed) {
                for _ in 0..1 + self.below(3) {
                    self.mutate_json(&mut v);
                }
                let mut out = serde_json::to_vec(&v).unwrap_or_default();
                if self.below(4) == 0 {
                    self.mutate_bytes(&mut out, other);
                }
                return out;
            }
        }
        let mut data = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            self.mutate_bytes(&mut data, other);
        }
        data
    }
}

/// How a [`drive`] run goes.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    pub seed: u64,
    /// Cases per target (the run of a target stops at whichever of this and `seconds` comes
    /// first).
    pub cases: usize,
    pub seconds: f64,
    /// A case that runs longer is a hang.
    pub timeout: Duration,
    /// Where to save inputs that panicked or hung.
    pub failures: Option<PathBuf>,
    /// Only these targets (all when empty).
    pub only: Vec<String>,
}

/// What happened to one target's cases.
#[derive(Debug, Clone, Default)]
pub struct TargetReport {
    pub cases: usize,
    /// Loaded without error.
    pub accepted: usize,
    pub errors: usize,
    /// `(case, message)` of each panic.
    pub panics: Vec<(usize, String)>,
    pub hangs: Vec<usize>,
    pub slowest: Duration,
    pub seconds: f64,
}

type Job = (Vec<u8>, &'static Target);
type Outcome = std::result::Result<Result<()>, String>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Outcome>,
}

fn spawn_worker(fixtures: PathBuf, scratch: PathBuf) -> Worker {
    let (jobs, job_rx) = mpsc::channel::<Job>();
    let (res_tx, results) = mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        .stack_size(64 << 20)
        .spawn(move || {
            while let Ok((data, target)) = job_rx.recv() {
                let out = catch_unwind(AssertUnwindSafe(|| {
                    run_case(&fixtures, &scratch, target, &data)
                }))
                .map_err(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".to_string())
                });
                if res_tx.send(out).is_err() {
                    break;
                }
            }
        })
        .expect("spawn a fuzz worker");
    Worker { jobs, results }
}

/// Run mutated cases of each target from the fixtures, each with a time bound; a panic or a
/// hang is counted (and its input saved), never propagated.
pub fn drive(
    fixtures: &Path,
    scratch: &Path,
    opts: &DriveOptions,
) -> BTreeMap<&'static str, TargetReport> {
    let mut reports = BTreeMap::new();
    let mut generation = 0;
    let new_worker = |g: &mut usize| {
        *g += 1;
        spawn_worker(fixtures.to_path_buf(), scratch.join(format!("w{g}")))
    };
    let mut worker = new_worker(&mut generation);
    for (ti, target) in TARGETS.iter().enumerate() {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == target.name) {
            continue;
        }
        let seed_bytes = match std::fs::read(fixtures.join(target.file)) {
            Ok(b) => b,
            Err(_) => continue,
        };
        // splice partners: the seeds of the other targets of the same kind
        let others: Vec<Vec<u8>> = TARGETS
            .iter()
            .filter(|t| t.json == target.json && t.name != target.name)
            .filter_map(|t| std::fs::read(fixtures.join(t.file)).ok())
            .collect();
        let mut m = Mutator::new(opts.seed ^ (ti as u64).wrapping_mul(0x9E37_79B9));
        let mut rep = TargetReport::default();
        let start = Instant::now();
        // case 0 is the seed itself: it must load
        for case in 0..opts.cases {
            if case > 0 && start.elapsed().as_secs_f64() > opts.seconds {
                break;
            }
            let data = if case == 0 {
                seed_bytes.clone()
            } else {
                let other: &[u8] = if others.is_empty() {
                    &[]
                } else {
                    &others[m.below(others.len())]
                };
                m.mutate(&seed_bytes, other, target.json)
            };
            if let Some(dir) = &opts.failures {
                // the case in flight: what to look at if the process dies with it (an abort
                // is not a panic and cannot be caught)
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::write(dir.join("in-flight"), &data);
                let _ = std::fs::write(dir.join("in-flight.target"), target.name);
            }
            let t0 = Instant::now();
            if worker.jobs.send((data.clone(), target)).is_err() {
                worker = new_worker(&mut generation);
                continue;
            }
            let save = |what: &str| {
                if let Some(dir) = &opts.failures {
                    let _ = std::fs::create_dir_all(dir);
                    let _ =
                        std::fs::write(dir.join(format!("{}-{what}-{case}", target.name)), &data);
                }
            };
            match worker.results.recv_timeout(opts.timeout) {
                Ok(Ok(Ok(()))) => rep.accepted += 1,
                Ok(Ok(Err(_))) => rep.errors += 1,
                Ok(Err(msg)) => {
                    save("panic");
                    rep.panics.push((case, msg));
                }
                Err(_) => {
                    save("hang");
                    rep.hangs.push(case);
                    // leave the stuck worker behind
                    worker = new_worker(&mut generation);
                }
            }
            rep.cases += 1;
            rep.slowest = rep.slowest.max(t0.elapsed());
        }
        rep.seconds = start.elapsed().as_secs_f64();
        reports.insert(target.name, rep);
    }
    reports
}

/// The report as a table: target, cases, accepted, errors, panics, hangs, slowest case.
pub fn format_reports(reports: &BTreeMap<&'static str, TargetReport>) -> String {
    let mut out = format!(
        "{:<22} {:>8} {:>8} {:>8} {:>6} {:>5} {:>9} {:>8}\n",
        "loader", "cases", "accepted", "errors", "panics", "hangs", "slowest", "seconds"
    );
    for (name, r) in reports {
        out += &format!(
            "{:<22} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7}ms {:>8.1}\n",
            name,
            r.cases,
            r.accepted,
            r.errors,
            r.panics.len(),
            r.hangs.len(),
            r.slowest.as_millis(),
            r.seconds
        );
        for (case, msg) in r.panics.iter().take(5) {
            out += &format!("    panic in case {case}: {msg}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_repeatable_and_varied() {
        let seed = br#"{"a": [1, 2, {"b": "c"}], "d": 4}"#;
        let run = |s| {
            let mut m = Mutator::new(s);
            (0..200)
                .map(|_| m.mutate(seed, b"xyz", true))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let cases = run(7);
        let distinct: std::collections::BTreeSet<_> = cases.iter().collect();
        assert!(distinct.len() > 150, "{}", distinct.len());
        assert!(cases.iter().any(|c| c.len() < seed.len()));
        assert!(cases.iter().any(|c| c.len() > seed.len()));
        // byte mutations of an empty seed do not panic either
        let mut m = Mutator::new(1);
        for _ in 0..100 {
            m.mutate(b"", b"", false);
        }
    }
}
