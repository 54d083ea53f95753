//! Assets travel with the binary: the lookup order of decoders, controls and data (script folder,
//! working directory, `$LQA_HOME`, source tree), the embedded stdlib, and a copy of `lqa` run
//! from an empty folder with the checkout on no search path.

mod real;

use lqa::assets::{self, Kind, Origin, Roots};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn put(dir: &Path, rel: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, "{}").unwrap();
    p
}

/// Four roots, each a folder under `tmp`, holding `controls/c.json`, `data/d.json` and a
/// decoder `decoders/m/` in the roots named by `holders`.
fn roots(tmp: &Path, holders: &[&str]) -> Roots {
    for h in holders {
        let root = tmp.join(h);
        put(&root, "controls/c.json");
        put(&root, "data/d.json");
        put(&root, "decoders/m/adapter_config.json");
    }
    Roots {
        decoders_env: None,
        script_dir: Some(tmp.join("script")),
        working_dir: Some(tmp.join("cwd")),
        home: Some(tmp.join("home")),
        source_tree: Some(tmp.join("tree")),
    }
}

fn origins(r: &Roots) -> Vec<Option<Origin>> {
    [
        (Kind::Controls, "c.json"),
        (Kind::Data, "d.json"),
        (Kind::Decoders, "m"),
    ]
    .into_iter()
    .map(|(k, n)| r.find(k, n).map(|f| f.origin))
    .collect()
}

#[test]
fn the_script_folder_wins_over_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let r = roots(tmp.path(), &["script", "cwd", "home", "tree"]);
    assert_eq!(origins(&r), vec![Some(Origin::Script); 3]);
    let f = r.find(Kind::Decoders, "m").unwrap();
    assert_eq!(f.path, tmp.path().join("script/decoders/m"));
}

#[test]
fn the_working_directory_wins_over_lqa_home() {
    let tmp = tempfile::tempdir().unwrap();
    let r = roots(tmp.path(), &["cwd", "home", "tree"]);
    assert_eq!(origins(&r), vec![Some(Origin::WorkingDir); 3]);
}

#[test]
fn lqa_home_wins_over_the_source_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let r = roots(tmp.path(), &["home", "tree"]);
    assert_eq!(origins(&r), vec![Some(Origin::Home); 3]);
    let f = r.find(Kind::Controls, "c.json").unwrap();
    assert_eq!(f.path, tmp.path().join("home/controls/c.json"));
}

#[test]
fn the_source_tree_comes_last() {
    let tmp = tempfile::tempdir().unwrap();
    let r = roots(tmp.path(), &["tree"]);
    assert_eq!(origins(&r), vec![Some(Origin::SourceTree); 3]);
    let empty = tempfile::tempdir().unwrap();
    let r = roots(empty.path(), &[]);
    assert_eq!(origins(&r), vec![None; 3]);
    // a decoder folder without adapter files is not a decoder
    std::fs::create_dir_all(empty.path().join("home/decoders/m")).unwrap();
    assert_eq!(r.find(Kind::Decoders, "m"), None);
}

#[test]
fn lqa_decoders_is_searched_first_for_decoders() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = roots(tmp.path(), &["script"]);
    put(&tmp.path().join("env"), "m/adapter_config.json");
    r.decoders_env = Some(tmp.path().join("env"));
    let f = r.find(Kind::Decoders, "m").unwrap();
    assert_eq!(
        (f.origin, f.path),
        (Origin::DecodersEnv, tmp.path().join("env/m"))
    );
    assert_eq!(
        r.find(Kind::Controls, "c.json").unwrap().origin,
        Origin::Script
    );
}

#[test]
fn the_source_tree_is_found_above_the_test_binary() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().unwrap();
    let tree = assets::source_tree_above(exe.parent().unwrap()).unwrap();
    assert_eq!(tree.canonicalize().unwrap(), here.canonicalize().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(assets::source_tree_above(tmp.path()), None);
}

#[test]
fn every_stdlib_file_is_embedded_as_it_is() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("stdlib");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".rhai"))
        .collect();
    files.sort();
    let mut embedded: Vec<String> = assets::STDLIB.iter().map(|(f, _)| f.to_string()).collect();
    embedded.sort();
    assert_eq!(files, embedded);
    for (f, code) in assets::STDLIB {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), *code, "{f}");
    }
}

/// A copy of the `lqa` binary in an empty folder, run with `LQA_HOME` set to `home`.
struct Installed {
    _tmp: tempfile::TempDir,
    exe: PathBuf,
    home: PathBuf,
    work: PathBuf,
}

impl Installed {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        let home = tmp.path().join("home");
        let work = tmp.path().join("work");
        for d in [&bin, &home, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        let exe = bin.join("lqa");
        std::fs::copy(env!("CARGO_BIN_EXE_lqa"), &exe).unwrap();
        Installed {
            _tmp: tmp,
            exe,
            home,
            work,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.exe)
            .args(args)
            .current_dir(&self.work)
            .env("LQA_HOME", &self.home)
            .env_remove("LQA_STDLIB")
            .env_remove("LQA_DECODERS")
            .env_remove("LQA_DATA")
            .env_remove("LQA_LOG")
            .output()
            .expect("run lqa")
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_installed_binary_imports_the_embedded_stdlib() {
    let lqa = Installed::new();
    let out = lqa.run(&[
        "-e",
        r#"import "questions" as q; import "fmt" as fmt; fmt::fixed(1.0 * q::persona().len(), 1)"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let n: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(n > 0.0);

    let out = lqa.run(&["assets"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = text(&out);
    assert!(listing.contains("embedded"), "{listing}");
    assert!(!listing.contains("source tree"), "{listing}");
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    assert!(
        !listing.contains(&checkout.display().to_string()),
        "{listing}"
    );
}

/// Copy the shipped decoder's files (not its training record) into `dir`.
fn place_decoder(dir: &Path) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("decoders/smollm2-135m-instruct");
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lqa_decoder.json",
    ] {
        std::fs::copy(shipped.join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn an_installed_binary_finds_the_default_decoder_in_lqa_home_or_next_to_the_script() {
    // The model cache is $LQA_HOME/models: give the temporary home the model lqa fetched.
    let gguf = real::gguf_path();
    let lqa = Installed::new();
    std::fs::create_dir_all(lqa.home.join("models")).unwrap();
    std::os::unix::fs::symlink(
        gguf.parent().unwrap(),
        lqa.home
            .join("models")
            .join(gguf.parent().unwrap().file_name().unwrap()),
    )
    .unwrap();
    let app = lqa.work.join("app");
    std::fs::create_dir_all(&app).unwrap();
    let script = app.join("read.rhai");
    std::fs::write(
        &script,
        "let d = load_decoder(load_model(\"smollm2-135m-instruct\")); print(d.info().path);",
    )
    .unwrap();
    let script = script.display().to_string();

    let out = lqa.run(&[&script]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no decoder is shipped"),
        "{}",
        text(&out)
    );

    let in_home = lqa.home.join("decoders/smollm2-135m-instruct");
    place_decoder(&in_home);
    let out = lqa.run(&[&script]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        in_home.display().to_string()
    );

    let next_to = app.join("decoders/smollm2-135m-instruct");
    place_decoder(&next_to);
    let out = lqa.run(&[&script]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        next_to.display().to_string()
    );
}
