//! `import "name" as m;`: modules come from the importing file's own folder first (the current
//! directory for `-e` and the REPL), then from a stdlib folder (`$LQA_STDLIB` or the source
//! tree's, see [`crate::assets`]), then from the stdlib embedded in the binary.
//!
//! This is rhai's `FileModuleResolver` + `ModuleResolversCollection` idea in one small resolver,
//! written out so that (1) a module's source is its full file path, so that errors inside it name
//! that file, (2) a module changed on disk is reloaded (the REPL), and (3) circular imports are an
//! error instead of a stack overflow.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};

type SharedModule = Shared<Module>;

use super::error::script_err;

pub use crate::assets::STDLIB_ENV;

/// The stdlib folder read before the embedded modules: [`crate::assets::stdlib_dir`].
pub fn find_stdlib() -> Option<PathBuf> {
    crate::assets::stdlib_dir()
}

/// What `import "name"` found: a file, or a module embedded in the binary.
enum ModuleFile {
    File(PathBuf),
    Embedded(&'static str, &'static str),
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

    /// The file `import "name"` loads, if any (not counting the embedded stdlib).
    pub fn find(&self, source: Option<&str>, name: &str) -> Option<PathBuf> {
        if source.is_some_and(is_embedded) {
            return None;
        }
        self.candidates(source, name)
            .into_iter()
            .find(|p| p.is_file())
    }

    /// What `import "name"` loads: a file, else an embedded stdlib module. Embedded modules
    /// import only each other.
    fn locate(&self, source: Option<&str>, name: &str) -> Option<ModuleFile> {
        if let Some(file) = self.find(source, name) {
            return Some(ModuleFile::File(file));
        }
        let file = if name.ends_with(".rhai") {
            name.to_string()
        } else {
            format!("{name}.rhai")
        };
        crate::assets::STDLIB
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(f, code)| ModuleFile::Embedded(f, code))
    }

    fn load(
        &self,
        engine: &Engine,
        found: ModuleFile,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let (shown, key, mtime) = match &found {
            ModuleFile::File(file) => (
                file.display().to_string(),
                file.canonicalize().unwrap_or_else(|_| file.to_path_buf()),
                std::fs::metadata(file).and_then(|m| m.modified()).ok(),
            ),
            ModuleFile::Embedded(name, _) => {
                let shown = crate::assets::embedded_source(name);
                (shown.clone(), PathBuf::from(shown), None)
            }
        };
        let in_module = |err: Box<EvalAltResult>| -> Box<EvalAltResult> {
            EvalAltResult::ErrorInModule(shown.clone(), err, pos).into()
        };
        if let Some((when, module)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            if *when == mtime {
                return Ok(module.clone());
            }
        }
        if !self
            .loading
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone())
        {
            return Err(in_module(script_err(
                format!("circular import: {shown} imports itself (directly or not)"),
                Position::NONE,
            )));
        }
        let compiled = match found {
            ModuleFile::File(file) => engine.compile_file(file),
            ModuleFile::Embedded(_, code) => engine.compile(code).map_err(Into::into),
        };
        let result = compiled.and_then(|mut ast| {
            ast.set_source(shown.as_str());
            Module::eval_ast_as_new(Scope::new(), &ast, engine)
        });
        self.loading
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        let module: SharedModule = result.map_err(in_module)?.into();
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (mtime, module.clone()));
        Ok(module)
    }
}

/// Whether `source` names an embedded stdlib module.
fn is_embedded(source: &str) -> bool {
    source.starts_with("<stdlib>/")
}

impl ModuleResolver for ScriptResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        match self.locate(source, path) {
            Some(found) => self.load(engine, found, pos),
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
