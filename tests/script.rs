//! The script engine in-process: tensor values, errors and their positions, files, modules.

use std::path::Path;

use lqa::script::{Runtime, RuntimeOptions};
use rhai::{Array, Dynamic};

fn runtime() -> Runtime {
    Runtime::new(RuntimeOptions::default())
}

fn eval(code: &str) -> Dynamic {
    runtime()
        .eval(code)
        .unwrap_or_else(|e| panic!("{code}: {e}"))
}

fn eval_f64(code: &str) -> f64 {
    eval(code)
        .as_float()
        .unwrap_or_else(|t| panic!("{code}: got {t}"))
}

fn eval_err(code: &str) -> String {
    match runtime().eval(code) {
        Ok(v) => panic!("{code}: expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// A nested script array of numbers as nested Vecs, for comparisons.
fn floats(v: &Dynamic) -> Vec<f64> {
    if let Ok(x) = v.as_float() {
        return vec![x];
    }
    if let Ok(x) = v.as_int() {
        return vec![x as f64];
    }
    v.clone()
        .into_array()
        .unwrap_or_else(|t| panic!("not an array: {t}"))
        .iter()
        .flat_map(floats)
        .collect()
}

fn ints(v: Dynamic) -> Vec<i64> {
    v.into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.as_int().unwrap())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5 * (1.0 + b.abs())
}

fn assert_values(code: &str, want: &[f64]) {
    let got = floats(&eval(code));
    assert_eq!(got.len(), want.len(), "{code}: got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w), "{code}: got {got:?}, want {want:?}");
    }
}

const T: &str = "let t = tensor([[1, 2, 3], [4, 5, 6]]);";

#[test]
fn tensor_construction_and_properties() {
    assert_eq!(ints(eval(&format!("{T} t.shape"))), [2, 3]);
    assert_eq!(eval(&format!("{T} t.dtype")).to_string(), "f32");
    assert_eq!(eval(&format!("{T} t.rank")).as_int().unwrap(), 2);
    assert_eq!(ints(eval("zeros([4, 0, 2]).shape")), [4, 0, 2]);
    assert_values("ones([2, 2]).to_array()", &[1.0; 4]);
    assert_values("tensor([1.5, -2]).to_array()", &[1.5, -2.0]);
    // Seeded: the same seed gives the same values, another seed others.
    let a = floats(&eval("randn([3, 4], 7).to_array()"));
    let b = floats(&eval("randn([3, 4], 7).to_array()"));
    let c = floats(&eval("randn([3, 4], 8).to_array()"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(eval_f64("randn([20000], 1).std()") > 0.95);
}

#[test]
fn tensor_display() {
    assert_eq!(
        eval(&format!("{T} t.to_string()")).to_string(),
        "Tensor[2, 3] f32 [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]"
    );
    assert_eq!(
        eval(&format!("{T} `${{t}}`")).to_string(),
        "Tensor[2, 3] f32 [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]"
    );
    let shown = runtime().show(&eval(&format!("{T} [t[0], 1]")));
    assert_eq!(shown, "[Tensor[3] f32 [1.0, 2.0, 3.0], 1]");
}

#[test]
fn tensor_arithmetic() {
    assert_values(
        &format!("{T} (t + t).to_array()"),
        &[2., 4., 6., 8., 10., 12.],
    );
    assert_values(
        &format!("{T} (t - tensor([1, 1, 1])).to_array()"),
        &[0., 1., 2., 3., 4., 5.],
    );
    assert_values(
        &format!("{T} (t * tensor([[2], [10]])).to_array()"),
        &[2., 4., 6., 40., 50., 60.],
    );
    assert_values(
        &format!("{T} (t / tensor([1, 2, 4])).to_array()"),
        &[1., 1., 0.75, 4., 2.5, 1.5],
    );
    assert_values(
        &format!("{T} (t + 1).to_array()"),
        &[2., 3., 4., 5., 6., 7.],
    );
    assert_values(
        &format!("{T} (1.5 * t).to_array()"),
        &[1.5, 3., 4.5, 6., 7.5, 9.],
    );
    assert_values(
        &format!("{T} (10 - t).to_array()"),
        &[9., 8., 7., 6., 5., 4.],
    );
    assert_values(
        &format!("{T} (t - 0.5).to_array()"),
        &[0.5, 1.5, 2.5, 3.5, 4.5, 5.5],
    );
    assert_values(
        &format!("{T} (6 / t).to_array()"),
        &[6., 3., 2., 1.5, 1.2, 1.],
    );
    assert_values(
        &format!("{T} (t / 2).to_array()"),
        &[0.5, 1., 1.5, 2., 2.5, 3.],
    );
    assert_values(
        &format!("{T} (-t).to_array()"),
        &[-1., -2., -3., -4., -5., -6.],
    );
    assert_values(
        &format!("{T} t += 1; t.to_array()"),
        &[2., 3., 4., 5., 6., 7.],
    );
    // Mixed dtypes are promoted.
    assert_values(
        "(tensor([1, 2]).to_dtype(\"bf16\") + tensor([0.5, 0.5])).to_array()",
        &[1.5, 2.5],
    );
}

#[test]
fn tensor_reductions() {
    assert_eq!(eval_f64(&format!("{T} t.sum()")), 21.0);
    assert_eq!(eval_f64(&format!("{T} t.mean()")), 3.5);
    assert!(close(
        eval_f64(&format!("{T} t.std()")),
        (35.0f64 / 12.0).sqrt()
    ));
    assert_eq!(eval_f64(&format!("{T} t.max()")), 6.0);
    assert_eq!(eval_f64(&format!("{T} t.min()")), 1.0);
    assert_eq!(eval(&format!("{T} t.argmax()")).as_int().unwrap(), 5);
    assert!(close(eval_f64(&format!("{T} t.norm()")), 91f64.sqrt()));
    assert_values(&format!("{T} t.mean(0).to_array()"), &[2.5, 3.5, 4.5]);
    assert_values(&format!("{T} t.sum(1).to_array()"), &[6., 15.]);
    assert_values(
        &format!("{T} t.norm(1).to_array()"),
        &[14f64.sqrt(), 77f64.sqrt()],
    );
    assert_eq!(eval_f64(&format!("{T} t[0].dot(t[1])")), 32.0);
    assert!(close(eval_f64(&format!("{T} t[0].cosine(t[0] * 3)")), 1.0));
    assert!(close(
        eval_f64("tensor([1, 0]).cosine(tensor([0, 2]))"),
        0.0
    ));
    assert_eq!(eval_f64("tensor([[7]]).item()"), 7.0);
    let top = eval("tensor([0.1, 0.9, 0.5, 0.7]).topk(2)")
        .into_array()
        .unwrap();
    assert_eq!(top.len(), 2);
    let first = top[0].clone().into_array().unwrap();
    assert_eq!(first[0].as_int().unwrap(), 1);
    assert!(close(first[1].as_float().unwrap(), 0.9));
    assert_eq!(top[1].clone().into_array().unwrap()[0].as_int().unwrap(), 3);
}

#[test]
fn tensor_indexing_and_views() {
    assert_values(&format!("{T} t[1].to_array()"), &[4., 5., 6.]);
    assert_values(&format!("{T} t[-1].to_array()"), &[4., 5., 6.]);
    assert_values(&format!("{T} t[0][-1].to_array()"), &[3.]);
    assert_eq!(ints(eval(&format!("{T} t[0].shape"))), [3]);
    assert_values(&format!("{T} t.slice(1, 2).to_array()"), &[4., 5., 6.]);
    assert_eq!(ints(eval(&format!("{T} t.slice(1, 2).shape"))), [1, 3]);
    assert_values(
        &format!("{T} t.narrow(1, 1, 2).to_array()"),
        &[2., 3., 5., 6.],
    );
    assert_values(&format!("{T} t.select(1, 2).to_array()"), &[3., 6.]);
    assert_eq!(ints(eval(&format!("{T} t.reshape([3, -1]).shape"))), [3, 2]);
    assert_values(
        &format!("{T} t.transpose(0, 1).to_array()"),
        &[1., 4., 2., 5., 3., 6.],
    );
    assert_values(
        &format!("{T} t.to_f32().to_array()"),
        &[1., 2., 3., 4., 5., 6.],
    );
    assert_eq!(
        eval(&format!("{T} t.to_dtype(\"f16\").dtype")).to_string(),
        "f16"
    );
}

#[test]
fn index_errors_name_the_index_and_the_position() {
    assert_eq!(
        eval_err(&format!("{T}\nt[2]")),
        "<eval>:2:2: index 2 out of range for dim 0 of size 2 (Tensor[2, 3] f32)"
    );
    assert_eq!(
        eval_err(&format!("{T}\nt[-3]")),
        "<eval>:2:2: index -3 out of range for dim 0 of size 2 (Tensor[2, 3] f32)"
    );
    assert_eq!(
        eval_err(&format!("{T}\nt.narrow(0, -1, 1)")),
        "<eval>:2:3: start must be >= 0, got -1"
    );
    assert!(eval_err(&format!("{T} t.select(-1, 0)")).ends_with("dim must be >= 0, got -1"));
    assert!(eval_err(&format!("{T} t.sum(2)"))
        .ends_with("dim 2 out of range for Tensor[2, 3] f32 (rank 2)"));
    assert!(eval_err(&format!("{T} t.slice(1, 5)")).contains("past the end of dim 0 of size 2"));
    assert!(eval_err("tensor([1, 2]).item()").contains("exactly 1 element"));
    assert!(eval_err("tensor([[1, 2], [3]])").contains("ragged"));
    assert!(eval_err("tensor([1, \"x\"])").contains("[1] is a string, not a number"));
    assert!(eval_err("zeros([2, -1])").contains("shape[1] must be >= 0, got -1"));
    assert!(eval_err(&format!("{T} t.to_dtype(\"f99\")")).contains("unknown dtype `f99`"));
}

#[test]
fn shape_errors_name_both_shapes() {
    let e = eval_err(&format!("{T}\nlet u = t + tensor([1, 2]);"));
    assert_eq!(
        e,
        "<eval>:2:11: cannot add Tensor[2, 3] f32 and Tensor[2] f32: shapes do not broadcast"
    );
    let e = eval_err(&format!("{T} t.reshape([4, 2])"));
    assert!(
        e.contains("cannot reshape Tensor[2, 3] f32 (6 elements) to [4, 2] (8 elements)"),
        "{e}"
    );
    let e = eval_err(&format!("{T} t.dot(tensor([1, 2]))"));
    assert!(e.contains("Tensor[2, 3] f32 and Tensor[2] f32"), "{e}");
}

#[test]
fn tensors_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/t.safetensors");
    let many = dir.path().join("many.safetensors");
    let code = format!(
        r#"{T}
        t.save("{p}");
        let u = load_tensor("{p}");
        save_tensors(#{{ a: t, b: t[0] * 2 }}, "{m}");
        let m = load_tensors("{m}");
        [u.to_array(), m.a.to_array(), m.b.to_array(), m.keys()]"#,
        p = path.display(),
        m = many.display(),
    );
    let out = eval(&code).into_array().unwrap();
    assert_eq!(floats(&out[0]), [1., 2., 3., 4., 5., 6.]);
    assert_eq!(floats(&out[1]), [1., 2., 3., 4., 5., 6.]);
    assert_eq!(floats(&out[2]), [2., 4., 6.]);
    assert_eq!(out[3].to_string(), r#"["a", "b"]"#);
    // Atomic write: no temporary file left beside the result.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(names.len(), 1);

    let missing = dir.path().join("missing.safetensors");
    let e = eval_err(&format!("load_tensor(\"{}\")", missing.display()));
    assert!(
        e.starts_with("<eval>:1:1: ") && e.contains("missing.safetensors"),
        "{e}"
    );
    let e = eval_err(&format!("load_tensor(\"{}\")", many.display()));
    assert!(e.contains("use load_tensors"), "{e}");
}

#[test]
fn json_and_text_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.json");
    let code = format!(
        r#"write_json("{p}", #{{ name: "x", n: 3, xs: [1.5, ()], t: tensor([1, 2]) }});
        let back = read_json("{p}");
        [back.name, back.n, back.xs, back.t, file_exists("{p}")]"#,
        p = path.display()
    );
    let out = eval(&code).into_array().unwrap();
    assert_eq!(out[0].to_string(), "x");
    assert_eq!(out[1].as_int().unwrap(), 3);
    assert_eq!(out[2].to_string(), "[1.5, ()]");
    assert_eq!(floats(&out[3]), [1., 2.]);
    assert!(out[4].as_bool().unwrap());

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\n  \"a\": 1,\n  oops\n}").unwrap();
    let e = eval_err(&format!("read_json(\"{}\")", bad.display()));
    assert!(
        e.contains("bad.json: invalid JSON") && e.contains("line 3 column 3"),
        "{e}"
    );

    let text = dir.path().join("a.txt");
    let code = format!(
        "write_text(\"{p}\", \"hi\"); read_text(\"{p}\")",
        p = text.display()
    );
    assert_eq!(eval(&code).to_string(), "hi");
    assert!(eval("timestamp()").to_string().ends_with('Z'));
    assert!(eval("env(\"LQA_SURELY_UNSET_VARIABLE\")").is_unit());
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_file_sees_args() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(
        dir.path(),
        "args.rhai",
        "#!/usr/bin/env lqa\nARGS.len() * 10 + ARGS[1].len()",
    );
    let out = runtime()
        .run_file(&script, vec!["a".into(), "bcd".into()])
        .unwrap();
    assert_eq!(out.as_int().unwrap(), 23);
}

#[test]
fn import_from_the_script_folder_and_from_stdlib() {
    let dir = tempfile::tempdir().unwrap();
    let stdlib = dir.path().join("std");
    write(&stdlib, "shared.rhai", "fn twice(x) { x * 2 }");
    write(
        dir.path(),
        "app/helper.rhai",
        "import \"shared\" as s;\nfn answer() { s::twice(21) }",
    );
    let main = write(
        dir.path(),
        "app/main.rhai",
        "import \"helper\" as h;\nimport \"shared\" as s;\nh::answer() + s::twice(1)",
    );
    let mut rt = Runtime::new(RuntimeOptions {
        stdlib: Some(stdlib.clone()),
        ..RuntimeOptions::default()
    });
    assert_eq!(rt.run_file(&main, vec![]).unwrap().as_int().unwrap(), 44);

    // The importing file's own folder wins over stdlib (for helper.rhai too).
    write(dir.path(), "app/shared.rhai", "fn twice(x) { x * 3 }");
    let mut rt = Runtime::new(RuntimeOptions {
        stdlib: Some(stdlib),
        ..RuntimeOptions::default()
    });
    assert_eq!(rt.run_file(&main, vec![]).unwrap().as_int().unwrap(), 66);

    let missing = write(dir.path(), "app/missing.rhai", "import \"nowhere\" as n;");
    let e = runtime().run_file(&missing, vec![]).unwrap_err();
    assert!(
        e.starts_with(&format!(
            "{}:1:8: module \"nowhere\" not found",
            missing.display()
        )),
        "{e}"
    );
}

#[test]
fn the_real_stdlib_fmt_module() {
    let rt = runtime();
    assert!(rt.stdlib().is_some_and(|d| d.join("fmt.rhai").is_file()));
    let out = eval(
        r#"import "fmt" as fmt;
        [fmt::fixed(3.14159, 2), fmt::fixed(-0.5, 3), fmt::bar(0.5, 1.0, 4),
         fmt::table([#{ word: "cat", p: 0.5 }, #{ word: "doggo", p: 0.25, n: 12 }])]"#,
    )
    .into_array()
    .unwrap();
    assert_eq!(out[0].to_string(), "3.14");
    assert_eq!(out[1].to_string(), "-0.500");
    assert_eq!(out[2].to_string(), "██··");
    assert_eq!(
        out[3].to_string(),
        "p       word   n\n------  -----  --\n0.5000  cat\n0.2500  doggo  12"
    );
}

#[test]
fn the_real_stdlib_steering_module() {
    let out = eval(
        r#"import "steering" as steering;
        [steering::keywords("promote_veganism"), steering::keywords("controls/pirate.json"),
         steering::keywords("unknown")]"#,
    )
    .into_array()
    .unwrap();
    let strings = |v: &rhai::Dynamic| -> Vec<String> {
        v.clone()
            .into_array()
            .unwrap()
            .into_iter()
            .map(|x| x.into_string().unwrap())
            .collect()
    };
    assert!(strings(&out[0]).contains(&"vegan".to_string()));
    assert!(
        strings(&out[1]).contains(&"matey".to_string()),
        "a path names the control"
    );
    assert!(strings(&out[2]).is_empty());
}

#[test]
fn syntax_errors_report_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "bad.rhai", "let x = 1;\nlet y = (x + ;\n");
    let e = runtime().run_file(&script, vec![]).unwrap_err();
    assert_eq!(
        e,
        format!("{}:2:14: syntax error: Unexpected ';'", script.display())
    );
}

#[test]
fn runaway_loops_hit_the_operations_limit() {
    let mut rt = Runtime::new(RuntimeOptions {
        max_ops: 10_000,
        ..RuntimeOptions::default()
    });
    let e = rt.eval("let x = 0;\nloop { x += 1; }").unwrap_err();
    assert!(e.starts_with("<eval>:2:"), "{e}");
    assert!(
        e.contains("too many operations (limit 10000)") && e.contains("--max-ops"),
        "{e}"
    );
}

#[test]
fn rust_errors_keep_the_script_position() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(
        dir.path(),
        "pos.rhai",
        "let t = zeros([3]);\nfn pick(t, i) {\n    t.select(0, i)\n}\nlet ok = pick(t, 1);\npick(t, 7);\n",
    );
    let e = runtime().run_file(&script, vec![]).unwrap_err();
    assert_eq!(
        e,
        format!(
            "{}:3:7: index 7 out of range for dim 0 of size 3 (Tensor[3] f32)",
            script.display()
        )
    );
}

#[test]
fn errors_inside_modules_name_the_module_file() {
    let dir = tempfile::tempdir().unwrap();
    let module = write(dir.path(), "lib.rhai", "fn f(t) {\n  t.slice(2, 1)\n}\n");
    let main = write(
        dir.path(),
        "main.rhai",
        "import \"lib\" as lib;\nlib::f(zeros([3]));\n",
    );
    let e = runtime().run_file(&main, vec![]).unwrap_err();
    assert_eq!(
        e,
        format!(
            "{}:2:5: slice: end 1 is before start 2 (from {}:2:6)",
            module.display(),
            main.display()
        )
    );

    let broken = write(dir.path(), "broken.rhai", "let a = 1;\nlet b = ;\n");
    let main = write(dir.path(), "main2.rhai", "import \"broken\" as b;\n");
    let e = runtime().run_file(&main, vec![]).unwrap_err();
    assert!(
        e.starts_with(&format!("{}:2:9: syntax error", broken.display())),
        "{e}"
    );

    write(dir.path(), "loop_a.rhai", "import \"loop_b\" as b;");
    write(dir.path(), "loop_b.rhai", "import \"loop_a\" as a;");
    let main = write(dir.path(), "main3.rhai", "import \"loop_a\" as a;");
    let e = runtime().run_file(&main, vec![]).unwrap_err();
    assert!(e.contains("circular import"), "{e}");
}

#[test]
fn thrown_errors_and_catch() {
    assert_eq!(
        eval_err("let x = 1;\n  throw \"bad input\";"),
        "<eval>:2:3: bad input"
    );
    // Errors from Rust functions can be caught by scripts.
    let v = eval("let r = \"no\"; try { zeros([2])[5]; } catch (e) { r = `caught: ${e}`; } r");
    assert_eq!(
        v.to_string(),
        "caught: index 5 out of range for dim 0 of size 2 (Tensor[2] f32)"
    );
}

#[test]
fn the_scope_persists_between_evaluations() {
    let mut rt = runtime();
    assert!(rt
        .eval("let x = 40; fn inc(v) { v + 1 }")
        .unwrap()
        .is_unit());
    assert!(rt.eval("import \"fmt\" as fmt;").unwrap().is_unit());
    assert_eq!(rt.eval("inc(x) + 1").unwrap().as_int().unwrap(), 42);
    assert_eq!(rt.eval("fmt::fixed(x, 1)").unwrap().to_string(), "40.0");
    rt.set_args(vec!["q".into()]);
    let args: Array = rt.eval("ARGS").unwrap().into_array().unwrap();
    assert_eq!(args.len(), 1);
}

/// Every shipped script and stdlib module parses (a syntax error in one would otherwise show
/// only when a user runs it).
#[test]
fn every_shipped_script_and_module_parses() {
    let rt = runtime();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["scripts", "stdlib"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rhai") {
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = rt.engine().compile(&text) {
                    panic!("{}: {e}", path.display());
                }
                n += 1;
            }
        }
    }
    assert!(n >= 10, "only {n} scripts found");
}
