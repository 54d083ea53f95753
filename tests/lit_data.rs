//! The LIT data pipeline: loading the real LatentQA data, read dialogs, label splits, length
//! bucketing, and one-line errors for bad data.

use lqa::latentqa::VerbMask;
use lqa::lit::data::{Batcher, DataOptions, ItemKind, LabelSplit, LitData, Position};
use lqa::rng::SplitMix64;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/latentqa-data")
}

fn real() -> LitData {
    LitData::load_dir(&data_dir(), &DataOptions::default()).expect("load the shared data")
}

fn roles(item: &lqa::lit::data::DataItem) -> Vec<&str> {
    item.read.messages.iter().map(|m| m.role.as_str()).collect()
}

/// A rough example length (characters of the read dialog and the QA pair).
fn char_len(e: &lqa::lit::data::Example) -> usize {
    e.item
        .read
        .messages
        .iter()
        .map(|m| m.content.len())
        .sum::<usize>()
        + e.question.len()
        + e.answer.len()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn loads_real_data_counts() {
    let d = real();
    let count = |k: ItemKind| d.items.iter().filter(|i| i.kind == k).count();
    assert_eq!(count(ItemKind::Control), 425);
    assert_eq!(count(ItemKind::Stimulus), 477);
    assert_eq!(count(ItemKind::System), 477);
    assert_eq!(count(ItemKind::StimulusCompletion), 0);
    assert_eq!(d.qa.len(), 830);
    for item in &d.items {
        assert!(!d.qa[&item.label].is_empty(), "{} has no QA", item.label);
    }
    let expected: usize = d.items.iter().map(|i| d.qa[&i.label].len()).sum();
    assert_eq!(d.examples.len(), expected);
    assert_eq!(d.examples.len(), (425 + 477 + 477) * 2);
    // The join: each item's examples are its label's QA pairs, in order.
    let mut at = 0;
    for item in &d.items {
        for (q, a) in &d.qa[&item.label] {
            let e = &d.examples[at];
            assert!(std::sync::Arc::ptr_eq(&e.item, item));
            assert_eq!((&e.question, &e.answer), (q, a));
            at += 1;
        }
    }
    // Items remember where they came from.
    let first_system = d.items.iter().find(|i| i.kind == ItemKind::System).unwrap();
    assert!(first_system.file.ends_with("system.json"));
    assert_eq!(first_system.index, 0);
}

#[test]
fn read_dialogs_follow_the_paper() {
    let d = real();
    let raw = |name: &str| read_json(&data_dir().join(name));
    let (control, stimulus, system) = (
        raw("control.json"),
        raw("stimulus.json"),
        raw("system.json"),
    );
    for item in &d.items {
        let src = match item.kind {
            ItemKind::Control => &control,
            ItemKind::Stimulus => &stimulus,
            ItemKind::System => &system,
            _ => unreachable!(),
        }[item.index]
            .clone();
        assert_eq!(src["label"], item.label.as_str());
        let contents: Vec<&str> = item
            .read
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert!(item.read.add_generation_prompt);
        match item.kind {
            ItemKind::Control => {
                assert_eq!(roles(item), ["user"]);
                assert_eq!(contents, [src["control_user"].as_str().unwrap()]);
                assert_eq!(item.read.mask, VerbMask::User);
            }
            ItemKind::Stimulus => {
                assert_eq!(roles(item), ["user", "assistant", "user"]);
                let want: Vec<&str> = ["control_user", "control_model", "stimulus_user"]
                    .iter()
                    .map(|k| src[k].as_str().unwrap())
                    .collect();
                assert_eq!(contents, want);
                assert_eq!(item.read.mask, VerbMask::User);
            }
            ItemKind::System => {
                assert_eq!(roles(item), ["system", "user"]);
                let want: Vec<&str> = ["system", "stimulus_user"]
                    .iter()
                    .map(|k| src[k].as_str().unwrap())
                    .collect();
                assert_eq!(contents, want);
                assert_eq!(item.read.mask, VerbMask::System);
            }
            _ => unreachable!(),
        }
    }
}

/// A small, valid data folder.
fn write_folder(dir: &Path) {
    let w = |name: &str, v: Value| std::fs::write(dir.join(name), v.to_string()).unwrap();
    w(
        "qa.json",
        json!({
            "goal-a": [["q a1", "a a1"], ["q a2", "a a2"]],
            "goal-b": [["q b1", "a b1"]],
            "persona-c": [["q c1", "a c1"], ["q c2", "a c2"], ["q c3", "a c3"]],
        }),
    );
    w(
        "control.json",
        json!([
            {"control_user": "be a", "label": "goal-a"},
            {"control_user": "be c", "label": "persona-c"},
        ]),
    );
    w(
        "stimulus.json",
        json!([
            {"control_user": "cu", "control_thought": "ct", "control_model": "cm",
             "stimulus_user": "su", "label": "goal-b"},
            {"control_user": "cu", "control_model": "cm", "stimulus_user": "su",
             "stimulus_model": "the completion", "label": "goal-a"},
        ]),
    );
}

#[test]
fn any_folder_of_that_shape_loads() {
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    let d = LitData::load_dir(tmp.path(), &DataOptions::default()).unwrap();
    let kinds: Vec<ItemKind> = d.items.iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [
            ItemKind::Control,
            ItemKind::Control,
            ItemKind::Stimulus,
            ItemKind::StimulusCompletion
        ]
    );
    assert_eq!(d.examples.len(), 2 + 3 + 1 + 2);

    // The fourth kind: stimulus plus the model's completion, no generation prompt.
    let sc = &d.items[3];
    assert_eq!(roles(sc), ["user", "assistant", "user", "assistant"]);
    assert_eq!(sc.read.messages[3].content, "the completion");
    assert!(!sc.read.add_generation_prompt);
    assert_eq!(sc.read.mask, VerbMask::User);

    // A stimulus_completion.json file, with either field name.
    std::fs::write(
        tmp.path().join("stimulus_completion.json"),
        json!([{"control_user": "cu", "control_model": "cm", "stimulus_user": "su",
                "stimulus_completion": "done", "label": "goal-b"}])
        .to_string(),
    )
    .unwrap();
    let d = LitData::load_dir(tmp.path(), &DataOptions::default()).unwrap();
    assert_eq!(d.items.len(), 5);
    assert_eq!(d.items[4].kind, ItemKind::StimulusCompletion);
    assert_eq!(d.items[4].read.messages[3].content, "done");

    // Options: kinds, limit per file, excluded label groups.
    let only_control = DataOptions {
        kinds: vec![ItemKind::Control],
        ..DataOptions::default()
    };
    let d = LitData::load_dir(tmp.path(), &only_control).unwrap();
    assert_eq!(d.items.len(), 2);
    let limited = DataOptions {
        limit: Some(1),
        ..DataOptions::default()
    };
    let d = LitData::load_dir(tmp.path(), &limited).unwrap();
    assert_eq!(d.items.len(), 3);
    let no_persona = DataOptions {
        exclude_groups: vec!["persona".into()],
        ..DataOptions::default()
    };
    let d = LitData::load_dir(tmp.path(), &no_persona).unwrap();
    assert!(d.items.iter().all(|i| !i.label.starts_with("persona")));
    assert_eq!(d.items.len(), 4);

    // Files are optional one by one.
    std::fs::remove_file(tmp.path().join("control.json")).unwrap();
    let d = LitData::load_dir(tmp.path(), &DataOptions::default()).unwrap();
    assert_eq!(d.items.len(), 3);
}

