//! The Rhai layer: the only code that imports `rhai`. One file per exposed object, each with a
//! `pub fn register(engine: &mut Engine)`; [`register_all`] is the list of them.
//!
//! [`Runtime`] owns a configured [`Engine`] (limits, Ctrl-C, module lookup, print/debug) and a
//! persistent [`Scope`], so that the CLI, `-e` and the REPL all run code the same way.
//!
//! Adding an object (say `model.rs`): register the Rust type under its script name, take
//! `i64`/`f64` and convert with [`arg_usize`] (a negative value is an error naming the
//! argument), take a [`NativeCallContext`] first in fallible functions and turn `lqa::Error` /
//! candle errors into script errors at the call with [`ToScript::at`] or [`ctx_err`], return
//! tensors with [`tensor::to_dynamic`] (or as [`ScriptTensor`]), then add the `register` call
//! to [`register_all`]:
//!
//! ```ignore
//! pub fn register(engine: &mut Engine) {
//!     engine.register_type_with_name::<ScriptModel>("Model");
//!     engine.register_get("n_layers", |m: &mut ScriptModel| m.0.n_layers() as i64);
//!     engine.register_fn("hidden", |ctx: NativeCallContext, m: &mut ScriptModel, layer: i64| {
//!         let layer = arg_usize(&ctx, "layer", layer)?;
//!         m.0.hidden(layer).map(ScriptTensor).at(&ctx)
//!     });
//! }
//! ```
//!
//! Long Rust work should call [`crate::interrupt::check`] between steps: its error becomes a
//! Ctrl-C termination of the script.

pub mod control;
pub mod decoder;
pub mod error;
pub mod globals;
pub mod measures;
pub mod model;
pub mod modules;
pub mod options;
pub mod progress;
pub mod table;
pub mod tensor;
pub mod trainer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, EvalAltResult, NativeCallContext, Scope, AST};

pub use error::{ctx_err, script_err, ScriptResult, ToScript};
pub use modules::{find_stdlib, ScriptResolver};
pub use tensor::ScriptTensor;

/// Every object scripts can see. New bindings (model, decoder, trainer, ...) are added here.
pub fn register_all(engine: &mut Engine) {
    globals::register(engine);
    table::register(engine);
    tensor::register(engine);
    model::register(engine);
    decoder::register(engine);
    decoder::register_eval(engine);
    trainer::register(engine);
    control::register(engine);
    measures::register(engine);
}

/// A serialisable value (step statistics...) as a script map.
pub fn to_map(v: &impl serde::Serialize) -> rhai::Map {
    globals::json_to_dynamic(serde_json::to_value(v).expect("json"))
        .try_cast::<rhai::Map>()
        .unwrap_or_default()
}

/// Source names for code that is not in a file.
pub const EVAL_SOURCE: &str = "<eval>";
pub const REPL_SOURCE: &str = "<repl>";

/// Limits and lookup paths of a [`Runtime`]. A limit of 0 means "no limit".
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Operations a script may run before it is stopped (a runaway loop).
    pub max_ops: u64,
    /// Nested script function calls.
    pub max_call_depth: usize,
    /// Nesting of expressions at top level / inside functions (parser limits).
    pub max_expr_depth: usize,
    pub max_fn_expr_depth: usize,
    /// Bytes in a string, elements in an array, entries in a map.
    pub max_string: usize,
    pub max_array: usize,
    pub max_map: usize,
    /// Bytes of the largest tensor one operation may make (0 = no limit); checked before
    /// allocating (see [`crate::budget`]). Default: half of physical memory.
    pub max_tensor_bytes: u64,
    /// The stdlib folder; `None` finds it with [`find_stdlib`].
    pub stdlib: Option<PathBuf>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            max_ops: 200_000_000,
            max_call_depth: 64,
            max_expr_depth: 64,
            max_fn_expr_depth: 32,
            max_string: 64 << 20,
            max_array: 10_000_000,
            max_map: 1_000_000,
            max_tensor_bytes: crate::budget::default_max_tensor_bytes(),
            stdlib: None,
        }
    }
}

/// A configured engine plus the state that persists between evaluations (variables, functions
/// defined so far, imports typed into the REPL).
pub struct Runtime {
    engine: Engine,
    scope: Scope<'static>,
    /// Functions defined by earlier `eval` / `run_file` calls (their statements are dropped).
    functions: AST,
    /// `import` statements typed earlier, re-run before each later evaluation.
    imports: Vec<String>,
    imports_ast: AST,
    hints: error::LimitHints,
    resolver: Arc<ScriptResolver>,
    /// Whether the last [`Runtime::run_file`] / [`Runtime::eval`] error was a Ctrl-C.
    interrupted: bool,
    /// The tensor limit set on the evaluating thread while code runs.
    max_tensor_bytes: u64,
}

