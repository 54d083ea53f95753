//! `import "name" as m;`: modules come from the importing file's own folder first (the current
//! directory for `-e` and the REPL), then from the project's `stdlib/` folder.
//!
//! This is rhai's `FileModuleResolver` + `ModuleResolversCollection` idea in one small resolver,
//! written out so that (1) a module's source is its full file path, so that errors inside it name
//! that file, (2) a module changed on disk is reloaded (the REPL), and (3) circular imports are an
//! error instead of a stack overflow.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};

type SharedModule = Shared<Module>;

use super::error::script_err;

/// The environment variable naming the stdlib folder.
pub const STDLIB_ENV: &str = "LQA_STDLIB";

/// The `stdlib/` folder: `$LQA_STDLIB`, else the first `stdlib/` found walking up from the
/// executable, else walking up from this crate's source folder.
pub fn find_stdlib() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(STDLIB_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| find_up(exe.parent()?));
    from_exe.or_else(|| find_up(Path::new(env!("CARGO_MANIFEST_DIR"))))
}

fn find_up(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join("stdlib"))
        .find(|dir| dir.is_dir())
}

type Cached = (Option<SystemTime>, SharedModule);

/// Resolves `import` paths to `.rhai` files; see the module docs.
#[derive(Debug, Default)]
pub struct ScriptResolver {
    stdlib: Option<PathBuf>,
    cache: Mutex<HashMap<PathBuf, Cached>>,
    loading: Mutex<HashSet<PathBuf>>,
}

impl ScriptResolver {
    pub fn new(stdlib: Option<PathBuf>) -> Self {
        Self {
            stdlib,
            ..Self::default()
        }
    }

    pub fn stdlib(&self) -> Option<&Path> {
        self.stdlib.as_deref()
    }

    /// The files `import "name"` may mean, in search order, from code whose source is `source`
    /// (a file path, or `<eval>`-like names for code typed in).
    pub fn candidates(&self, source: Option<&str>, name: &str) -> Vec<PathBuf> {
        let mut file = PathBuf::from(name);
        if file.extension().is_none_or(|e| e != "rhai") {
            let mut s = file.into_os_string();
            s.push(".rhai");
            file = s.into();
        }
        if file.is_absolute() {
            return vec![file];
        }
        let here = source
            .filter(|s| !s.starts_with('<'))
            .and_then(|s| Path::new(s).parent())
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        let mut out = vec![match here {
            Some(dir) => dir.join(&file),
            None => file.clone(),
        }];
        if let Some(stdlib) = &self.stdlib {
            out.push(stdlib.join(&file));
        }
        out
    }

    /// The file `import "name"` loads, if any.
    pub fn find(&self, source: Option<&str>, name: &str) -> Option<PathBuf> {
        self.candidates(source, name)
            .into_iter()
            .find(|p| p.is_file())
    }

    fn load(
        &self,
        engine: &Engine,
        file: &Path,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let shown = file.display().to_string();
        let in_module = |err: Box<EvalAltResult>| -> Box<EvalAltResult> {
            EvalAltResult::ErrorInModule(shown.clone(), err, pos).into()
        };
        let key = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
        let mtime = std::fs::metadata(file).and_then(|m| m.modified()).ok();
        if let Some((when, module)) = self.cache.lock().unwrap().get(&key) {
            if *when == mtime {
                return Ok(module.clone());
            }
        }
        if !self.loading.lock().unwrap().insert(key.clone()) {
            return Err(in_module(script_err(
                format!("circular import: {shown} imports itself (directly or not)"),
                Position::NONE,
            )));
        }
        let result = engine.compile_file(file.to_path_buf()).and_then(|mut ast| {
            ast.set_source(shown.as_str());
            Module::eval_ast_as_new(Scope::new(), &ast, engine)
        });
        self.loading.lock().unwrap().remove(&key);
        let module: SharedModule = result.map_err(in_module)?.into();
        self.cache
            .lock()
            .unwrap()
            .insert(key, (mtime, module.clone()));
        Ok(module)
    }
}

impl ModuleResolver for ScriptResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        match self.find(source, path) {
            Some(file) => self.load(engine, &file, pos),
            None => Err(EvalAltResult::ErrorModuleNotFound(path.to_string(), pos).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_search_script_folder_then_stdlib() {
        let r = ScriptResolver::new(Some("/lib/std".into()));
        assert_eq!(
            r.candidates(Some("scripts/a.rhai"), "fmt"),
            vec![
                PathBuf::from("scripts/fmt.rhai"),
                PathBuf::from("/lib/std/fmt.rhai")
            ]
        );
        assert_eq!(
            r.candidates(Some("<repl>"), "x.rhai"),
            vec![PathBuf::from("x.rhai"), PathBuf::from("/lib/std/x.rhai")]
        );
        assert_eq!(
            r.candidates(None, "/abs/m"),
            vec![PathBuf::from("/abs/m.rhai")]
        );
    }
}
