//! The REPL: `lqa` with no script. One persistent scope (variables, functions and imports
//! survive between inputs), multi-line input while a statement is incomplete, tab completion of
//! functions and of methods after `value.`, history in `$LQA_HOME/history.txt`.
//!
//! Ctrl-C while a statement runs stops it (the session goes on); Ctrl-C at the prompt clears the
//! input; Ctrl-D quits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rhai::{Engine, LexError, ParseErrorType};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::script::{error::locate, Runtime, REPL_SOURCE};

const PROMPT: &str = "lqa> ";
const MORE: &str = "...  ";

const HELP: &str = "\
Type Rhai statements; expressions that are not () are printed.
  :help         this help
  :load FILE    run a script file here (its variables and functions stay)
  :vars         list variables
  :quit         quit (or Ctrl-D)
Tab completes function names, and methods after `value.`.
Ctrl-C stops a running statement, or clears the input at the prompt.";

/// `$LQA_HOME` (default `~/.cache/lqa`).
pub fn lqa_home() -> PathBuf {
    match std::env::var_os("LQA_HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home),
        None => dirs::home_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache")
            .join("lqa"),
    }
}

pub fn history_path() -> PathBuf {
    lqa_home().join("history.txt")
}

// ---------------------------------------------------------------------------------------------
// Incomplete input

/// Is `code` a prefix of a statement that more lines could complete (an unclosed bracket, a
/// trailing operator, an open back-tick string)? Complete code and real syntax errors are not:
/// inside open brackets, an error counts as "incomplete" only if it is on the last line.
pub fn is_incomplete(engine: &Engine, code: &str) -> bool {
    let Err(err) = engine.compile(code) else {
        return false;
    };
    let last_line = code.split('\n').count();
    let at_end = err.position().line().is_none_or(|line| line >= last_line);
    match err.err_type() {
        ParseErrorType::UnexpectedEOF => true,
        ParseErrorType::BadInput(LexError::UnterminatedString)
            if code.matches('`').count() % 2 == 1 =>
        {
            true
        }
        _ => at_end && open_brackets(code) > 0,
    }
}

/// Brackets opened and not closed, outside strings and comments.
pub fn open_brackets(code: &str) -> i64 {
    let mut depth = 0i64;
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            '"' | '`' | '\'' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            _ => {}
        }
    }
    depth
}

// ---------------------------------------------------------------------------------------------
// Completion

/// Names to complete: global functions, and per type the methods (`name(`) and properties.
#[derive(Debug, Default, Clone)]
pub struct Completions {
    pub globals: BTreeSet<String>,
    /// Type name (as scripts see it: `Tensor`, `string`, `array`...) -> method/property names.
    pub methods: BTreeMap<String, BTreeSet<String>>,
}

/// `name(_: &mut Tensor, _: i64) -> ...` -> (`name`, first parameter type `Tensor`).
pub fn parse_signature(sig: &str) -> Option<(String, Option<String>)> {
    let open = sig.find('(')?;
    let name = sig[..open].trim().to_string();
    let params = &sig[open + 1..];
    let close = params.find(')')?;
    let first = params[..close].split(',').next().unwrap_or("").trim();
    let ty = first
        .split_once(':')
        .map(|(_, t)| t.trim())
        .unwrap_or(first)
        .trim_start_matches("&mut ")
        .trim_end_matches('=')
        .trim();
    Some((name, (!ty.is_empty()).then(|| ty.to_string())))
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Completions {
    /// Build from signatures as [`Engine::gen_fn_signatures`] writes them.
    pub fn from_signatures<S: AsRef<str>>(signatures: impl IntoIterator<Item = S>) -> Self {
        let mut out = Self::default();
        for sig in signatures {
            let Some((name, ty)) = parse_signature(sig.as_ref()) else {
                continue;
            };
            if let Some(prop) = name.strip_prefix("get$") {
                if let Some(ty) = ty {
                    out.methods.entry(ty).or_default().insert(prop.to_string());
                }
                continue;
            }
            if !is_ident(&name) || name.starts_with("anon$") {
                continue;
            }
            out.globals.insert(name.clone());
            if let Some(ty) = ty.filter(|t| t != "Dynamic" && t != "?") {
                out.methods
                    .entry(ty)
                    .or_default()
                    .insert(format!("{name}("));
            }
        }
        out
    }

    /// Everything the engine knows, plus the functions the REPL has defined.
    pub fn from_runtime(runtime: &Runtime) -> Self {
        let mut out = Self::from_signatures(runtime.engine().gen_fn_signatures(true));
        for f in runtime.functions().iter_functions() {
            out.globals.insert(f.name.to_string());
        }
        out
    }

    /// Methods and properties whose first parameter is `type_name`.
    pub fn for_type(&self, type_name: &str) -> Vec<String> {
        self.methods
            .get(type_name)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "while", "loop", "for", "in", "return", "break",
    "continue", "import", "export", "as", "true", "false", "throw", "try", "catch", "switch",
    "this", "print", "debug",
];

/// Completion of the word before `pos` in `line`: the start of that word and the candidates.
/// `vars` are the scope's variables with their type names.
pub fn complete_line(
    line: &str,
    pos: usize,
    completions: &Completions,
    vars: &[(String, String)],
) -> (usize, Vec<String>) {
    let before = &line[..pos];
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_alphanumeric() || *c == '_')
        .last()
        .map_or(pos, |(i, _)| i);
    let prefix = &before[start..];
    let mut out: Vec<String> = if before[..start].ends_with('.') {
        let receiver_end = start - 1;
        let receiver_start = before[..receiver_end]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || *c == '_')
            .last()
            .map_or(receiver_end, |(i, _)| i);
        let receiver = &before[receiver_start..receiver_end];
        match vars.iter().find(|(name, _)| name == receiver) {
            Some((_, ty)) => completions.for_type(ty),
            None => Vec::new(),
        }
    } else {
        let mut all: BTreeSet<String> = completions
            .globals
            .iter()
            .map(|g| format!("{g}("))
            .collect();
        all.extend(vars.iter().map(|(name, _)| name.clone()));
        all.extend(KEYWORDS.iter().map(|k| k.to_string()));
        all.into_iter().collect()
    };
    out.retain(|c| c.starts_with(prefix));
    out.dedup();
    (start, out)
}

