//! The `lqa` binary: `-e`, scripts with arguments, errors and exit codes, Ctrl-C.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn lqa(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lqa"))
        .args(args)
        .current_dir(dir)
        .env_remove("LQA_LOG")
        .output()
        .expect("run lqa")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn eval_prints_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let out = lqa(&["-e", "1+2"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "3\n");

    // Strings print as they are, unit prints nothing, tensors print their preview.
    let out = lqa(&["-e", "\"a\" + \"b\""], dir.path());
    assert_eq!(text(&out.stdout), "ab\n");
    let out = lqa(&["-e", "let x = 1;"], dir.path());
    assert_eq!(text(&out.stdout), "");
    let out = lqa(&["-e", "ones([2])"], dir.path());
    assert_eq!(text(&out.stdout), "Tensor[2] f32 [1.0, 1.0]\n");
    // Positional arguments after -e are ARGS, even one named like a subcommand.
    let out = lqa(&["-e", "ARGS", "pull", "x"], dir.path());
    assert_eq!(text(&out.stdout), "[\"pull\", \"x\"]\n");
}

#[test]
fn a_script_sees_its_args() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pull.rhai"),
        "print(`n=${ARGS.len()} first=${ARGS[0]} last=${ARGS[ARGS.len() - 1]}`);",
    )
    .unwrap();
    // `pull.rhai` is a script, not the `pull` subcommand; flags after it are its arguments.
    let out = lqa(
        &["--max-ops", "100000", "pull.rhai", "a", "-v", "--x=1"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "n=3 first=a last=--x=1\n");
}

#[test]
fn a_failing_script_exits_nonzero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fail.rhai"),
        "let t = zeros([2, 3]);\nprint(\"before\");\nlet u = t +\n    tensor([1, 2]);\n",
    )
    .unwrap();
    let out = lqa(&["fail.rhai"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "before\n");
    assert_eq!(
        text(&out.stderr),
        "fail.rhai:3:11: cannot add Tensor[2, 3] f32 and Tensor[2] f32: shapes do not broadcast\n"
    );

    let out = lqa(&["--max-ops", "5000", "-e", "loop {}"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("<eval>:1:") && err.contains(": too many operations (limit 5000)"),
        "{err}"
    );

    let out = lqa(&["missing.rhai"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "missing.rhai: No such file or directory (os error 2)\n"
    );
}

#[test]
fn ctrl_c_stops_a_running_script() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lqa"))
        .args([
            "--max-ops",
            "0",
            "-e",
            "print(\"started\");\nlet i = 0;\nloop { i += 1; }",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the loop runs (the handler is installed before the script starts).
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let out = loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("lqa did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(out.status.code(), Some(130));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("<eval>:3:") && err.ends_with("interrupted (Ctrl-C)\n"),
        "{err}"
    );
}