#[test]
fn limit_applies_per_file_on_real_data() {
    let opts = DataOptions {
        limit: Some(10),
        ..DataOptions::default()
    };
    let d = LitData::load_dir(&data_dir(), &opts).unwrap();
    assert_eq!(d.items.len(), 30);
    assert_eq!(d.examples.len(), 60);
}

#[test]
fn split_holds_out_whole_labels() {
    let d = real();
    let labels = d.labels();
    let split = d.split_labels(0.2, 7).unwrap();
    assert!(split.train.is_disjoint(&split.eval));
    let all: BTreeSet<String> = split.train.union(&split.eval).cloned().collect();
    assert_eq!(all, labels);
    let want = (labels.len() as f64 * 0.2).round() as usize;
    assert_eq!(split.eval.len(), want);

    let (train, eval) = d.split_by_label(0.2, 7).unwrap();
    assert_eq!(train.len() + eval.len(), d.examples.len());
    assert!(eval.iter().all(|e| split.eval.contains(&e.item.label)));
    assert!(train.iter().all(|e| split.train.contains(&e.item.label)));
    let frac = eval.len() as f64 / d.examples.len() as f64;
    assert!((0.12..0.28).contains(&frac), "eval fraction {frac}");

    // Deterministic for a seed, different across seeds.
    assert_eq!(d.split_labels(0.2, 7).unwrap(), split);
    let (train2, eval2) = d.split_by_label(0.2, 7).unwrap();
    assert_eq!((train2, eval2), (train, eval));
    assert_ne!(d.split_labels(0.2, 8).unwrap().eval, split.eval);

    // Edge fractions.
    assert!(d.split_labels(0.0, 1).unwrap().eval.is_empty());
    assert!(d.split_labels(1.0, 1).unwrap().train.is_empty());
    assert_eq!(d.split_labels(1e-9, 1).unwrap().eval.len(), 1);
}