/// The rustyline helper: completion only.
pub struct ReplHelper {
    pub completions: Completions,
    pub vars: Vec<(String, String)>,
}

impl ReplHelper {
    fn refresh(&mut self, runtime: &Runtime) {
        self.completions = Completions::from_runtime(runtime);
        self.vars = scope_vars(runtime);
    }
}

/// The scope's variables with the type names scripts see.
pub fn scope_vars(runtime: &Runtime) -> Vec<(String, String)> {
    runtime
        .scope()
        .iter_raw()
        .map(|(name, _, value)| {
            let ty = runtime
                .engine()
                .map_type_name(value.type_name())
                .to_string();
            (name.to_string(), ty)
        })
        .collect()
}

impl Completer for ReplHelper {
    type Candidate = String;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(complete_line(line, pos, &self.completions, &self.vars))
    }
}

impl Hinter for ReplHelper {
    type Hint = String;
}
impl Highlighter for ReplHelper {}
impl Validator for ReplHelper {}
impl Helper for ReplHelper {}

// ---------------------------------------------------------------------------------------------
// The loop

/// Run `code` and print its value or its error (with a caret under the column).
fn evaluate(runtime: &mut Runtime, code: &str, source: &str) {
    match runtime.eval_raw(code, source) {
        Ok(value) if value.is_unit() => {}
        Ok(value) => println!("{}", runtime.show(&value)),
        Err(err) => print_error(runtime, &err, code, source),
    }
}

fn print_error(runtime: &Runtime, err: &rhai::EvalAltResult, code: &str, source: &str) {
    let loc = locate(err, source);
    if loc.source == source {
        if let (Some(line), Some(col)) = (loc.pos.line(), loc.pos.position()) {
            if let Some(text) = code.lines().nth(line - 1) {
                eprintln!("  {text}");
                eprintln!("  {}^", " ".repeat(col.saturating_sub(1)));
            }
        }
    }
    eprintln!("{}", runtime.format_error(err, source));
}

fn command(runtime: &mut Runtime, line: &str) -> bool {
    let (cmd, arg) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let arg = arg.trim();
    match cmd {
        ":quit" | ":q" | ":exit" => return false,
        ":help" | ":h" => println!("{HELP}"),
        ":vars" => {
            for (name, ty) in scope_vars(runtime) {
                println!("{name}: {ty}");
            }
        }
        ":load" if arg.is_empty() => eprintln!(":load needs a file name"),
        ":load" => match crate::script::read_script(std::path::Path::new(arg)) {
            Ok(code) => evaluate(runtime, &code, arg),
            Err(e) => eprintln!("{e}"),
        },
        _ => eprintln!("unknown command {cmd} (try :help)"),
    }
    true
}

