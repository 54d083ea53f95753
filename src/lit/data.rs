//! The LatentQA training data: read dialogs, the QA pairs about them, label splits, and
//! length-bucketed batches.
//!
//! A data folder (the paper's release, e.g. `../shared/latentqa-data`) holds up to four item
//! files and one QA file:
//!
//! | file | fields | read dialog | generation prompt | mask |
//! |---|---|---|---|---|
//! | `control.json` | `control_user` | user | yes | `User` |
//! | `stimulus.json` | `control_user`, `control_model`, `stimulus_user` | user, assistant, user | yes | `User` |
//! | `system.json` | `system`, `stimulus_user` | system, user | yes | `System` |
//! | `stimulus_completion.json` | as stimulus, plus `stimulus_completion` (or `stimulus_model`) | user, assistant, user, assistant | no | `User` |
//! | `qa.json` | `{label: [[question, answer], ...]}` | | | |
//!
//! Every item carries a `label` (its behaviour). An item of `stimulus.json` that has a completion
//! field is of the fourth kind too, as in the paper's code (`lit/utils/dataset_utils.py`).
//! `control_thought` is allowed (the paper's data has it) but not used. Other fields are ignored.
//!
//! Each item is paired with every QA pair of its label (the paper's join): one [`Example`] each.
//!
//! Errors are one line and name the file and the item (`…/stimulus.json: item 12: missing field
//! "stimulus_user"`); items are numbered from 0, as in the JSON array.
//!
//! Randomness (label splits, batch order) comes from [`SplitMix64`] ([`crate::rng`]), a fixed
//! algorithm, so that a seed gives the same split and the same batches whatever the version of any
//! dependency: a saved position in training can be resumed exactly.

use crate::chat::Message;
use crate::latentqa::{ReadDialog, VerbMask};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The shape of an item's read dialog (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// `[user: control_user]`, generation prompt added.
    Control,
    /// `[user: control_user, assistant: control_model, user: stimulus_user]`, generation prompt
    /// added; the control turn and its reply are masked.
    Stimulus,
    /// `[system: system, user: stimulus_user]`, generation prompt added; the system prompt is
    /// masked.
    System,
    /// The stimulus dialog plus the model's own completion as a final assistant turn, no
    /// generation prompt.
    StimulusCompletion,
    /// A window of text as one user turn, every position patched: context prediction (see
    /// [`crate::lit::mixture`]). Not a file of a data folder.
    Context,
    /// A labelled sentence as one user turn, every position patched: yes/no classification
    /// (see [`crate::lit::mixture`]). Not a file of a data folder.
    Classification,
}

impl ItemKind {
    /// Every kind of a LatentQA data folder, in the order files are read.
    pub const ALL: [ItemKind; 4] = [
        ItemKind::Control,
        ItemKind::Stimulus,
        ItemKind::System,
        ItemKind::StimulusCompletion,
    ];

    /// The kind's name, as serialised (`system`, `stimulus_completion`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Control => "control",
            ItemKind::Stimulus => "stimulus",
            ItemKind::System => "system",
            ItemKind::StimulusCompletion => "stimulus_completion",
            ItemKind::Context => "context",
            ItemKind::Classification => "classification",
        }
    }

    /// The file of a data folder that holds items of this kind.
    pub fn file_name(self) -> &'static str {
        match self {
            ItemKind::Control => "control.json",
            ItemKind::Stimulus => "stimulus.json",
            ItemKind::System => "system.json",
            ItemKind::StimulusCompletion => "stimulus_completion.json",
            // the mixture's kinds are built from the files of its config
            ItemKind::Context => "instructions.json",
            ItemKind::Classification => "classification.json",
        }
    }
}

/// One item of a data file, with its read dialog built.
#[derive(Clone, Debug, PartialEq)]
pub struct DataItem {
    pub kind: ItemKind,
    /// The behaviour label (a key of `qa.json`).
    pub label: String,
    pub read: ReadDialog,
    /// The file the item came from.
    pub file: PathBuf,
    /// The item's index in that file's array (from 0).
    pub index: usize,
}

/// One training example: an item and one QA pair of its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub item: Arc<DataItem>,
    pub question: String,
    pub answer: String,
}