impl Runtime {
    pub fn new(opts: RuntimeOptions) -> Self {
        let stdlib = opts.stdlib.clone().or_else(find_stdlib);
        let mut engine = Engine::new();
        engine
            .set_max_operations(opts.max_ops)
            .set_max_call_levels(opts.max_call_depth)
            .set_max_expr_depths(opts.max_expr_depth, opts.max_fn_expr_depth)
            .set_max_string_size(opts.max_string)
            .set_max_array_size(opts.max_array)
            .set_max_map_size(opts.max_map);
        engine.on_progress(|_| {
            if crate::interrupt::requested() {
                Some(error::interrupt_token())
            } else {
                None
            }
        });
        engine.on_print(|s| println!("{s}"));
        engine.on_debug(|s, source, pos| {
            let source = source.unwrap_or(EVAL_SOURCE);
            eprintln!("{}: {s}", error::format_location(source, pos));
        });
        let resolver = Arc::new(ScriptResolver::new(stdlib.clone()));
        engine.set_module_resolver(SharedResolver(resolver.clone()));
        register_all(&mut engine);

        let mut scope = Scope::new();
        scope.push("ARGS", Array::new());
        Self {
            engine,
            scope,
            functions: AST::empty(),
            imports: Vec::new(),
            imports_ast: AST::empty(),
            interrupted: false,
            max_tensor_bytes: opts.max_tensor_bytes,
            hints: error::LimitHints {
                max_ops: opts.max_ops,
                max_call_depth: opts.max_call_depth,
                max_string: opts.max_string,
                max_array: opts.max_array,
                max_map: opts.max_map,
                stdlib,
            },
            resolver,
        }
    }

    /// Register more bindings (for embedders and tests).
    pub fn register_with(&mut self, f: impl FnOnce(&mut Engine)) -> &mut Self {
        f(&mut self.engine);
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn scope(&self) -> &Scope<'static> {
        &self.scope
    }

    pub fn scope_mut(&mut self) -> &mut Scope<'static> {
        &mut self.scope
    }

    /// Functions defined so far (REPL input, `:load`ed files).
    pub fn functions(&self) -> &AST {
        &self.functions
    }

    pub fn resolver(&self) -> &ScriptResolver {
        &self.resolver
    }

    /// The stdlib folder modules are imported from, if one was found.
    pub fn stdlib(&self) -> Option<&Path> {
        self.hints.stdlib.as_deref()
    }

    /// Set `ARGS`, the array of strings scripts see.
    pub fn set_args(&mut self, args: Vec<String>) {
        let args: Array = args.into_iter().map(Dynamic::from).collect();
        self.scope.set_or_push("ARGS", args);
    }

    /// Run a script file with `ARGS` set to `args`. The error is the one line to show.
    pub fn run_file(
        &mut self,
        path: impl AsRef<Path>,
        args: Vec<String>,
    ) -> Result<Dynamic, String> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let code = read_script(path).map_err(|e| e.to_string())?;
        self.set_args(args);
        let result = self.eval_raw(&code, &source);
        result.map_err(|e| self.failure(&e, &source))
    }

    /// [`Runtime::run_file`] without setting `ARGS` and with the raw error.
    pub fn run_file_raw(&mut self, path: &Path) -> ScriptResult<Dynamic> {
        let code = read_script(path).to_script(rhai::Position::NONE)?;
        self.eval_raw(&code, &path.display().to_string())
    }

    /// Evaluate a snippet (`lqa -e`) in the persistent scope. The error is the one line to show.
    pub fn eval(&mut self, code: &str) -> Result<Dynamic, String> {
        let result = self.eval_raw(code, EVAL_SOURCE);
        result.map_err(|e| self.failure(&e, EVAL_SOURCE))
    }

    /// The one line to show for an error of [`Runtime::run_file`] / [`Runtime::eval`],
    /// remembering whether it was a Ctrl-C (see [`Runtime::interrupted`]).
    fn failure(&mut self, err: &EvalAltResult, source: &str) -> String {
        self.interrupted = error::is_interrupt(err);
        self.format_error(err, source)
    }

    /// Was the error of the last [`Runtime::run_file`] / [`Runtime::eval`] a Ctrl-C (so that
    /// the CLI exits with 130)?
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Compile and run `code` (named `source` in errors) in the persistent scope, keeping the
    /// functions it defines for later evaluations.
    pub fn eval_raw(&mut self, code: &str, source: &str) -> ScriptResult<Dynamic> {
        crate::interrupt::clear();
        let _limit = crate::budget::scoped(self.max_tensor_bytes);
        let mut ast = self.engine.compile_with_scope(&self.scope, code)?;
        ast.set_source(source);
        let mut full = if self.imports.is_empty() {
            ast
        } else {
            self.imports_ast.merge(&ast)
        };
        if self.functions.has_functions() {
            full = self.functions.merge(&full);
        }
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut self.scope, &full);
        full.clear_statements();
        self.functions = full;
        if result.is_ok() {
            self.remember_imports(code);
        }
        crate::interrupt::clear();
        result
    }

    /// Remember the `import` lines of successfully run REPL input, so that later input still
    /// sees the modules (each evaluation otherwise starts with no imports).
    fn remember_imports(&mut self, code: &str) {
        let mut changed = false;
        for line in code.lines().map(str::trim) {
            if line.starts_with("import ") && !self.imports.iter().any(|l| l == line) {
                let line = if line.ends_with(';') {
                    line.to_string()
                } else {
                    format!("{line};")
                };
                self.imports.push(line);
                changed = true;
            }
        }
        if changed {
            match self.engine.compile(self.imports.join("\n")) {
                Ok(mut ast) => {
                    ast.set_source(REPL_SOURCE);
                    self.imports_ast = ast;
                }
                Err(_) => {
                    // Not a simple import line after all: forget it.
                    self.imports.pop();
                }
            }
        }
    }

    /// The one-line message for an error from code whose outermost source is `source`.
    pub fn format_error(&self, err: &EvalAltResult, source: &str) -> String {
        error::format_error(err, source, &self.hints)
    }

    /// How the REPL shows a value: Rhai's `to_debug` (so tensors in arrays print well).
    pub fn show(&self, value: &Dynamic) -> String {
        if let Some(rows) = value.read_lock::<Array>() {
            if let Some(cols) = table::uniform_columns(&rows) {
                return table::render(&rows, &cols);
            }
        }
        let mut scope = Scope::new();
        scope.push("__value", value.clone());
        self.engine
            .eval_with_scope::<String>(&mut scope, "to_debug(__value)")
            .unwrap_or_else(|_| format!("{value:?}"))
    }

    /// How `lqa -e` prints a result: strings as they are, anything else as in [`Runtime::show`].
    pub fn to_display(&self, value: &Dynamic) -> String {
        if value.is_string() {
            return value.to_string();
        }
        let mut scope = Scope::new();
        scope.push("__value", value.clone());
        self.engine
            .eval_with_scope::<String>(&mut scope, "to_string(__value)")
            .unwrap_or_else(|_| value.to_string())
    }
}

