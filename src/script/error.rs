//! Script errors: turning Rust errors into Rhai errors that keep the script position, and turning
//! a Rhai error back into the one line the user sees: `file:line:col: cause`.
//!
//! Rhai wraps an error raised inside a script function in `ErrorInFunctionCall` and one raised
//! while loading a module in `ErrorInModule`; [`locate`] walks down those wrappers to the error
//! that actually happened and the file it happened in (functions and modules carry their source).

use std::fmt::Display;

use rhai::{Dynamic, EvalAltResult, NativeCallContext, Position};

/// The result type of a fallible native function.
pub type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error with `msg` at `pos`. Multi-line messages are folded into one line.
pub fn script_err(msg: impl Display, pos: Position) -> Box<EvalAltResult> {
    let msg = one_line(&msg.to_string());
    EvalAltResult::ErrorRuntime(msg.into(), pos).into()
}

/// A runtime error at the position of the native call `ctx`.
pub fn ctx_err(ctx: &NativeCallContext, msg: impl Display) -> Box<EvalAltResult> {
    script_err(msg, ctx.call_position())
}

/// The token of the termination a Ctrl-C turns into ([`crate::Error::Interrupted`] on the
/// Rust side); [`is_interrupt`] recognises it by type.
#[derive(Clone, Copy, Debug)]
pub struct Interrupt;

/// The termination token of a Ctrl-C (for `Engine::on_progress`).
pub fn interrupt_token() -> Dynamic {
    Dynamic::from(Interrupt)
}

/// The error a Ctrl-C turns into: a termination (scripts cannot `catch` it).
pub fn interrupted(pos: Position) -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(interrupt_token(), pos).into()
}

/// Is this termination token the one of a Ctrl-C?
fn is_interrupt_token(token: &Dynamic) -> bool {
    token.is::<Interrupt>()
}

/// Convert the error of a Rust result into a script error at a position.
pub trait ToScript<T> {
    fn to_script(self, pos: Position) -> ScriptResult<T>;

    /// [`ToScript::to_script`] at the position of the native call `ctx`.
    fn at(self, ctx: &NativeCallContext) -> ScriptResult<T>
    where
        Self: Sized,
    {
        self.to_script(ctx.call_position())
    }
}

impl<T> ToScript<T> for Result<T, crate::Error> {
    fn to_script(self, pos: Position) -> ScriptResult<T> {
        self.map_err(|e| match e {
            crate::Error::Interrupted => interrupted(pos),
            e => script_err(e, pos),
        })
    }
}

impl<T> ToScript<T> for Result<T, candle_core::Error> {
    fn to_script(self, pos: Position) -> ScriptResult<T> {
        self.map_err(|e| script_err(e, pos))
    }
}

/// Fold a message into one line (candle's errors may carry a backtrace on later lines).
pub fn one_line(msg: &str) -> String {
    let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("").to_string();
    lines.fold(first, |mut acc, l| {
        if l.starts_with("Stack backtrace") || l.starts_with("0:") {
            return acc;
        }
        acc.push_str("; ");
        acc.push_str(l);
        acc
    })
}

/// Where an error happened: the file (or `<eval>`, `<repl>`), the position in it, and the
/// underlying error with the function-call and module wrappers removed. When that file is not
/// the outermost one (an imported module), `entry` is where the outermost code called into it.
pub struct Location<'a> {
    pub source: String,
    pub pos: Position,
    pub cause: &'a EvalAltResult,
    pub entry: Option<(String, Position)>,
}

/// Walk down `ErrorInFunctionCall` / `ErrorInModule` to the underlying error, following the
/// source file as it changes. `top` names the source of the outermost code.
pub fn locate<'a>(err: &'a EvalAltResult, top: &str) -> Location<'a> {
    let mut source = top.to_string();
    let mut loc = (source.clone(), err.position());
    let mut entry = None;
    let mut e = err;
    loop {
        let (next_source, inner, pos) = match e {
            EvalAltResult::ErrorInFunctionCall(_, fn_source, inner, pos) => (fn_source, inner, pos),
            EvalAltResult::ErrorInModule(module, inner, pos) => (module, inner, pos),
            other => {
                if !other.position().is_none() {
                    loc = (source, other.position());
                }
                break;
            }
        };
        if !pos.is_none() {
            loc = (source.clone(), *pos);
            if source == top && !next_source.is_empty() && next_source != top {
                entry = Some((source.clone(), *pos));
            }
        }
        if !next_source.is_empty() {
            source = next_source.clone();
        }
        e = inner;
    }
    let entry = entry.filter(|_| loc.0 != top);
    Location {
        source: loc.0,
        pos: loc.1,
        cause: e,
        entry,
    }
}

/// The limits in force, so that limit errors can say which flag raises them.
#[derive(Debug, Clone, Default)]
pub struct LimitHints {
    pub max_ops: u64,
    pub max_call_depth: usize,
    pub max_string: usize,
    pub max_array: usize,
    pub max_map: usize,
    /// Where modules are looked up after the script's own folder.
    pub stdlib: Option<std::path::PathBuf>,
}