/// What [`LitData::load_dir`] reads.
#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// The files to read, by the kind they hold ([`ItemKind::file_name`]). Each file is optional;
    /// at least one of them must be in the folder. Default: all of [`ItemKind::ALL`] (the shared
    /// data has the first three).
    pub kinds: Vec<ItemKind>,
    /// Keep at most this many items of each file (the first ones, after `exclude_groups`). Only
    /// the items kept are validated.
    pub limit: Option<usize>,
    /// Skip items whose label's first `-`-separated word is one of these (the paper's `filter`,
    /// e.g. `persona` or `sqa`).
    pub exclude_groups: Vec<String>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            kinds: ItemKind::ALL.to_vec(),
            limit: None,
            exclude_groups: Vec::new(),
        }
    }
}

/// A split of behaviour labels into train and eval; save it to reuse the same split later.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSplit {
    pub train: BTreeSet<String>,
    pub eval: BTreeSet<String>,
}

impl LabelSplit {
    /// Write the split as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::bad_file(path, format!("cannot serialise the split: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }

    /// Read a split written by [`LabelSplit::save`]. A label in both sets is an error.
    pub fn load(path: &Path) -> Result<LabelSplit> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let split: LabelSplit = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid label split: {e}")))?;
        if let Some(label) = split.train.intersection(&split.eval).next() {
            return Err(Error::bad_file(
                path,
                format!("label {label:?} is in both train and eval"),
            ));
        }
        Ok(split)
    }
}

/// The loaded data: items, the QA pairs of every label, and their join.
#[derive(Clone, Debug)]
pub struct LitData {
    /// Items in file order (control, stimulus, system, stimulus completion), each file in order.
    pub items: Vec<Arc<DataItem>>,
    /// Every label of `qa.json` and its `(question, answer)` pairs.
    pub qa: BTreeMap<String, Vec<(String, String)>>,
    /// Every item with every QA pair of its label, item by item.
    pub examples: Vec<Example>,
}

impl LitData {
    /// Load a data folder (see the module docs). `qa.json` and at least one of the files of
    /// `opts.kinds` are required.
    pub fn load_dir(dir: &Path, opts: &DataOptions) -> Result<LitData> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::bad_file(dir, "not a directory"));
        }
        let qa_path = dir.join("qa.json");
        if !qa_path.is_file() {
            return Err(Error::bad_file(
                dir,
                "no qa.json: a data folder needs qa.json and at least one data file",
            ));
        }
        let mut kinds: Vec<ItemKind> = Vec::new();
        for &k in &opts.kinds {
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        kinds.sort();
        let files: Vec<(ItemKind, PathBuf)> = kinds
            .iter()
            .map(|&k| (k, dir.join(k.file_name())))
            .filter(|(_, p)| p.is_file())
            .collect();
        if files.is_empty() {
            let names: Vec<&str> = kinds.iter().map(|k| k.file_name()).collect();
            return Err(Error::bad_file(
                dir,
                format!(
                    "no data file: expected at least one of {}",
                    names.join(", ")
                ),
            ));
        }

        let qa = parse_qa(&qa_path, read_json(&qa_path)?)?;
        let mut items = Vec::new();
        for (kind, path) in &files {
            load_items(*kind, path, &qa, opts, &mut items)?;
        }
        let examples = join(&items, &qa);
        Ok(LitData {
            items,
            qa,
            examples,
        })
    }

    /// The labels that items carry (not every label of `qa.json`).
    pub fn labels(&self) -> BTreeSet<String> {
        self.items.iter().map(|i| i.label.clone()).collect()
    }

    /// Hold out a seeded random subset of the items' labels for eval: `eval_fraction` of them,
    /// rounded, but at least one and at most all but one when there are two labels or more and
    /// the fraction is strictly between 0 and 1. Deterministic for a seed.
    ///
    /// An error naming `eval_fraction` unless `0 <= eval_fraction <= 1`.
    pub fn split_labels(&self, eval_fraction: f64, seed: u64) -> Result<LabelSplit> {
        if !(0.0..=1.0).contains(&eval_fraction) {
            return Err(Error::invalid(format!(
                "eval_fraction must be a number in [0, 1], got {eval_fraction}"
            )));
        }
        let mut labels: Vec<String> = self.labels().into_iter().collect();
        let n = labels.len();
        let mut k = (eval_fraction * n as f64).round() as usize;
        if n >= 2 && eval_fraction > 0.0 && eval_fraction < 1.0 {
            k = k.clamp(1, n - 1);
        }
        SplitMix64::derive(seed, STREAM_SPLIT).shuffle(&mut labels);
        let train = labels.split_off(k.min(n));
        Ok(LabelSplit {
            train: train.into_iter().collect(),
            eval: labels.into_iter().collect(),
        })
    }

    /// `(train, eval)` examples: every example of an eval label (see
    /// [`LitData::split_labels`]) goes to eval, the rest to train; both in data order.
    pub fn split_by_label(
        &self,
        eval_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<Example>, Vec<Example>)> {
        Ok(self.split_with(&self.split_labels(eval_fraction, seed)?))
    }

    /// `(train, eval)` examples for a given (e.g. saved) split: examples whose label is in
    /// `split.eval` go to eval, all others to train.
    pub fn split_with(&self, split: &LabelSplit) -> (Vec<Example>, Vec<Example>) {
        self.examples
            .iter()
            .cloned()
            .partition(|e| !split.eval.contains(&e.item.label))
    }
}

