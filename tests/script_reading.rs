//! Reading and control from scripts, on the tiny chat model with a random decoder adapter:
//! `d.ask` / `d.read_table` shapes, `table`, question and dialog files checked item by item,
//! a control run whose saved adapter loads with `load_model(..., #{adapter: dir})`, and a
//! control run stopped early and resumed with `resume: true` that ends where a straight one
//! does.

mod common;

use common::chat_model::write_tiny_chat_model_with;
use lqa::latentqa::decoder::{DecoderMeta, META_FILE};
use lqa::latentqa::LayerPlan;
use lqa::lm::LanguageModel;
use lqa::lora::{Adapter, LoraConfig};
use lqa::script::{Runtime, RuntimeOptions};
use rhai::Dynamic;
use std::path::{Path, PathBuf};

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    decoder: PathBuf,
    dir: PathBuf,
}

/// A tiny untied chat model and a decoder for it (a LoRA with non-zero B) saved as PEFT.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_tiny_chat_model_with(&tmp.path().join("tiny-chat"), 13, false);
    let lm = LanguageModel::load(model.to_str().unwrap(), &Default::default()).unwrap();
    let adapter = Adapter::new(
        &lm.model,
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            ..LoraConfig::paper_decoder()
        },
        1,
    )
    .unwrap();
    for w in adapter.layers.values() {
        let b = (w.b.as_tensor().ones_like().unwrap() * 0.05).unwrap();
        w.b.set(&b).unwrap();
    }
    let decoder = tmp.path().join("decoder");
    adapter
        .save_peft(&decoder, "tiny-chat", candle_core::DType::F32)
        .unwrap();
    let meta = DecoderMeta {
        base_model: "tiny-chat".into(),
        layers: LayerPlan::new(1, 0),
        read_layers: Vec::new(),
    };
    std::fs::write(
        decoder.join(META_FILE),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    Fixture {
        dir: tmp.path().to_path_buf(),
        _tmp: tmp,
        model,
        decoder,
    }
}

impl Fixture {
    fn prelude(&self) -> String {
        format!(
            "let m = load_model({:?}); let d = load_decoder(m, {:?});",
            self.model.to_str().unwrap(),
            self.decoder.to_str().unwrap()
        )
    }
    fn eval(&self, code: &str) -> Dynamic {
        let mut rt = Runtime::new(RuntimeOptions::default());
        let code = format!("{} {code}", self.prelude());
        rt.eval(&code).unwrap_or_else(|e| panic!("{code}: {e}"))
    }
    fn eval_err(&self, code: &str) -> String {
        let mut rt = Runtime::new(RuntimeOptions::default());
        let code = format!("{} {code}", self.prelude());
        match rt.eval(&code) {
            Ok(v) => panic!("{code}: expected an error, got {v:?}"),
            Err(e) => e,
        }
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }
}

fn strings(v: Dynamic) -> Vec<String> {
    v.into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.into_string().unwrap())
        .collect()
}

