//! The `Model` script object on the real default model: the names other tools call are a
//! contract, and every value is checked against the PyTorch reference where one exists.

mod real;
use lqa::script::{Runtime, RuntimeOptions};
use rhai::Dynamic;

fn eval(code: &str) -> Dynamic {
    let mut rt = Runtime::new(RuntimeOptions::default());
    rt.eval(code).unwrap_or_else(|e| panic!("{code}: {e}"))
}

fn eval_err(code: &str) -> String {
    let mut rt = Runtime::new(RuntimeOptions::default());
    match rt.eval(code) {
        Ok(v) => panic!("{code}: expected an error, got {v:?}"),
        Err(e) => e,
    }
}

fn ints(v: Dynamic) -> Vec<i64> {
    v.into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.as_int().unwrap())
        .collect()
}

const LOAD: &str = r#"let m = load_model("smollm2-135m-instruct");"#;

#[test]
fn info_reports_the_architecture() {
    real::gguf_path();
    let v = eval(&format!("{LOAD} m.info()"));
    let map = v.cast::<rhai::Map>();
    let get = |k: &str| map[k].as_int().unwrap();
    assert_eq!(
        (
            get("n_layers"),
            get("d_model"),
            get("n_heads"),
            get("n_kv_heads"),
            get("vocab_size")
        ),
        (30, 576, 9, 3, 49152)
    );
}

#[test]
fn tokenize_and_chat_template_match_the_reference() {
    let r = real::reference();
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if case["name"] == "chat_template" || case["name"].as_str().unwrap().starts_with("chat") {
            continue;
        }
        let code = format!(
            "{LOAD} m.tokenize({})",
            serde_json::to_string(text).unwrap()
        );
        let want: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ints(eval(&code)), want, "{}", case["name"]);
        let back = eval(&format!(
            "{LOAD} m.detokenize(m.tokenize({}))",
            serde_json::to_string(text).unwrap()
        ));
        assert_eq!(back.into_string().unwrap(), text);
    }
    let g = &r["greedy"][0];
    let code = format!(
        "{LOAD} m.chat_template([#{{role: \"user\", content: {}}}], true)",
        serde_json::to_string(g["user_message"].as_str().unwrap()).unwrap()
    );
    assert_eq!(
        eval(&code).into_string().unwrap(),
        g["prompt_text"].as_str().unwrap()
    );
}

#[test]
fn generate_and_chat_reproduce_the_reference_greedy_text() {
    let r = real::reference();
    let g = &r["greedy"][0];
    let msg = serde_json::to_string(g["user_message"].as_str().unwrap()).unwrap();
    let want = g["generated_text"].as_str().unwrap();
    let code = format!("{LOAD} m.chat([#{{role: \"user\", content: {msg}}}], #{{max_new_tokens: 32, stop: false}})");
    assert_eq!(eval(&code).into_string().unwrap(), want);
    // batch form: an array of prompts gives an array of texts; padding does not change a row
    let prompt = serde_json::to_string(g["prompt_text"].as_str().unwrap()).unwrap();
    let code =
        format!("{LOAD} m.generate([{prompt}, \"Hi\"], #{{max_new_tokens: 32, stop: false}})");
    let out = eval(&code).into_array().unwrap();
    assert_eq!(out[0].clone().into_string().unwrap(), want);
}

#[test]
fn logits_capture_and_patch() {
    // top-1 of "The capital of France is" is " Paris" (id 7042)
    let v = eval(&format!(
        "{LOAD} m.logits(\"The capital of France is\").argmax()"
    ));
    assert_eq!(v.as_int().unwrap(), 7042);
    // capture: [seq, d] for one prompt, [batch, seq, d] + pads for several
    let v = eval(&format!(
        "{LOAD} let c = m.run_with_cache(\"The capital of France is\", [\"blocks.15.hook_resid_post\", \"hook_embed\"]); \
         [c[\"blocks.15.hook_resid_post\"].shape, c[\"hook_embed\"].shape]"
    ));
    let shapes: Vec<Vec<i64>> = v.into_array().unwrap().into_iter().map(ints).collect();
    assert_eq!(shapes, vec![vec![5, 576], vec![5, 576]]);
    let v = eval(&format!(
        "{LOAD} let c = m.run_with_cache([\"a b c\", \"The capital of France is\"], [\"blocks.3.hook_mlp_out\"]); \
         [c[\"blocks.3.hook_mlp_out\"].shape, c.pads]"
    ));
    let a = v.into_array().unwrap();
    assert_eq!(ints(a[0].clone()), vec![2, 5, 576]);
    assert_eq!(ints(a[1].clone()), vec![2, 0]);
    // activation patching: the country token's residual from another prompt moves the answer;
    // patching it with its own activation changes nothing
    let code = format!(
        "{LOAD} let p = \"The capital of France is\"; let h = \"blocks.3.hook_resid_post\"; \
         let own = m.run_with_cache(p, [h])[h]; \
         let other = m.run_with_cache(\"The capital of Japan is\", [h])[h]; \
         let o = #{{max_new_tokens: 3}}; \
         [m.generate(p, o), m.run_with_hooks(p, [patch(h, own[3], 3)], o), m.run_with_hooks(p, [patch(h, other[3], 3)], o)]"
    );
    let out: Vec<String> = eval(&code)
        .into_array()
        .unwrap()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    assert_eq!(out[0], out[1]);
    assert!(out[0].contains("Paris"), "{out:?}");
    assert!(out[2].contains("Tokyo"), "{out:?}");
}

#[test]
fn bad_input_is_one_line_naming_the_thing() {
    real::gguf_path();
    let err = eval_err("let m = load_model(\"no-such-model\");");
    assert!(
        err.starts_with("<eval>:1:9:") && err.contains("unknown model `no-such-model`"),
        "{err}"
    );
    let err = eval_err(&format!(
        "{LOAD}\nm.run_with_cache(\"hi\", [\"blocks.30.hook_resid_post\"])"
    ));
    assert!(
        err.starts_with("<eval>:2:3:") && err.contains("layer 30 is out of range"),
        "{err}"
    );
    let err = eval_err(&format!("{LOAD}\nm.generate(\"hi\", #{{max_tokens: 3}})"));
    assert!(err.contains("unknown option `max_tokens`"), "{err}");
    let err = eval_err(&format!("{LOAD}\nm.chat([#{{role: \"user\"}}])"));
    assert!(err.contains("messages[0] has no `content`"), "{err}");
    // truncated and corrupt GGUF files name the file; never a panic
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(real::gguf_path()).unwrap();
    let trunc = dir.path().join("truncated.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    let err = eval_err(&format!("load_model({:?})", trunc.display().to_string()));
    assert!(
        err.contains("truncated.gguf") && err.contains("tensor"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let err = eval_err(&format!("load_model({:?})", junk.display().to_string()));
    assert!(err.contains("junk.gguf"), "{err}");
    let header = dir.path().join("header.gguf");
    std::fs::write(&header, &bytes[..4096]).unwrap();
    let err = eval_err(&format!("load_model({:?})", header.display().to_string()));
    assert!(err.contains("header.gguf"), "{err}");
}