/// Random streams derived from a seed, one per use, so that uses never share numbers.
const STREAM_SPLIT: u64 = 1;
const STREAM_EPOCH: u64 = 1 << 32;

fn join(items: &[Arc<DataItem>], qa: &BTreeMap<String, Vec<(String, String)>>) -> Vec<Example> {
    let mut out = Vec::new();
    for item in items {
        for (q, a) in &qa[&item.label] {
            out.push(Example {
                item: item.clone(),
                question: q.clone(),
                answer: a.clone(),
            });
        }
    }
    out
}

/// A JSON value's type, for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(Error::bad_file(path, "empty file"));
    }
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

fn parse_qa(path: &Path, v: Value) -> Result<BTreeMap<String, Vec<(String, String)>>> {
    let Value::Object(map) = v else {
        return Err(Error::bad_file(
            path,
            format!(
                "expected an object {{label: [[question, answer], ...]}}, found {}",
                type_name(&v)
            ),
        ));
    };
    if map.is_empty() {
        return Err(Error::bad_file(path, "empty object (no labels)"));
    }
    let mut out = BTreeMap::new();
    for (label, pairs) in map {
        let err = |msg: String| Error::bad_file(path, format!("label {label:?}: {msg}"));
        let Value::Array(pairs) = pairs else {
            return Err(err(format!(
                "expected an array of [question, answer] pairs, found {}",
                type_name(&pairs)
            )));
        };
        let mut list = Vec::with_capacity(pairs.len());
        for (i, pair) in pairs.iter().enumerate() {
            let found = match pair {
                Value::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
                    (Value::String(q), Value::String(a)) => Ok((q.clone(), a.clone())),
                    (Value::String(_), bad) | (bad, _) => {
                        Err(format!("an array holding {}", type_name(bad)))
                    }
                },
                Value::Array(a) => Err(format!("an array of {} elements", a.len())),
                other => Err(type_name(other).to_string()),
            };
            let (q, a) = found.map_err(|found| {
                err(format!(
                    "entry {i}: expected [question, answer], found {found}"
                ))
            })?;
            for (what, s) in [("question", &q), ("answer", &a)] {
                if s.trim().is_empty() {
                    return Err(err(format!("entry {i}: the {what} is empty")));
                }
            }
            list.push((q, a));
        }
        out.insert(label, list);
    }
    Ok(out)
}

/// Field access on one item, with errors naming the file and the item.
struct Fields<'a> {
    path: &'a Path,
    index: usize,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::bad_file(self.path, format!("item {}: {msg}", self.index))
    }

    /// A field that, if present, must be a string (maybe empty).
    fn optional(&self, name: &str) -> Result<Option<&str>> {
        match self.obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!(
                "field {name:?} must be a string, found {}",
                type_name(v)
            ))),
        }
    }

    /// A present, non-empty string.
    fn required(&self, name: &str) -> Result<String> {
        match self.optional(name)? {
            None => Err(self.err(format!("missing field {name:?}"))),
            Some(s) => self.non_empty(name, s),
        }
    }

    fn non_empty(&self, name: &str, s: &str) -> Result<String> {
        if s.trim().is_empty() {
            Err(self.err(format!("field {name:?} is empty")))
        } else {
            Ok(s.to_string())
        }
    }

    /// The model's completion of the stimulus, under either name the paper's data uses.
    fn completion(&self) -> Result<Option<String>> {
        let a = self.optional("stimulus_completion")?;
        let b = self.optional("stimulus_model")?;
        match (a, b) {
            (Some(_), Some(_)) => {
                Err(self.err("has both \"stimulus_completion\" and \"stimulus_model\": give one"))
            }
            (Some(s), None) => self.non_empty("stimulus_completion", s).map(Some),
            (None, Some(s)) => self.non_empty("stimulus_model", s).map(Some),
            (None, None) => Ok(None),
        }
    }
}