#[test]
fn ask_returns_one_answer_per_question_and_dialog() {
    let f = fixture();
    let one = f.eval(r#"d.ask("hi there", "who are you?", #{max_new_tokens: 5})"#);
    assert!(one.is_string());
    let many =
        strings(f.eval(r#"d.ask("hi there", ["who?", "why?", "who?"], #{max_new_tokens: 5})"#));
    assert_eq!(many.len(), 3);
    assert_eq!(many[0], many[2], "the same question gets the same answer");
    let dialogs = f.eval(
        r#"d.ask(["hi there", [#{role: "user", content: "be a cat"}, #{role: "assistant", content: "meow"},
                               #{role: "user", content: "hello"}], #{messages: [#{role: "user", content: "x"}]}],
                 ["who?"], #{max_new_tokens: 4, temperature: 0.8, seed: 3})"#,
    );
    let dialogs = dialogs.into_array().unwrap();
    assert_eq!(dialogs.len(), 3);
    assert!(dialogs
        .iter()
        .all(|d| d.clone().into_array().unwrap().len() == 1));
    // the first dialog alone gives the first answer (sampling is per question, not per batch)
    let alone = strings(
        f.eval(r#"d.ask("hi there", ["who?"], #{max_new_tokens: 4, temperature: 0.8, seed: 3})"#),
    );
    assert_eq!(strings(dialogs[0].clone()), alone);
}

#[test]
fn read_table_rows_print_as_a_table() {
    let f = fixture();
    let rows = f.eval(r#"d.read_table(["hi", "yo"], ["who?", "why?"], #{max_new_tokens: 3})"#);
    let rows = rows.into_array().unwrap();
    assert_eq!(rows.len(), 4);
    let r0 = rows[0].read_lock::<rhai::Map>().unwrap().clone();
    let mut keys: Vec<String> = r0.keys().map(|k| k.to_string()).collect();
    keys.sort();
    assert_eq!(keys, ["answer", "dialog", "question"]);
    assert_eq!(r0["dialog"].clone().into_string().unwrap(), "user: hi");
    let text = f
        .eval(r#"table(d.read_table("hi", ["who?"], #{max_new_tokens: 3}))"#)
        .into_string()
        .unwrap();
    assert!(
        text.lines().nth(1).unwrap().starts_with("| dialog"),
        "{text}"
    );
    let rt = Runtime::new(RuntimeOptions::default());
    let shown = rt.show(&Dynamic::from_array(rows));
    assert!(shown.contains("| question"), "{shown}");
}

#[test]
fn bad_questions_and_dialogs_name_the_item() {
    let f = fixture();
    let q = f.write("q.json", r#"["who?", 3]"#);
    let e = f.eval_err(&format!("load_questions({q:?})"));
    assert!(e.contains("q.json") && e.contains("questions[1]"), "{e}");
    let q = f.write("q2.json", r#"{"a prompt": [["q", "a"], ["only q"]]}"#);
    let e = f.eval_err(&format!("load_questions({q:?})"));
    assert!(e.contains("q2.json") && e.contains("pair 1"), "{e}");
    let q = f.write("q3.json", r#"{"a prompt": [["q1", "a"], ["q2", "b"]]}"#);
    assert_eq!(
        strings(f.eval(&format!("load_questions({q:?})"))),
        ["q1", "q2"]
    );
    let q = f.write("q4.json", "[oops");
    let e = f.eval_err(&format!("load_questions({q:?})"));
    assert!(e.contains("q4.json") && e.contains("invalid JSON"), "{e}");

    let dj = f.write(
        "d.json",
        r#"["hi", [{"role": "user", "content": "a"}, {"role": "assistant"}]]"#,
    );
    let e = f.eval_err(&format!("load_dialogs({dj:?})"));
    assert!(
        e.contains("d.json") && e.contains("dialogs[1][1]") && e.contains("content"),
        "{e}"
    );
    let dj = f.write("d2.json", r#"{"not": "an array"}"#);
    let e = f.eval_err(&format!("load_dialogs({dj:?})"));
    assert!(e.contains("d2.json"), "{e}");
    let dj = f.write(
        "d3.json",
        r#"["hi", {"name": "x", "messages": [{"role": "user", "content": "a"}]}]"#,
    );
    let v = f
        .eval(&format!("load_dialogs({dj:?})"))
        .into_array()
        .unwrap();
    assert_eq!(v.len(), 2);

    let e = f.eval_err(r#"d.ask("hi", ["who?", 5])"#);
    assert!(e.contains("questions[1]"), "{e}");
    let e = f.eval_err(r#"d.ask(["hi", 5], ["who?"])"#);
    assert!(e.contains("dialogs[1]"), "{e}");
    let e = f.eval_err(r#"d.ask("hi", ["who?"], #{max_new_token: 3})"#);
    assert!(
        e.contains("max_new_token") && e.contains("read_layer"),
        "{e}"
    );
    let e = f.eval_err(r#"d.ask("hi", ["who?"], #{read_layer: 9})"#);
    assert!(e.contains("read_layer 9"), "{e}");
}

#[test]
fn a_control_run_saves_an_adapter_that_loads_as_a_model() {
    let f = fixture();
    let control = f.write(
        "ctl.json",
        r#"{"be a cat": [["who is the assistant?", "a cat"], ["what will it say?", "meow"]]}"#,
    );
    let prompts = f.write(
        "ins.jsonl",
        "{\"instruction\": \"name a color\", \"response\": \"blue\"}\n\
         {\"instruction\": \"say hi\", \"response\": \"hi there\"}\n",
    );
    let out = f.dir.join("ctl-run");
    let adapter = out.join("adapter");
    let code = format!(
        r#"let opt = control_optimizer(m, d, #{{control: {control:?}, prompts: {prompts:?},
               samples: 6, batch_size: 2, lr: 0.01, r: 4, lora_alpha: 8.0, layers_to_optimize: [0, 1],
               early_stop: (), out_dir: {out:?}}});
           let losses = [];
           opt.on_step(|s| {{ losses.push(s.loss); true }});
           opt.run();
           opt.save({adapter:?});
           let info = opt.info();
           let s = load_model({model:?}, #{{adapter: {adapter:?}}});
           let p = "<|im_start|>user\nhello";
           let diff = (s.logits(p) - m.logits(p)).norm();
           let diff2 = (opt.steered().logits(p) - s.logits(p)).norm();
           [info.step, info.total_steps, diff, diff2]"#,
        out = out.to_str().unwrap(),
        adapter = adapter.to_str().unwrap(),
        model = f.model.to_str().unwrap(),
    );
    let v = f.eval(&code).into_array().unwrap();
    assert_eq!(v[0].as_int().unwrap(), 3);
    assert_eq!(v[1].as_int().unwrap(), 3);
    assert!(v[2].as_float().unwrap() > 1e-3, "steering changed nothing");
    assert!(
        v[3].as_float().unwrap() < 1e-3,
        "the saved adapter is the steered model"
    );
    assert!(Path::new(&out).join("metrics.jsonl").exists());
    assert!(Path::new(&out).join("loss.svg").exists());
    assert!(adapter.join("adapter_model.safetensors").exists());
    let e = f.eval_err(&format!(
        r#"control_optimizer(m, d, #{{control: {control:?}, prompts: {prompts:?}, sampels: 3}})"#
    ));
    assert!(e.contains("sampels"), "{e}");
    let e = f.eval_err(r#"control_optimizer(m, d, #{control: "no_such_control"})"#);
    assert!(e.contains("no_such_control"), "{e}");
}

#[test]
fn a_control_run_resumes_from_its_checkpoint() {
    let f = fixture();
    let control = f.write(
        "ctl.json",
        r#"{"be a cat": [["who is the assistant?", "a cat"], ["what will it say?", "meow"]]}"#,
    );
    let prompts = f.write(
        "ins.jsonl",
        "{\"instruction\": \"name a color\", \"response\": \"blue\"}\n\
         {\"instruction\": \"say hi\", \"response\": \"hi there\"}\n",
    );
    let (a, b) = (f.dir.join("straight"), f.dir.join("resumed"));
    let cfg = format!(
        r#"control: {control:?}, prompts: {prompts:?}, samples: 6, batch_size: 2, lr: 0.01,
           r: 4, lora_alpha: 8.0, layers_to_optimize: [0, 1], early_stop: ()"#
    );
    let code = format!(
        r#"let a = control_optimizer(m, d, #{{{cfg}, out_dir: {a:?}}});
           a.run();
           // no checkpoint yet: resume starts a new run
           let b = control_optimizer(m, d, #{{{cfg}, out_dir: {b:?}, resume: true}});
           let fresh = b.info().step;
           b.on_step(|s| s.step < 1);
           b.run();
           let path = b.checkpoint();
           let b = control_optimizer(m, d, #{{{cfg}, out_dir: {b:?}, resume: true}});
           let at = b.info().step;
           b.run();
           let p = "<|im_start|>user\nhello";
           let diff = (a.steered().logits(p) - b.steered().logits(p)).norm();
           let moved = (a.steered().logits(p) - m.logits(p)).norm();
           [fresh, at, b.info().step, diff, moved, path]"#,
        a = a.to_str().unwrap(),
        b = b.to_str().unwrap(),
    );
    let v = f.eval(&code).into_array().unwrap();
    assert_eq!(v[0].as_int().unwrap(), 0);
    assert_eq!(v[1].as_int().unwrap(), 1);
    assert_eq!(v[2].as_int().unwrap(), 3);
    let (diff, moved) = (v[3].as_float().unwrap(), v[4].as_float().unwrap());
    assert!(diff <= 1e-6, "the resumed run ends {diff} away");
    assert!(moved > 1e-3, "steering changed nothing ({moved})");
    let path = v[5].clone().into_string().unwrap();
    assert!(path.ends_with("checkpoint"), "{path}");
    assert!(b.join("checkpoint/state.json").exists());

    // a different config is a script error naming state.json, at the call
    let e = f.eval_err(&format!(
        r#"
           control_optimizer(m, d, #{{{cfg}, seed: 7, out_dir: {b:?}, resume: true}})"#,
        b = b.to_str().unwrap()
    ));
    assert!(e.contains("state.json") && e.contains("seed"), "{e}");
    assert!(
        e.starts_with("<eval>:2:"),
        "the error has the call's position: {e}"
    );
    let e = f.eval_err(&format!(
        r#"control_optimizer(m, d, #{{{cfg}, resume: true}})"#
    ));
    assert!(e.contains("out_dir"), "{e}");
    let e = f.eval_err(&format!(
        r#"control_optimizer(m, d, #{{{cfg}}}).checkpoint()"#
    ));
    assert!(e.contains("output directory"), "{e}");
}

/// Every options map is read into a typed struct: an unknown key or a wrong type is an error
/// naming the key, at the call's position.
#[test]
fn steering_measures_measure_answers_in_a_script() {
    let f = fixture();
    let v = f.eval(
        r#"let p = ["What should I pack for a picnic?", "Name a color."];
           let a = ["Pack vegan sandwiches for the picnic.", "vegan vegan vegan vegan vegan vegan"];
           steering_measures(m, p, a, #{keywords: ["vegan"], references: ["Pack fruit.", "Blue."]})"#,
    );
    let m = v.cast::<rhai::Map>();
    let get = |k: &str| m[k].as_float().unwrap();
    assert_eq!(get("topic_share"), 1.0);
    assert_eq!(get("relevance"), 0.5);
    // the second answer is one loop: 2 of its 3 four-grams repeat the first
    assert!((get("repeat_share") - (0.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    assert!(get("perplexity").is_finite() && get("perplexity") > 1.0);
}

#[test]
fn options_maps_name_unknown_keys_and_wrong_types() {
    let f = fixture();
    let dialog = r#"[#{role: "user", content: "Hello there"}]"#;
    let model = f.model.to_str().unwrap();
    let cases = [
        (
            format!("load_model({model:?}, #{{dtpye: \"f32\"}})"),
            "load_model: unknown option `dtpye` (known: dtype, device, adapter, weights)",
        ),
        (
            format!("load_model({model:?}, #{{dtype: 32}})"),
            "load_model: option `dtype`: integer `32`, expected a string",
        ),
        (
            "m.generate(\"hi\", #{max_new_token: 3})".into(),
            "generate: unknown option `max_new_token`",
        ),
        (
            "m.generate(\"hi\", #{temperature: \"hot\"})".into(),
            "generate: option `temperature`: string \"hot\", expected f64",
        ),
        (
            format!("m.chat({dialog}, #{{seed: -1}})"),
            "generate: option `seed`: invalid value: integer `-1`, expected u64",
        ),
        (
            "m.run_with_hooks(\"hi\", [], #{use_cache: 1})".into(),
            "generate: option `use_cache`: integer `1`, expected a boolean",
        ),
        (
            format!("d.score({dialog}, \"q\", \"a\", #{{patchall: true}})"),
            "score: unknown option `patchall` (known: patch_all, activations)",
        ),
        (
            format!("d.ask({dialog}, \"q\", #{{read_layr: 1}})"),
            "ask: unknown option `read_layr`",
        ),
        (
            format!("d.ask({dialog}, \"q\", #{{patch_all: 1}})"),
            "ask: option `patch_all`: integer `1`, expected a boolean",
        ),
        (
            format!("d.read_table([{dialog}], [\"q\"], #{{max_new_tokens: \"x\"}})"),
            "ask: option `max_new_tokens`",
        ),
        (
            "evaluate_reading(d, #{split: \"s.json\", limit: 2.5})".into(),
            "evaluate_reading: option `limit`: float `2.5`",
        ),
        (
            format!("d.ask({dialog}, \"q\", #{{activations: \"shuffled\"}})"),
            "unknown activations \"shuffled\": expected \"read\" or \"none\"",
        ),
        (
            "evaluate_reading(d, #{limt: 2})".into(),
            "evaluate_reading: unknown option `limt`",
        ),
        (
            "steering_measures(m, [\"q\"], [\"a\"], #{keyword: [\"x\"]})".into(),
            "steering_measures: unknown option `keyword`",
        ),
        (
            "steering_measures(m, [\"q\"], [\"a\", \"b\"], #{})".into(),
            "1 prompts, 2 answers",
        ),
    ];
    for (code, want) in cases {
        let err = f.eval_err(&code);
        assert!(err.contains(want), "{code}:\n  got  {err}\n  want {want}");
        assert!(err.starts_with("<eval>:1:"), "{code}: no position in {err}");
    }
}

#[test]
fn no_activations_is_a_baseline_that_ignores_the_dialog() {
    let f = fixture();
    let v = f.eval(
        r#"
        let q = "What is the assistant thinking about?";
        let a = "The color red.";
        let read1 = d.score("Talk about red.", q, a);
        let read2 = d.score("A long story about a dog and a cat.", q, a);
        let none1 = d.score("Talk about red.", q, a, #{activations: "none"});
        let none2 = d.score("A long story about a dog and a cat.", q, a, #{activations: "none"});
        let ask1 = d.ask("Talk about red.", q, #{activations: "none", max_new_tokens: 6});
        let info = d.info();
        [read1, read2, none1, none2, ask1, info.injection, info.read_layers.len()]
        "#,
    );
    let v = v.into_array().unwrap();
    let f64_at = |i: usize| v[i].as_float().unwrap();
    // the activations matter when read ...
    assert!((f64_at(0) - f64_at(1)).abs() > 1e-6);
    // ... and with none written, the score depends only on how many placeholders there are
    // and the question: equal for two dialogs of the same patched length, so compare with
    // itself and with the read score
    assert!((f64_at(2) - f64_at(0)).abs() > 1e-6);
    assert!(v[4].is_string());
    assert_eq!(v[5].clone().into_string().unwrap(), "replace");
    assert_eq!(v[6].as_int().unwrap(), 0);
}