/// The message of the underlying error, without position, on one line.
pub fn cause_message(cause: &EvalAltResult, hints: &LimitHints) -> String {
    use EvalAltResult as E;
    let msg = match cause {
        E::ErrorParsing(p, _) => format!("syntax error: {p}"),
        E::ErrorRuntime(d, _) => runtime_message(d),
        E::ErrorTooManyOperations(_) => format!(
            "too many operations (limit {}): a runaway loop? raise the limit with --max-ops N \
             (0 = no limit)",
            hints.max_ops
        ),
        E::ErrorTerminated(token, _) if is_interrupt_token(token) => {
            "interrupted (Ctrl-C)".to_string()
        }
        E::ErrorTerminated(token, _) => format!("terminated: {token}"),
        E::ErrorStackOverflow(_) => format!(
            "too many nested function calls (limit {}): runaway recursion? raise the limit \
             with --max-call-depth N",
            hints.max_call_depth
        ),
        E::ErrorDataTooLarge(what, _) => {
            let lower = what.to_lowercase();
            let (flag, limit) = if lower.contains("string") {
                ("--max-string", hints.max_string)
            } else if lower.contains("array") {
                ("--max-array", hints.max_array)
            } else {
                ("--max-map", hints.max_map)
            };
            format!(
                "{} too large (limit {limit}): raise the limit with {flag} N",
                lower_first(what)
            )
        }
        E::ErrorModuleNotFound(name, _) => {
            let stdlib = match &hints.stdlib {
                Some(dir) => format!(", {}", dir.display()),
                None => String::new(),
            };
            let embedded: Vec<&str> = crate::assets::STDLIB
                .iter()
                .map(|(f, _)| f.trim_end_matches(".rhai"))
                .collect();
            format!(
                "module \"{name}\" not found: looked in the script's folder{stdlib} and the \
                 embedded stdlib ({})",
                embedded.join(", ")
            )
        }
        E::ErrorSystem(s, err) if s.is_empty() => err.to_string(),
        E::ErrorSystem(s, err) => format!("{s}: {err}"),
        other => {
            let text = other.to_string();
            let suffix = format!(" ({})", other.position());
            let text = text.strip_suffix(&suffix).unwrap_or(&text);
            lower_first(text)
        }
    };
    one_line(&msg)
}

fn runtime_message(d: &Dynamic) -> String {
    if d.is_unit() {
        return "runtime error".to_string();
    }
    let s = d.to_string();
    if s.is_empty() {
        "runtime error".to_string()
    } else {
        s
    }
}

/// `Variable not found` -> `variable not found`, but leave `JSON ...` alone.
fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(a), Some(b)) if a.is_uppercase() && b.is_lowercase() => {
            let mut out: String = a.to_lowercase().collect();
            out.push_str(&s[a.len_utf8()..]);
            out
        }
        _ => s.to_string(),
    }
}

/// `file:line:col` (or `file:line`, or just `file`) for a position in a source.
pub fn format_location(source: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(line), Some(col)) => format!("{source}:{line}:{col}"),
        (Some(line), None) => format!("{source}:{line}"),
        _ => source.to_string(),
    }
}

/// The one line the user sees: `file:line:col: cause`, and for an error inside an imported
/// module, `(from main.rhai:line:col)` naming where the outermost script called into it.
pub fn format_error(err: &EvalAltResult, top: &str, hints: &LimitHints) -> String {
    let loc = locate(err, top);
    let from = match &loc.entry {
        Some((source, pos)) => format!(" (from {})", format_location(source, *pos)),
        None => String::new(),
    };
    format!(
        "{}: {}{from}",
        format_location(&loc.source, loc.pos),
        cause_message(loc.cause, hints)
    )
}

/// Is this error a Ctrl-C interruption (so the CLI can exit with 130)?
pub fn is_interrupt(err: &EvalAltResult) -> bool {
    matches!(err.unwrap_inner(), EvalAltResult::ErrorTerminated(t, _) if is_interrupt_token(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_folds_lines() {
        assert_eq!(one_line("a\n  b\n\nc"), "a; b; c");
        assert_eq!(one_line("only"), "only");
    }

    #[test]
    fn lower_first_keeps_acronyms() {
        assert_eq!(
            lower_first("Variable not found: x"),
            "variable not found: x"
        );
        assert_eq!(lower_first("JSON error"), "JSON error");
    }

    #[test]
    fn nested_errors_are_unwrapped() {
        let inner = script_err("boom", Position::new(3, 7));
        let call = EvalAltResult::ErrorInFunctionCall(
            "f".into(),
            "lib/m.rhai".into(),
            inner,
            Position::new(10, 1),
        );
        let module =
            EvalAltResult::ErrorInModule("lib/m.rhai".into(), call.into(), Position::new(1, 1));
        let msg = format_error(&module, "main.rhai", &LimitHints::default());
        assert_eq!(msg, "lib/m.rhai:3:7: boom (from main.rhai:1:1)");
    }

    #[test]
    fn interrupt_is_recognised() {
        let e = Err::<(), _>(crate::Error::Interrupted)
            .to_script(Position::new(1, 2))
            .unwrap_err();
        assert!(is_interrupt(&e));
        assert!(!is_interrupt(&script_err(
            "interrupted",
            Position::new(1, 2)
        )));
        assert_eq!(
            format_error(&e, "x.rhai", &LimitHints::default()),
            "x.rhai:1:2: interrupted (Ctrl-C)"
        );
    }
}