fn load_items(
    file_kind: ItemKind,
    path: &Path,
    qa: &BTreeMap<String, Vec<(String, String)>>,
    opts: &DataOptions,
    out: &mut Vec<Arc<DataItem>>,
) -> Result<()> {
    let v = read_json(path)?;
    let Value::Array(array) = v else {
        return Err(Error::bad_file(
            path,
            format!("expected an array of items, found {}", type_name(&v)),
        ));
    };
    if array.is_empty() {
        return Err(Error::bad_file(path, "empty array (no items)"));
    }
    let limit = opts.limit.unwrap_or(usize::MAX);
    let mut kept = 0;
    for (index, value) in array.iter().enumerate() {
        if kept >= limit {
            break;
        }
        let Value::Object(obj) = value else {
            return Err(Error::bad_file(
                path,
                format!(
                    "item {index}: expected an object, found {}",
                    type_name(value)
                ),
            ));
        };
        let f = Fields { path, index, obj };
        let label = f.required("label")?;
        let group = label.split('-').next().unwrap_or("");
        if opts.exclude_groups.iter().any(|g| g == group) {
            continue;
        }
        let (kind, read) = read_dialog(file_kind, &f)?;
        if qa.get(&label).is_none_or(|pairs| pairs.is_empty()) {
            return Err(f.err(format!("label {label:?} has no QA pairs in qa.json")));
        }
        out.push(Arc::new(DataItem {
            kind,
            label,
            read,
            file: path.to_path_buf(),
            index,
        }));
        kept += 1;
    }
    Ok(())
}

/// The item's kind and read dialog, from the file it is in and its fields.
fn read_dialog(file_kind: ItemKind, f: &Fields) -> Result<(ItemKind, ReadDialog)> {
    let dialog = |messages: Vec<Message>, add_generation_prompt, mask| ReadDialog {
        messages,
        add_generation_prompt,
        mask,
    };
    let no_completion = |f: &Fields| -> Result<()> {
        for name in ["stimulus_completion", "stimulus_model"] {
            if f.obj.contains_key(name) {
                return Err(f.err(format!(
                    "field {name:?} is only allowed in stimulus.json and stimulus_completion.json"
                )));
            }
        }
        Ok(())
    };
    match file_kind {
        ItemKind::Control => {
            no_completion(f)?;
            let user = f.required("control_user")?;
            Ok((
                ItemKind::Control,
                dialog(vec![Message::new("user", user)], true, VerbMask::User),
            ))
        }
        ItemKind::System => {
            no_completion(f)?;
            let system = f.required("system")?;
            let user = f.required("stimulus_user")?;
            Ok((
                ItemKind::System,
                dialog(
                    vec![Message::new("system", system), Message::new("user", user)],
                    true,
                    VerbMask::System,
                ),
            ))
        }
        ItemKind::Stimulus | ItemKind::StimulusCompletion => {
            let control_user = f.required("control_user")?;
            f.optional("control_thought")?;
            let control_model = f.required("control_model")?;
            let stimulus_user = f.required("stimulus_user")?;
            let completion = f.completion()?;
            if file_kind == ItemKind::StimulusCompletion && completion.is_none() {
                return Err(f.err("missing field \"stimulus_completion\" (or \"stimulus_model\")"));
            }
            let mut messages = vec![
                Message::new("user", control_user),
                Message::new("assistant", control_model),
                Message::new("user", stimulus_user),
            ];
            Ok(match completion {
                None => (ItemKind::Stimulus, dialog(messages, true, VerbMask::User)),
                Some(c) => {
                    messages.push(Message::new("assistant", c));
                    (
                        ItemKind::StimulusCompletion,
                        dialog(messages, false, VerbMask::User),
                    )
                }
            })
        }
        ItemKind::Context | ItemKind::Classification => Err(f.err(format!(
            "{} items are built by the training mixture, not read from a data folder",
            file_kind.file_name()
        ))),
    }
}

/// A position in training: the next batch is batch `batch` of epoch `epoch`. A position fully
/// determines what a [`Batcher`] produces next.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub epoch: u64,
    pub batch: usize,
}

