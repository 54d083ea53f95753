//! `lqa FILE.rhai [ARGS...]` runs a script, `lqa -e CODE [ARGS...]` evaluates a snippet and
//! prints its value, `lqa` alone opens the REPL; `lqa pull NAME` and `lqa models` manage models; `lqa assets` says where
//! the stdlib, decoders, controls and data are found.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lqa::script::{Runtime, RuntimeOptions};

#[derive(Parser, Debug)]
#[command(
    name = "lqa",
    version,
    about = "LatentQA: ask a language model's activations questions in plain English",
    long_about = "LatentQA: ask a language model's activations questions in plain English.\n\n\
        lqa FILE.rhai [ARGS]...   run a Rhai script (it sees ARGS)\n\
        lqa -e CODE [ARGS]...     evaluate CODE and print its value\n\
        lqa                       open the REPL",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(flatten)]
    limits: Limits,

    /// More logging (-v info, -vv debug, -vvv trace); LQA_LOG (an env-filter) overrides it
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Evaluate CODE and print its value (if not unit)
    #[arg(short = 'e', long = "eval", value_name = "CODE")]
    eval: Option<String>,

    /// The script to run, then its arguments (the script sees them as ARGS)
    #[arg(
        value_name = "FILE.rhai [ARGS]",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    script: Vec<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct Limits {
    /// Operations a script may run before it is stopped as a runaway (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_ops)]
    max_ops: u64,
    /// Elements in one array (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_array)]
    max_array: usize,
    /// Bytes in one string (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_string)]
    max_string: usize,
    /// Entries in one object map (0 = no limit)
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_map)]
    max_map: usize,
    /// Nested script function calls
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_call_depth)]
    max_call_depth: usize,
    /// Bytes in one tensor a script makes or an op returns, checked before allocating
    /// (0 = no limit; default half of physical memory)
    #[arg(long, value_name = "N", default_value_t = RuntimeOptions::default().max_tensor_bytes)]
    max_tensor_bytes: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download a model (or find it in the cache) and print its folder
    Pull {
        /// A known model name (see `lqa models`), a hub id or a local path
        name: String,
    },
    /// List the models `lqa pull` knows by name
    Models,
    /// Say where the stdlib, decoders, controls and data are found
    Assets,
}

const SUBCOMMANDS: &[&str] = &["pull", "models", "assets"];
/// Options that take a value as the next argument (to find the first positional argument).
const VALUE_OPTIONS: &[&str] = &[
    "-e",
    "--eval",
    "--max-ops",
    "--max-array",
    "--max-string",
    "--max-map",
    "--max-call-depth",
    "--max-tensor-bytes",
];

/// A first positional argument that names a subcommand but is an existing file is a script,
/// and after `-e` positional arguments are ARGS: put `--` before them so that clap does not take
/// them for a subcommand.
fn protect_script_path(mut args: Vec<OsString>) -> Vec<OsString> {
    let mut saw_eval = false;
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if arg == "--" {
            return args;
        }
        if arg.starts_with('-') && arg.len() > 1 {
            saw_eval |= arg == "-e" || arg == "--eval" || arg.starts_with("--eval=");
            i += if VALUE_OPTIONS.contains(&arg.as_ref()) {
                2
            } else {
                1
            };
            continue;
        }
        // With -e, positional arguments are the snippet's ARGS, never a subcommand.
        if saw_eval || SUBCOMMANDS.contains(&arg.as_ref()) && Path::new(arg.as_ref()).is_file() {
            args.insert(i, "--".into());
        }
        return args;
    }
    args
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "warn,lqa=info",
        2 => "info,lqa=debug",
        _ => "debug,lqa=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LQA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn options(limits: &Limits) -> RuntimeOptions {
    RuntimeOptions {
        max_ops: limits.max_ops,
        max_array: limits.max_array,
        max_string: limits.max_string,
        max_map: limits.max_map,
        max_call_depth: limits.max_call_depth,
        max_tensor_bytes: limits.max_tensor_bytes,
        ..RuntimeOptions::default()
    }
}