#[test]
fn split_can_be_saved_and_reused() {
    let d = real();
    let split = d.split_labels(0.15, 3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("split.json");
    split.save(&path).unwrap();
    let back = LabelSplit::load(&path).unwrap();
    assert_eq!(back, split);
    assert_eq!(d.split_with(&back), d.split_by_label(0.15, 3).unwrap());

    // A label on both sides is refused.
    let mut bad = split.clone();
    bad.train.insert(split.eval.iter().next().unwrap().clone());
    bad.save(&path).unwrap();
    let msg = LabelSplit::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains("split.json: label") && msg.contains("in both train and eval"),
        "{msg}"
    );
}

#[test]
fn rng_is_splitmix64() {
    // Reference values of SplitMix64 seeded with 0.
    let mut r = SplitMix64::new(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    let mut counts = [0usize; 5];
    for _ in 0..50_000 {
        counts[r.below(5) as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (9_000..11_000).contains(&c)),
        "{counts:?}"
    );
}

fn check_epoch(b: &Batcher, batches: &[Vec<usize>]) {
    let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..b.len()).collect::<Vec<_>>(), "each example once");
    assert_eq!(batches.len(), b.batches_per_epoch());
    let short = batches.iter().filter(|x| x.len() != b.batch_size()).count();
    assert!(short <= 1);
    assert!(batches
        .iter()
        .all(|x| !x.is_empty() && x.len() <= b.batch_size()));
}

#[test]
fn batcher_is_deterministic_and_covers_each_example_once() {
    let lengths: Vec<usize> = (0..1003).map(|i| (i * 7919) % 611).collect();
    let b = Batcher::new(lengths.clone(), 16, 42).unwrap();
    assert_eq!(b.batches_per_epoch(), 63);
    for epoch in 0..3 {
        let e = b.epoch(epoch);
        check_epoch(&b, &e);
        assert_eq!(e, b.epoch(epoch));
        assert_eq!(
            e,
            Batcher::new(lengths.clone(), 16, 42).unwrap().epoch(epoch)
        );
    }
    assert_ne!(b.epoch(0), b.epoch(1));
    assert_ne!(
        b.epoch(0),
        Batcher::new(lengths.clone(), 16, 43).unwrap().epoch(0)
    );
    // The closure form is the same batcher.
    let f = Batcher::from_fn(lengths.len(), 16, 42, |i| lengths[i]).unwrap();
    assert_eq!(f.epoch(5), b.epoch(5));

    // drop_last drops the one short batch.
    let d = b.clone().with_drop_last(true);
    assert_eq!(d.batches_per_epoch(), 62);
    let e = d.epoch(0);
    assert_eq!(e.len(), 62);
    assert!(e.iter().all(|x| x.len() == 16));

    assert!(Batcher::new(vec![1, 2], 0, 0).is_err());
    let empty = Batcher::new(vec![], 4, 0).unwrap();
    assert!(empty.epoch(0).is_empty());
    assert!(empty.iter_from(Position::default()).next().is_none());
}