/// Run the REPL until `:quit` or Ctrl-D.
pub fn run(mut runtime: Runtime) -> crate::Result<()> {
    crate::interrupt::install_ctrlc_handler();
    let config = rustyline::Config::builder()
        .auto_add_history(false)
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut rl: Editor<ReplHelper, DefaultHistory> = Editor::with_config(config)
        .map_err(|e| crate::Error::invalid(format!("cannot start the line editor: {e}")))?;
    let mut helper = ReplHelper {
        completions: Completions::default(),
        vars: Vec::new(),
    };
    helper.refresh(&runtime);
    rl.set_helper(Some(helper));

    let history = history_path();
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = rl.load_history(&history);

    println!(
        "lqa {} (Rhai). :help for help, Ctrl-D to quit.",
        env!("CARGO_PKG_VERSION")
    );
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() { PROMPT } else { MORE };
        match rl.readline(prompt) {
            Ok(line) => {
                if buffer.is_empty() {
                    let trimmed = line.trim();
                    if trimmed.is_empty() {
                        continue;
                    }
                    if trimmed.starts_with(':') {
                        let _ = rl.add_history_entry(trimmed);
                        if !command(&mut runtime, trimmed) {
                            break;
                        }
                        if let Some(h) = rl.helper_mut() {
                            h.refresh(&runtime);
                        }
                        continue;
                    }
                }
                buffer.push_str(&line);
                buffer.push('\n');
                if is_incomplete(runtime.engine(), &buffer) {
                    continue;
                }
                let code = std::mem::take(&mut buffer);
                let _ = rl.add_history_entry(code.trim_end());
                evaluate(&mut runtime, &code, REPL_SOURCE);
                if let Some(h) = rl.helper_mut() {
                    h.refresh(&runtime);
                }
            }
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                let _ = rl.save_history(&history);
                return Err(crate::Error::invalid(format!("line editor: {e}")));
            }
        }
    }
    if let Err(e) = rl.save_history(&history) {
        tracing::warn!("cannot save the REPL history to {}: {e}", history.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::RuntimeOptions;

    #[test]
    fn incomplete_input_is_detected() {
        let engine = Engine::new();
        for code in [
            "fn f() {",
            "let x = [1,\n",
            "x +",
            "f(1,",
            "let a = `multi\nline",
            "if x {\n let y = \"}\";",
        ] {
            assert!(
                is_incomplete(&engine, code),
                "{code:?} should be incomplete"
            );
        }
        for code in [
            "let x = 1;",
            "1 + 2",
            "let x = 1 + ;",
            "}",
            "let s = \"abc",
            "x)",
        ] {
            assert!(
                !is_incomplete(&engine, code),
                "{code:?} should not be incomplete"
            );
        }
    }

    #[test]
    fn brackets_ignore_strings_and_comments() {
        assert_eq!(open_brackets("f(\"(\", // (\n [ /* { */"), 2);
        assert_eq!(open_brackets("{ [ ] }"), 0);
    }

    #[test]
    fn signatures_parse() {
        assert_eq!(
            parse_signature("slice(_: &mut Tensor, _: i64, _: i64) -> Tensor"),
            Some(("slice".to_string(), Some("Tensor".to_string())))
        );
        assert_eq!(
            parse_signature("timestamp() -> string"),
            Some(("timestamp".into(), None))
        );
        assert_eq!(
            parse_signature("get$len(array: &mut array) -> i64"),
            Some(("get$len".into(), Some("array".into())))
        );
    }

    #[test]
    fn tensor_methods_complete_after_a_dot() {
        let runtime = Runtime::new(RuntimeOptions::default());
        let completions = Completions::from_runtime(&runtime);
        let methods = completions.for_type("Tensor");
        for m in [
            "shape", "dtype", "rank", "mean(", "slice(", "topk(", "save(",
        ] {
            assert!(
                methods.contains(&m.to_string()),
                "{m} missing from {methods:?}"
            );
        }
        assert!(!methods
            .iter()
            .any(|m| m.starts_with('+') || m.contains('$')));

        let vars = vec![("t".to_string(), "Tensor".to_string())];
        let (start, got) = complete_line("x = t.me", 8, &completions, &vars);
        assert_eq!(start, 6);
        assert_eq!(got, vec!["mean(".to_string()]);
        let (start, got) = complete_line("let y = zer", 11, &completions, &vars);
        assert_eq!(start, 8);
        assert_eq!(got, vec!["zeros(".to_string()]);
        let (_, got) = complete_line("nope.", 5, &completions, &vars);
        assert!(got.is_empty());
    }
}
