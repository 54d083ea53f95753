//! No input aborts lqa: tensor bombs and too-big models are script errors (in `lqa -e` and in
//! the REPL, which keeps its state), a NaN steering vector is an error naming the hook, and a
//! non-finite loss stops LIT training with its last checkpoint intact.

mod common;

use common::chat_model::{write_tiny_chat_model, write_toy_latentqa_data};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn lqa(args: &[&str], dir: &Path, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lqa"))
        .args(args)
        .current_dir(dir)
        .env_remove("LQA_LOG")
        .env("LQA_HOME", dir.join("home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lqa");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().expect("lqa output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An error exit (status 1, not a signal or an abort) with one line naming every `needle`.
fn assert_script_error(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "status {:?}: {err}", out.status);
    assert!(
        !err.contains("memory allocation") && !err.contains("panicked"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn tensor_bombs_are_script_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 4 TB: over the default limit (half of physical memory) on any machine this runs on
    let out = lqa(&["-e", "zeros([100000, 100000, 100])"], d, "");
    assert_script_error(
        &out,
        &[
            "zeros",
            "Tensor[100000, 100000, 100] f32",
            "tensor limit",
            "<eval>",
        ],
    );
    // a shape whose product overflows usize
    let out = lqa(&["-e", "ones([4294967296, 4294967296, 16])"], d, "");
    assert_script_error(&out, &["ones", "overflows"]);
    // small inputs, a huge broadcast result
    let out = lqa(
        &[
            "--max-tensor-bytes",
            "1000000",
            "-e",
            "ones([100000, 1]) + ones([1, 100000])",
        ],
        d,
        "",
    );
    assert_script_error(
        &out,
        &[
            "add",
            "Tensor[100000, 100000] f32",
            "--max-tensor-bytes 1000000",
        ],
    );
    // a nested array whose first elements claim a huge shape
    let out = lqa(
        &[
            "--max-tensor-bytes",
            "1000000",
            "-e",
            "let big = []; big.pad(2000, 0.0); let a = [big]; a.pad(2000, 1.0); tensor(a)",
        ],
        d,
        "",
    );
    assert_script_error(&out, &["tensor", "Tensor[2000, 2000] f32"]);
    // reshape with a hole whose known part overflows, and conversions that widen
    let out = lqa(
        &["-e", "ones([4]).reshape([-1, 4294967296, 4294967296, 2])"],
        d,
        "",
    );
    assert_script_error(&out, &["reshape", "overflows"]);
    let out = lqa(
        &[
            "--max-tensor-bytes",
            "600",
            "-e",
            "ones([100]).to_dtype(\"f64\")",
        ],
        d,
        "",
    );
    assert_script_error(&out, &["to_dtype", "Tensor[100] f64"]);
    // under the limit all is well
    let out = lqa(
        &["--max-tensor-bytes", "800", "-e", "zeros([10, 10]).sum()"],
        d,
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn the_repl_survives_a_tensor_bomb_and_a_too_big_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_tiny_chat_model(&d.join("model"), 5);
    let input = format!(
        "let x = 41;\nfn twice(n) {{ n * 2 }}\nzeros([100000, 100000, 100])\nx + 1\n\
         let m = load_model({:?});\ntwice(x)\n",
        model.display().to_string()
    );
    // 10 kB: the tiny model's weights do not fit
    let out = lqa(&["--max-tensor-bytes", "10000"], d, &input);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let all = format!("{stdout}\n{stderr}");
    assert!(
        all.contains("zeros: Tensor[100000, 100000, 100] f32"),
        "{all}"
    );
    assert!(stdout.contains("42"), "the REPL lost `x`: {all}");
    assert!(stdout.contains("82"), "the REPL lost `twice`: {all}");
    assert!(all.contains("weight `model."), "{all}");
    assert!(all.contains("over the tensor limit"), "{all}");
}

#[test]
fn a_model_bigger_than_memory_is_an_error_before_loading() {
    let Some(mem) = lqa::budget::physical_memory() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_tiny_chat_model(&d.join("model"), 5);
    // a sparse safetensors file declaring 1.5 x physical memory of f32 weights
    let rows = mem / 256 * 3 / 2;
    let header = format!(
        r#"{{"model.embed_tokens.weight":{{"dtype":"F32","shape":[{rows},64],"data_offsets":[0,{}]}}}}"#,
        rows * 256
    );
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let path = model.join("model.safetensors");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    if f.set_len(8 + header.len() as u64 + rows * 256).is_err() {
        return; // a file system without sparse files
    }
    drop(f);
    let code = format!("load_model({:?})", model.display().to_string());
    let out = lqa(&["--max-tensor-bytes", "0", "-e", &code], d, "");
    assert_script_error(
        &out,
        &["weights need", "more than this machine's memory", "bf16"],
    );
    // with the default per-tensor limit the one tensor is already too big
    let out = lqa(&["-e", &code], d, "");
    assert_script_error(
        &out,
        &["model.embed_tokens.weight", "over the tensor limit"],
    );
}

#[test]
fn a_non_finite_steering_vector_names_the_hook_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_tiny_chat_model(&d.join("model"), 5);
    let code = format!(
        "let m = load_model({:?});\n\
         let a = []; for i in 0..{} {{ a.push(if i == 5 {{ 0.0 }} else {{ 1.0 }}); }}\n\
         let v = ones([{}]) / tensor(a);\n\
         m.run_with_hooks(\"hello\", [add(\"blocks.1.hook_resid_post\", v, \"all\")], #{{max_new_tokens: 2}})",
        model.display().to_string(),
        common::D,
        common::D
    );
    let out = lqa(&["-e", &code], d, "");
    assert_script_error(
        &out,
        &["add at blocks.1.hook_resid_post", "inf at index [5]"],
    );
    // a per-position patch: NaN in row 1
    let code = format!(
        "let m = load_model({:?});\n\
         let v = zeros([2, {}]);\n\
         let w = tensor([[1.0], [0.0]]);\n\
         m.run_with_hooks(\"hello\", [patch(\"blocks.0.hook_resid_post\", v / w, [0, 1])], #{{}})",
        model.display().to_string(),
        common::D
    );
    let out = lqa(&["-e", &code], d, "");
    assert_script_error(
        &out,
        &["patch at blocks.0.hook_resid_post", "NaN at index [1, 0]"],
    );
}

#[test]
fn a_non_finite_loss_stops_lit_with_the_checkpoint_intact() {
    use lqa::lit::trainer::{TrainConfig, Trainer};
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_tiny_chat_model(&r.join("model"), 11);
    write_toy_latentqa_data(&r.join("data"));
    let target = std::sync::Arc::new(
        lqa::lm::LanguageModel::load(r.join("model").to_str().unwrap(), &Default::default())
            .unwrap(),
    );
    let cfg = TrainConfig {
        data_dir: r.join("data"),
        out_dir: r.join("run"),
        eval_fraction: 0.34,
        seed: 3,
        batch_size: 4,
        grad_accum: 1,
        // an absurd learning rate: the first update sends the LoRA weights to 1e30
        lr: 1e30,
        warmup_steps: 0,
        max_steps: Some(6),
        min_read_layer: 0,
        max_read_layer: 1,
        write_layer: 0,
        eval_every: 0,
        checkpoint_every: 1,
        ema: None,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(target, cfg).unwrap();
    let mut seen = vec![];
    let err = t
        .train(|s| {
            seen.push(s.step);
            Ok(true)
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not finite") || err.contains("NaN") || err.contains("inf"),
        "{err}"
    );
    assert!(err.contains("training stopped before"), "{err}");
    println!("{err}");
    let last = *seen.last().expect("at least the first step ran");
    assert!(err.contains(&format!("step {}", last + 1)), "{err}");
    // the checkpoint is the last good step's, complete, and loads
    let ck = r.join("run/checkpoint");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"].as_u64(), Some(last as u64), "{state}");
    let adapter = std::fs::read_dir(&ck)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().join("adapter_model.safetensors").exists())
        .map(|e| e.path())
        .unwrap_or_else(|| ck.clone());
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, t) in tensors {
        assert!(
            lqa::hooks::first_non_finite(&t).unwrap().is_none(),
            "{name} in the checkpoint is not finite"
        );
    }
}