/// Length-bucketed batches of example indices.
///
/// Each epoch: shuffle all indices (seeded by `(seed, epoch)`), cut them into chunks of
/// `batch_size * chunk_batches`, sort each chunk by length (stable, so ties keep the shuffled
/// order), cut each chunk into batches, and shuffle the order of all batches. Only the last
/// batch of an epoch can be short (dropped with [`Batcher::with_drop_last`]). Examples of similar
/// length share a batch, so little of a batch is padding, while batches still differ from epoch
/// to epoch.
#[derive(Clone, Debug)]
pub struct Batcher {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    chunk_batches: usize,
    drop_last: bool,
}

impl Batcher {
    /// Batches per sorted chunk unless set with [`Batcher::with_chunk_batches`].
    pub const DEFAULT_CHUNK_BATCHES: usize = 50;

    /// A batcher over examples `0..lengths.len()` with these lengths (e.g. the token count of the
    /// read prompt plus the decoder prompt).
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Result<Batcher> {
        if batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        Ok(Batcher {
            lengths,
            batch_size,
            seed,
            chunk_batches: Self::DEFAULT_CHUNK_BATCHES,
            drop_last: false,
        })
    }

    /// [`Batcher::new`] with the length of example `i` given by `length(i)`, for `i in 0..n`.
    pub fn from_fn(
        n: usize,
        batch_size: usize,
        seed: u64,
        length: impl FnMut(usize) -> usize,
    ) -> Result<Batcher> {
        Self::new((0..n).map(length).collect(), batch_size, seed)
    }

    /// Sort within chunks of this many batches (at least 1; `usize::MAX` sorts the whole epoch,
    /// as the paper's sampler does).
    pub fn with_chunk_batches(mut self, chunk_batches: usize) -> Batcher {
        self.chunk_batches = chunk_batches.max(1);
        self
    }

    /// Drop the short last batch of each epoch.
    pub fn with_drop_last(mut self, drop_last: bool) -> Batcher {
        self.drop_last = drop_last;
        self
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Batches in every epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.lengths.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The batches of one epoch, in training order. Deterministic for `(seed, epoch)`.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = SplitMix64::derive(self.seed, STREAM_EPOCH.wrapping_add(epoch));
        let mut ids: Vec<usize> = (0..self.lengths.len()).collect();
        rng.shuffle(&mut ids);
        let chunk = self.batch_size.saturating_mul(self.chunk_batches);
        let mut batches: Vec<Vec<usize>> = Vec::with_capacity(self.batches_per_epoch() + 1);
        for c in ids.chunks_mut(chunk) {
            c.sort_by_key(|&i| self.lengths[i]);
            batches.extend(c.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        // Only the last chunk can end in a short batch: chunks are whole batches.
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        rng.shuffle(&mut batches);
        batches
    }

    /// The batch at a position (a `batch` past the end of its epoch counts on into the next
    /// epochs); `None` if an epoch has no batches.
    pub fn batch_at(&self, pos: Position) -> Option<Vec<usize>> {
        let pos = self.normalize(pos)?;
        Some(self.epoch(pos.epoch).swap_remove(pos.batch))
    }

    /// Every batch from `start` on, each with its position, across epochs without end (none if
    /// an epoch has no batches). To resume after a batch at `p`, start at
    /// `Position { epoch: p.epoch, batch: p.batch + 1 }`.
    pub fn iter_from(&self, start: Position) -> BatchIter<'_> {
        BatchIter {
            batcher: self,
            next: self.normalize(start),
            current: None,
        }
    }

    /// Carry a batch index past the end of an epoch into the following epochs.
    fn normalize(&self, pos: Position) -> Option<Position> {
        let per = self.batches_per_epoch();
        if per == 0 {
            return None;
        }
        Some(Position {
            epoch: pos.epoch + (pos.batch / per) as u64,
            batch: pos.batch % per,
        })
    }
}

/// See [`Batcher::iter_from`].
pub struct BatchIter<'a> {
    batcher: &'a Batcher,
    next: Option<Position>,
    /// The epoch whose batches are cached.
    current: Option<(u64, Vec<Vec<usize>>)>,
}

impl Iterator for BatchIter<'_> {
    type Item = (Position, Vec<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let pos = self.next?;
        if self.current.as_ref().is_none_or(|(e, _)| *e != pos.epoch) {
            self.current = Some((pos.epoch, self.batcher.epoch(pos.epoch)));
        }
        let batches = &self.current.as_ref()?.1;
        let batch = batches[pos.batch].clone();
        self.next = self.batcher.normalize(Position {
            epoch: pos.epoch,
            batch: pos.batch + 1,
        });
        Some((pos, batch))
    }
}
