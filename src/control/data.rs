//! What control trains on: a *control* (QA pairs that describe the desired behaviour, in the
//! paper's controls format) and an *instruction set* (prompts with reference responses; the
//! paper samples dolly-15k or alpaca, lqa ships `data/instructions.json`).
//!
//! Each sample pairs a read dialog with one QA pair of the control: for every instruction and
//! every pair, the prompt alone (generation prompt added) and the prompt with its reference
//! response, shuffled with the seed and cut to `samples` (the paper's `get_dataset`).

use crate::chat::Message;
use crate::latentqa::{ReadDialog, VerbMask};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A control: the prompt it was made from, and the QA pairs the decoder should answer about
/// the steered model.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    pub prompt: String,
    pub qa: Vec<(String, String)>,
    pub file: PathBuf,
}

/// One instruction with its reference response.
#[derive(Clone, Debug, PartialEq)]
pub struct Instruction {
    pub instruction: String,
    pub response: String,
}

/// One training sample: what the target reads, and which QA pair of the control is asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlSample {
    pub read: ReadDialog,
    pub qa: usize,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(Error::bad_file(path, "the file is empty"));
    }
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

impl Control {
    /// A controls file: `{PROMPT: [[question, answer], ...]}` (the first prompt is used).
    pub fn load(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let obj = v.as_object().ok_or_else(|| {
            Error::bad_file(
                path,
                "expected an object {prompt: [[question, answer], ...]}",
            )
        })?;
        let (prompt, pairs) = obj
            .iter()
            .next()
            .ok_or_else(|| Error::bad_file(path, "the controls file has no prompt"))?;
        let pairs = pairs.as_array().ok_or_else(|| {
            Error::bad_file(path, "the prompt's value must be [[question, answer], ...]")
        })?;
        let qa = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| match p.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(a)]) if !q.is_empty() && !a.is_empty() => {
                    Ok((q.clone(), a.clone()))
                }
                _ => Err(Error::bad_file(
                    path,
                    format!("pair {i} is not [question, answer] with two non-empty strings"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        if qa.is_empty() {
            return Err(Error::bad_file(path, "the control has no QA pairs"));
        }
        Ok(Control {
            prompt: prompt.clone(),
            qa,
            file: path.to_path_buf(),
        })
    }
}

/// The first of `keys` that an item has as a string.
fn field<'a>(item: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| item.get(*k).and_then(Value::as_str))
}

/// Load an instruction set: a JSON array or JSONL of objects with `instruction` (or `prompt`)
/// and `response` (or `output`); a non-empty `context` (dolly) is appended to the instruction
/// as the paper does. Errors name the file and the item.
pub fn load_instructions(path: &Path) -> Result<Vec<Instruction>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(Error::bad_file(path, "the file is empty"));
    }
    let items: Vec<(String, Value)> = if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        v.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, x)| (format!("item {i}"), x))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                serde_json::from_str(l)
                    .map(|x| (format!("line {}", n + 1), x))
                    .map_err(|e| {
                        Error::bad_file(path, format!("line {}: invalid JSON: {e}", n + 1))
                    })
            })
            .collect::<Result<_>>()?
    };
    let out = items
        .iter()
        .map(|(at, item)| {
            let ins = field(item, &["instruction", "prompt"]).ok_or_else(|| {
                Error::bad_file(path, format!("{at}: no `instruction` (or `prompt`) string"))
            })?;
            let resp = field(item, &["response", "output"]).ok_or_else(|| {
                Error::bad_file(path, format!("{at}: no `response` (or `output`) string"))
            })?;
            if ins.trim().is_empty() || resp.trim().is_empty() {
                return Err(Error::bad_file(
                    path,
                    format!("{at}: an empty instruction or response"),
                ));
            }
            let instruction = match field(item, &["context", "input"]) {
                Some(c) if !c.trim().is_empty() => format!("{ins}\n\n{c}"),
                _ => ins.to_string(),
            };
            Ok(Instruction {
                instruction,
                response: resp.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        return Err(Error::bad_file(path, "no instructions"));
    }
    Ok(out)
}

/// Evaluation prompts: a JSON array of strings (or of objects with `instruction`/`prompt`).
pub fn load_prompts(path: &Path) -> Result<Vec<String>> {
    let v = read_json(path)?;
    let arr = v
        .as_array()
        .ok_or_else(|| Error::bad_file(path, "expected a JSON array of prompts"))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            _ => field(x, &["instruction", "prompt"])
                .map(str::to_string)
                .ok_or_else(|| Error::bad_file(path, format!("item {i} is not a prompt string"))),
        })
        .collect()
}

/// The read dialogs of one instruction: the prompt alone (generation prompt added), and the
/// prompt with its reference response. Everything is patched (no verb mask).
pub fn read_dialogs(ins: &Instruction) -> [ReadDialog; 2] {
    let user = Message::new("user", ins.instruction.as_str());
    [
        ReadDialog {
            messages: vec![user.clone()],
            add_generation_prompt: true,
            mask: VerbMask::None,
        },
        ReadDialog {
            messages: vec![user, Message::new("assistant", ins.response.as_str())],
            add_generation_prompt: false,
            mask: VerbMask::None,
        },
    ]
}

/// Every (read dialog, QA pair) combination, shuffled with `seed` and cut to `samples`.
pub fn samples(
    instructions: &[Instruction],
    n_qa: usize,
    samples: usize,
    seed: u64,
) -> Vec<ControlSample> {
    let mut all = Vec::with_capacity(instructions.len() * n_qa * 2);
    for ins in instructions {
        for qa in 0..n_qa {
            for read in read_dialogs(ins) {
                all.push(ControlSample { read, qa });
            }
        }
    }
    let mut rng = SplitMix64::new(seed);
    for i in (1..all.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        all.swap(i, j);
    }
    all.truncate(samples);
    all
}
