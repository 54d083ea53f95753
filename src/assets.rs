//! Where lqa finds what it ships: the Rhai stdlib, decoders, controls and data, so that an
//! installed `lqa` works without the checkout it was built from.
//!
//! - **stdlib** (`import "fmt"`): embedded in the binary ([`STDLIB`]). A folder named by
//!   `$LQA_STDLIB`, else the source tree's `stdlib/` (see below), is read instead when there is
//!   one, so that edits show without a rebuild.
//! - **decoders** (`decoders/MODEL/`), **controls** (`controls/NAME.json`) and **data**
//!   (`data/FILE`): the first of these folders that holds the asset wins ([`Roots`]):
//!   1. the folder of the running script (none for `-e` and the REPL),
//!   2. the working directory,
//!   3. `$LQA_HOME` (default `~/.cache/lqa`, also the model cache: [`crate::sources::lqa_home`]),
//!   4. the source tree: the first folder above the executable that holds `Cargo.toml` and
//!      `stdlib/` (a binary run from a checkout's `target/`).
//!
//!   `$LQA_DECODERS` (a folder of decoders) is searched before all of these for decoders.
//! - **LatentQA training data**: `$LQA_DATA`, else [`DEFAULT_LATENTQA_DATA`] ([`latentqa_data`]).

use std::fmt;
use std::path::{Path, PathBuf};

/// The stdlib modules compiled into the binary: `(file name, source)`.
pub const STDLIB: &[(&str, &str)] = &[
    ("fmt.rhai", include_str!("../stdlib/fmt.rhai")),
    ("lit.rhai", include_str!("../stdlib/lit.rhai")),
    ("questions.rhai", include_str!("../stdlib/questions.rhai")),
    ("steering.rhai", include_str!("../stdlib/steering.rhai")),
];

/// The environment variable naming a stdlib folder read instead of the embedded one.
pub const STDLIB_ENV: &str = "LQA_STDLIB";
/// The environment variable naming a folder of decoders searched first.
pub const DECODERS_ENV: &str = "LQA_DECODERS";
/// The environment variable naming the LatentQA training data folder.
pub const DATA_ENV: &str = "LQA_DATA";
/// The LatentQA training data when `$LQA_DATA` is not set: the paper's release next to the
/// working directory.
pub const DEFAULT_LATENTQA_DATA: &str = "../shared/latentqa-data";

/// The source of an embedded stdlib module (`<stdlib>/fmt.rhai`), as errors name it.
pub fn embedded_source(file: &str) -> String {
    format!("<stdlib>/{file}")
}

/// The embedded stdlib module `file` (`fmt.rhai`), if there is one.
pub fn embedded_stdlib(file: &str) -> Option<&'static str> {
    STDLIB.iter().find(|(f, _)| *f == file).map(|(_, s)| *s)
}

/// A stdlib folder to read instead of the embedded modules: `$LQA_STDLIB`, else the source
/// tree's `stdlib/`.
pub fn stdlib_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(STDLIB_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    source_tree().map(|t| t.join("stdlib"))
}

/// The LatentQA training data folder: `$LQA_DATA`, else [`DEFAULT_LATENTQA_DATA`].
pub fn latentqa_data() -> PathBuf {
    std::env::var_os(DATA_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LATENTQA_DATA))
}

/// The checkout the running executable was built in: the first folder above it holding
/// `Cargo.toml` and `stdlib/`.
pub fn source_tree() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    source_tree_above(exe.parent()?)
}

/// The first of `start` and its ancestors holding `Cargo.toml` and `stdlib/`.
pub fn source_tree_above(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join("stdlib").is_dir())
        .map(Path::to_path_buf)
}

/// A kind of asset found through [`Roots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `decoders/MODEL/` (a PEFT adapter: `adapter_config.json`, ...).
    Decoders,
    /// `controls/NAME.json`.
    Controls,
    /// `data/FILE`.
    Data,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Decoders, Kind::Controls, Kind::Data];

    /// The folder this kind lives in under each root.
    pub fn folder(self) -> &'static str {
        match self {
            Kind::Decoders => "decoders",
            Kind::Controls => "controls",
            Kind::Data => "data",
        }
    }

    /// Whether `path` (`FOLDER/name`) is this kind of asset.
    fn holds(self, path: &Path) -> bool {
        match self {
            Kind::Decoders => path.join("adapter_config.json").is_file(),
            Kind::Controls | Kind::Data => path.is_file(),
        }
    }
}

/// Where a root comes from, in search order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `$LQA_DECODERS` (decoders only).
    DecodersEnv,
    Script,
    WorkingDir,
    Home,
    SourceTree,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::DecodersEnv => "$LQA_DECODERS",
            Origin::Script => "next to the script",
            Origin::WorkingDir => "working directory",
            Origin::Home => "$LQA_HOME",
            Origin::SourceTree => "source tree",
        })
    }
}

/// An asset found: its path and the root it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub origin: Origin,
}

/// The folders assets are searched in (see the [module docs](self)); each is optional so that
/// tests can build any combination.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// `$LQA_DECODERS`: holds `MODEL/` folders directly.
    pub decoders_env: Option<PathBuf>,
    pub script_dir: Option<PathBuf>,
    pub working_dir: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub source_tree: Option<PathBuf>,
}