#[test]
fn batcher_resumes_exactly_from_a_position() {
    let lengths: Vec<usize> = (0..203).map(|i| (i * 31) % 97).collect();
    let b = Batcher::new(lengths, 8, 9).unwrap().with_chunk_batches(4);
    let per = b.batches_per_epoch();
    assert_eq!(per, 26);
    let run: Vec<(Position, Vec<usize>)> = b.iter_from(Position::default()).take(3 * per).collect();
    for (i, (pos, batch)) in run.iter().enumerate() {
        assert_eq!(
            *pos,
            Position {
                epoch: (i / per) as u64,
                batch: i % per
            }
        );
        assert_eq!(&b.epoch(pos.epoch)[pos.batch], batch);
        assert_eq!(b.batch_at(*pos).as_ref(), Some(batch));
    }
    // Resume after any batch: a fresh batcher, the position alone, gives the same future.
    for stop in [0, 5, per - 1, per, per + 17] {
        let (p, _) = run[stop];
        let fresh = b.clone();
        let resumed: Vec<_> = fresh
            .iter_from(Position {
                epoch: p.epoch,
                batch: p.batch + 1,
            })
            .take(run.len() - stop - 1)
            .collect();
        assert_eq!(resumed, run[stop + 1..]);
    }
    // A batch index past the end of an epoch counts on into the next.
    assert_eq!(
        b.batch_at(Position {
            epoch: 0,
            batch: per + 3
        }),
        b.batch_at(Position { epoch: 1, batch: 3 })
    );
}

fn mean_spread(batches: &[Vec<usize>], lengths: &[usize]) -> f64 {
    let spreads: Vec<usize> = batches
        .iter()
        .map(|b| {
            let l = b.iter().map(|&i| lengths[i]);
            l.clone().max().unwrap() - l.min().unwrap()
        })
        .collect();
    spreads.iter().sum::<usize>() as f64 / spreads.len() as f64
}

#[test]
fn batcher_groups_similar_lengths() {
    let d = real();
    let lengths: Vec<usize> = d.examples.iter().map(char_len).collect();
    let bs = 16;
    let b = Batcher::new(lengths.clone(), bs, 1).unwrap();
    let bucketed = b.epoch(0);
    check_epoch(&b, &bucketed);
    // Random batching: the same shuffle, cut in order.
    let mut ids: Vec<usize> = (0..lengths.len()).collect();
    SplitMix64::new(1).shuffle(&mut ids);
    let random: Vec<Vec<usize>> = ids.chunks(bs).map(<[usize]>::to_vec).collect();
    let (sb, sr) = (
        mean_spread(&bucketed, &lengths),
        mean_spread(&random, &lengths),
    );
    assert!(sb * 5.0 < sr, "bucketed spread {sb}, random spread {sr}");
    // Batch order is shuffled: not sorted by length across the epoch.
    let firsts: Vec<usize> = bucketed.iter().map(|x| lengths[x[0]]).collect();
    assert!(firsts.windows(2).any(|w| w[0] > w[1]));
}

/// The error of loading a folder, as a string; it must be one line.
fn load_err(dir: &Path) -> String {
    let err = LitData::load_dir(dir, &DataOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

fn assert_has(msg: &str, want: &str) {
    assert!(msg.contains(want), "expected {want:?} in {msg:?}");
}

fn stimulus_items(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"control_user": format!("cu {i}"), "control_thought": "t",
                   "control_model": "cm", "stimulus_user": "su", "label": "goal-a"})
        })
        .collect()
}