/// Exit code for an error: 130 for Ctrl-C (as shells do), 1 otherwise.
fn failure(message: &str, interrupted: bool) -> ExitCode {
    eprintln!("{message}");
    if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::FAILURE
    }
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Pull { name }) => {
            return match lqa::sources::pull(&name) {
                Ok(dir) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => failure(
                    &format!("lqa pull {name}: {e}"),
                    matches!(e, lqa::Error::Interrupted),
                ),
            };
        }
        Some(Command::Models) => {
            let models = lqa::sources::known_models();
            if models.is_empty() {
                println!("no models known by name");
            }
            let width = models.iter().map(|m| m.name.len()).max().unwrap_or(0);
            for m in models {
                let cached = match &m.cached {
                    Some(dir) => format!("cached: {}", dir.display()),
                    None => "not pulled".to_string(),
                };
                println!("{:width$}  {}  ({cached})", m.name, m.description);
            }
            return ExitCode::SUCCESS;
        }
        Some(Command::Assets) => {
            println!(
                "{}",
                lqa::assets::describe(&lqa::assets::Roots::current(None))
            );
            return ExitCode::SUCCESS;
        }
        None => {}
    }

    lqa::interrupt::install_ctrlc_handler();
    let mut runtime = Runtime::new(options(&cli.limits));
    if let Some(code) = cli.eval {
        runtime.set_args(cli.script);
        return match runtime.eval(&code) {
            Ok(value) if value.is_unit() => ExitCode::SUCCESS,
            Ok(value) => {
                println!("{}", runtime.to_display(&value));
                ExitCode::SUCCESS
            }
            Err(message) => failure(&message, runtime.interrupted()),
        };
    }
    let mut script = cli.script.into_iter();
    match script.next() {
        Some(path) => match runtime.run_file(&path, script.collect()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(message) => failure(&message, runtime.interrupted()),
        },
        None => match lqa::repl::run(runtime) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failure(&format!("lqa: {e}"), matches!(e, lqa::Error::Interrupted)),
        },
    }
}

fn main() -> ExitCode {
    lqa::util::tune_allocator();
    lqa::threads::init();
    let cli = Cli::parse_from(protect_script_path(std::env::args_os().collect()));
    init_logging(cli.verbose);
    // The script runs on a worker of the compute pool (big stacks: scripts recurse on the
    // native stack), so its tensor work joins the pool instead of waking it from outside.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lqa::threads::install(move || run(cli))
    })) {
        Ok(code) => code,
        Err(_) => ExitCode::FAILURE, // the panic message is already printed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn subcommands_and_scripts() {
        let cli = Cli::parse_from(os(&["lqa", "pull", "smol"]));
        assert!(matches!(cli.command, Some(Command::Pull { ref name }) if name == "smol"));
        let cli = Cli::parse_from(os(&["lqa", "--max-ops", "5", "dir/pull.rhai", "-v", "x"]));
        assert!(cli.command.is_none());
        assert_eq!(cli.script, ["dir/pull.rhai", "-v", "x"]);
        assert_eq!(cli.limits.max_ops, 5);
        assert_eq!(cli.verbose, 0);
        let cli = Cli::parse_from(protect_script_path(os(&["lqa", "-e", "1+2", "pull"])));
        assert!(cli.command.is_none());
        assert_eq!(cli.script, ["pull"]);
        let cli = Cli::parse_from(os(&["lqa", "-e", "1+2", "a"]));
        assert_eq!(cli.eval.as_deref(), Some("1+2"));
        assert_eq!(cli.script, ["a"]);
        let cli = Cli::parse_from(os(&["lqa", "-v", "models"]));
        assert!(matches!(cli.command, Some(Command::Models)));
        assert_eq!(cli.verbose, 1);
    }

    #[test]
    fn an_existing_file_named_like_a_subcommand_is_a_script() {
        let dir = std::env::temp_dir().join(format!("lqa-main-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(&dir).unwrap();
        std::fs::write("models", "print(1);").unwrap();
        let args = protect_script_path(os(&["lqa", "--max-ops", "9", "models", "a"]));
        std::env::set_current_dir(old).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(args, os(&["lqa", "--max-ops", "9", "--", "models", "a"]));
        let cli = Cli::parse_from(args);
        assert!(cli.command.is_none());
        assert_eq!(cli.script, ["models", "a"]);
    }
}