impl Roots {
    /// The roots of this process, for a script in `script_dir` (`None`: code typed in).
    pub fn current(script_dir: Option<&Path>) -> Self {
        Self {
            decoders_env: std::env::var_os(DECODERS_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            script_dir: script_dir.map(Path::to_path_buf),
            working_dir: std::env::current_dir().ok(),
            home: Some(crate::sources::lqa_home()),
            source_tree: source_tree(),
        }
    }

    /// The folders `kind` is searched in, first wins (they need not exist).
    pub fn folders(&self, kind: Kind) -> Vec<Found> {
        let mut out = Vec::new();
        if kind == Kind::Decoders {
            if let Some(d) = &self.decoders_env {
                out.push(Found {
                    path: d.clone(),
                    origin: Origin::DecodersEnv,
                });
            }
        }
        let roots = [
            (&self.script_dir, Origin::Script),
            (&self.working_dir, Origin::WorkingDir),
            (&self.home, Origin::Home),
            (&self.source_tree, Origin::SourceTree),
        ];
        for (root, origin) in roots {
            if let Some(r) = root {
                let path = r.join(kind.folder());
                if !out.iter().any(|f| f.path == path) {
                    out.push(Found { path, origin });
                }
            }
        }
        out
    }

    /// The first `FOLDER/name` of `kind` that exists.
    pub fn find(&self, kind: Kind, name: &str) -> Option<Found> {
        self.folders(kind).into_iter().find_map(|f| {
            let path = f.path.join(name);
            kind.holds(&path).then_some(Found {
                path,
                origin: f.origin,
            })
        })
    }
}

/// A control by name (`NAME` → `controls/NAME.json` through [`Roots`]) or by path (a name with
/// an extension or a folder). A name found nowhere is `controls/NAME.json`, so that the error
/// names the file that was expected.
pub fn control_path(name: &str, script_dir: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    if p.extension().is_some() || p.components().count() > 1 {
        return p.to_path_buf();
    }
    let file = format!("{name}.json");
    Roots::current(script_dir)
        .find(Kind::Controls, &file)
        .map(|f| f.path)
        .unwrap_or_else(|| Path::new("controls").join(file))
}

/// A shipped data file (`data/FILE`) through [`Roots`]; found nowhere, `data/FILE`.
pub fn data_file(file: &str, script_dir: Option<&Path>) -> PathBuf {
    Roots::current(script_dir)
        .find(Kind::Data, file)
        .map(|f| f.path)
        .unwrap_or_else(|| Path::new("data").join(file))
}

/// The decoder shipped for `model_name` (`decoders/MODEL/`) through [`Roots`].
pub fn decoder_dir(model_name: &str, script_dir: Option<&Path>) -> Option<PathBuf> {
    Roots::current(script_dir)
        .find(Kind::Decoders, model_name)
        .map(|f| f.path)
}

/// Where each kind of asset is found, one line per folder in search order (the first that
/// holds a name wins), as `lqa assets` prints it.
pub fn describe(roots: &Roots) -> String {
    let mut lines = Vec::new();
    let names = |dir: &Path, kind: Option<Kind>| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| kind.is_none_or(|k| k.holds(&e.path())))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let stdlib_env = std::env::var_os(STDLIB_ENV).filter(|d| !d.is_empty());
    if let Some(dir) = stdlib_dir() {
        let origin = if stdlib_env.is_some() {
            "$LQA_STDLIB"
        } else {
            "source tree"
        };
        let found = names(&dir, None).join(", ");
        lines.push(format!("stdlib    {origin:<19} {}: {found}", dir.display()));
    }
    let embedded: Vec<&str> = STDLIB.iter().map(|(f, _)| *f).collect();
    lines.push(format!(
        "stdlib    {:<19} {}",
        "embedded",
        embedded.join(", ")
    ));
    for kind in Kind::ALL {
        let mut any = false;
        for f in roots.folders(kind).into_iter().filter(|f| f.path.is_dir()) {
            any = true;
            let found = names(&f.path, Some(kind)).join(", ");
            lines.push(format!(
                "{:<9} {:<19} {}: {found}",
                kind.folder(),
                f.origin.to_string(),
                f.path.display()
            ));
        }
        if !any {
            lines.push(format!("{:<9} {:<19} none found", kind.folder(), "-"));
        }
    }
    let data = latentqa_data();
    let origin = if std::env::var_os(DATA_ENV).is_some_and(|d| !d.is_empty()) {
        "$LQA_DATA"
    } else {
        "default"
    };
    let state = if data.is_dir() { "" } else { " (missing)" };
    lines.push(format!("latentqa  {origin:<19} {}{state}", data.display()));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_in_search_order_without_duplicates() {
        let roots = Roots {
            decoders_env: Some("/env".into()),
            script_dir: Some("/s".into()),
            working_dir: Some("/s".into()),
            home: Some("/h".into()),
            source_tree: Some("/t".into()),
        };
        let paths = |k| -> Vec<PathBuf> { roots.folders(k).into_iter().map(|f| f.path).collect() };
        assert_eq!(
            paths(Kind::Decoders),
            ["/env", "/s/decoders", "/h/decoders", "/t/decoders"].map(PathBuf::from)
        );
        assert_eq!(
            paths(Kind::Controls),
            ["/s/controls", "/h/controls", "/t/controls"].map(PathBuf::from)
        );
    }

    #[test]
    fn embedded_stdlib_has_the_modules() {
        assert!(embedded_stdlib("fmt.rhai").is_some_and(|s| s.contains("fn table")));
        assert!(embedded_stdlib("questions.rhai").is_some());
        assert!(embedded_stdlib("nope.rhai").is_none());
    }
}