/// A folder with qa.json and the given files (name, contents).
fn folder(files: &[(&str, String)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    for (name, text) in files {
        std::fs::write(tmp.path().join(name), text).unwrap();
    }
    tmp
}

#[test]
fn bad_items_name_file_and_item() {
    // Missing field.
    let mut items = stimulus_items(20);
    items[12].as_object_mut().unwrap().remove("stimulus_user");
    let t = folder(&[("stimulus.json", Value::from(items).to_string())]);
    assert_has(
        &load_err(t.path()),
        "stimulus.json: item 12: missing field \"stimulus_user\"",
    );

    // Wrong type, in a used and in an unused field.
    let mut items = stimulus_items(3);
    items[1]["control_model"] = json!(3);
    let t = folder(&[("stimulus.json", Value::from(items).to_string())]);
    assert_has(
        &load_err(t.path()),
        "stimulus.json: item 1: field \"control_model\" must be a string, found a number",
    );
    let mut items = stimulus_items(3);
    items[2]["control_thought"] = json!(["x"]);
    let t = folder(&[("stimulus.json", Value::from(items).to_string())]);
    assert_has(
        &load_err(t.path()),
        "stimulus.json: item 2: field \"control_thought\" must be a string, found an array",
    );
    let t = folder(&[(
        "control.json",
        json!([{"control_user": "x", "label": 5}]).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "control.json: item 0: field \"label\" must be a string, found a number",
    );

    // Empty strings.
    let t = folder(&[(
        "system.json",
        json!([{"system": "s", "stimulus_user": "u", "label": "goal-a"},
               {"system": "  ", "stimulus_user": "u", "label": "goal-a"}])
        .to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "system.json: item 1: field \"system\" is empty",
    );
    let t = folder(&[(
        "control.json",
        json!([{"control_user": "x", "label": ""}]).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "control.json: item 0: field \"label\" is empty",
    );

    // A label with no QA pairs.
    let sys = |label: &str| json!({"system": "s", "stimulus_user": "u", "label": label});
    let t = folder(&[(
        "system.json",
        json!([sys("goal-a"), sys("goal-a"), sys("goal-b"), sys("goal-x")]).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "system.json: item 3: label \"goal-x\" has no QA pairs in qa.json",
    );

    // An item that is not an object.
    let t = folder(&[(
        "control.json",
        json!([{"control_user": "x", "label": "goal-a"}, "oops"]).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "control.json: item 1: expected an object, found a string",
    );

    // A completion where none belongs, and two completions.
    let t = folder(&[(
        "control.json",
        json!([{"control_user": "x", "stimulus_model": "m", "label": "goal-a"}]).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "control.json: item 0: field \"stimulus_model\" is only allowed",
    );
    let mut items = stimulus_items(1);
    items[0]["stimulus_model"] = json!("a");
    items[0]["stimulus_completion"] = json!("b");
    let t = folder(&[("stimulus.json", Value::from(items).to_string())]);
    assert_has(&load_err(t.path()), "stimulus.json: item 0: has both");
    let t = folder(&[(
        "stimulus_completion.json",
        Value::from(stimulus_items(1)).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "stimulus_completion.json: item 0: missing field \"stimulus_completion\"",
    );
}

#[test]
fn bad_files_name_the_file() {
    // Invalid JSON, with line and column.
    let t = folder(&[(
        "stimulus.json",
        "[\n {\"label\": \"goal-a\",\n }\n]".to_string(),
    )]);
    let msg = load_err(t.path());
    assert_has(&msg, "stimulus.json: invalid JSON: ");
    assert_has(&msg, "at line 3 column 2");

    // Empty file, blank file, empty array, not an array.
    for (text, want) in [
        ("", "control.json: empty file"),
        (" \n", "control.json: empty file"),
        ("[]", "control.json: empty array (no items)"),
        (
            "{}",
            "control.json: expected an array of items, found an object",
        ),
    ] {
        let t = folder(&[("control.json", text.to_string())]);
        assert_has(&load_err(t.path()), want);
    }

    // qa.json: entries that are not [question, answer], empty file, wrong shape.
    let qa_cases: Vec<(Value, &str)> = vec![
        (
            json!({"goal-a": [["q", "a"], ["q", "a", "extra"]]}),
            "qa.json: label \"goal-a\": entry 1: expected [question, answer], found an array of 3 elements",
        ),
        (
            json!({"goal-a": ["just a string"]}),
            "qa.json: label \"goal-a\": entry 0: expected [question, answer], found a string",
        ),
        (
            json!({"goal-a": [["q", 2]]}),
            "qa.json: label \"goal-a\": entry 0: expected [question, answer], found an array holding a number",
        ),
        (
            json!({"goal-a": [["q", " "]]}),
            "qa.json: label \"goal-a\": entry 0: the answer is empty",
        ),
        (
            json!({"goal-a": {"q": "a"}}),
            "qa.json: label \"goal-a\": expected an array of [question, answer] pairs, found an object",
        ),
        (json!({}), "qa.json: empty object (no labels)"),
        (json!([["q", "a"]]), "qa.json: expected an object"),
    ];
    for (qa, want) in qa_cases {
        let t = folder(&[("qa.json", qa.to_string())]);
        assert_has(&load_err(t.path()), want);
    }
    let t = folder(&[("qa.json", String::new())]);
    assert_has(&load_err(t.path()), "qa.json: empty file");

    // A label whose QA list is empty counts as no QA pairs.
    let t = folder(&[(
        "qa.json",
        json!({"goal-a": [], "goal-b": [["q", "a"]], "persona-c": [["q", "a"]]}).to_string(),
    )]);
    assert_has(
        &load_err(t.path()),
        "control.json: item 0: label \"goal-a\" has no QA pairs in qa.json",
    );

    // The errors are BadFile and carry the file's path.
    let t = folder(&[("control.json", "[]".to_string())]);
    match LitData::load_dir(t.path(), &DataOptions::default()).unwrap_err() {
        lqa::Error::BadFile { path, .. } => assert_eq!(path, t.path().join("control.json")),
        e => panic!("expected BadFile, got {e:?}"),
    }
}

#[test]
fn folder_needs_qa_and_a_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    std::fs::remove_file(tmp.path().join("qa.json")).unwrap();
    assert_has(&load_err(tmp.path()), "no qa.json");

    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    for f in ["control.json", "stimulus.json"] {
        std::fs::remove_file(tmp.path().join(f)).unwrap();
    }
    assert_has(
        &load_err(tmp.path()),
        "no data file: expected at least one of control.json",
    );

    // kinds restricts which files count.
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    let opts = DataOptions {
        kinds: vec![ItemKind::System],
        ..DataOptions::default()
    };
    let msg = LitData::load_dir(tmp.path(), &opts)
        .unwrap_err()
        .to_string();
    assert_has(&msg, "no data file: expected at least one of system.json");

    let missing = tmp.path().join("nope");
    assert_has(&load_err(&missing), "nope");
}

#[test]
fn labels_and_qa_are_consistent() {
    let d = real();
    let labels = d.labels();
    assert!(labels.iter().all(|l| d.qa.contains_key(l)));
    let per_label: BTreeMap<&str, usize> = d.items.iter().fold(BTreeMap::new(), |mut m, i| {
        *m.entry(i.label.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per_label.len(), labels.len());
}

#[test]
fn a_bad_eval_fraction_is_an_error_naming_it() {
    let d = real();
    for bad in [-0.1, 1.5, f64::NAN] {
        let e = d.split_labels(bad, 1).unwrap_err().to_string();
        assert!(e.contains("eval_fraction"), "{e}");
        assert!(d.split_by_label(bad, 1).is_err());
    }
}

#[test]
fn kind_names_are_their_serialised_names() {
    use lqa::lit::data::ItemKind;
    for k in [
        ItemKind::Control,
        ItemKind::Stimulus,
        ItemKind::System,
        ItemKind::StimulusCompletion,
        ItemKind::Context,
        ItemKind::Classification,
    ] {
        assert_eq!(serde_json::to_value(k).unwrap(), k.name());
    }
}