/// A script file's text, with a `#!` first line blanked (so that line numbers stay right).
pub fn read_script(path: &Path) -> crate::Result<String> {
    let code = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    Ok(match code.strip_prefix("#!") {
        Some(rest) => rest
            .find('\n')
            .map_or(String::new(), |n| rest[n..].to_string()),
        None => code,
    })
}

/// `Engine::set_module_resolver` takes the resolver by value; this lets the runtime keep a handle.
struct SharedResolver(Arc<ScriptResolver>);

impl rhai::ModuleResolver for SharedResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: rhai::Position,
    ) -> ScriptResult<rhai::Shared<rhai::Module>> {
        self.0.resolve(engine, source, path, pos)
    }
}

/// The folder of the script making this call (`None` for code typed at `-e` or the REPL), where
/// [`crate::assets`] looks first.
pub fn script_dir(ctx: &NativeCallContext) -> Option<PathBuf> {
    ctx.call_source()
        .filter(|s| !s.starts_with('<'))
        .and_then(|s| Path::new(s).parent())
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
}

/// A non-negative integer argument as `usize`; a negative one is an error naming `what`.
pub fn arg_usize(ctx: &NativeCallContext, what: &str, value: i64) -> ScriptResult<usize> {
    usize::try_from(value).map_err(|_| ctx_err(ctx, format!("{what} must be >= 0, got {value}")))
}

/// A number (int or float) argument as `f64`.
pub fn arg_f64(ctx: &NativeCallContext, what: &str, value: &Dynamic) -> ScriptResult<f64> {
    if let Ok(i) = value.as_int() {
        Ok(i as f64)
    } else if let Ok(f) = value.as_float() {
        Ok(f)
    } else {
        Err(ctx_err(
            ctx,
            format!("{what} must be a number, got {}", value.type_name()),
        ))
    }
}

/// Write a file atomically: `write` fills a temporary file beside `path`, which is then renamed
/// over `path`, so that readers never see half a file.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&Path) -> crate::Result<()>,
) -> crate::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| crate::Error::invalid(format!("{}: not a file name", path.display())))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = write(&tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| crate::Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
