//! One error type for everything below the CLI. Every variant names the thing that was wrong
//! (a file, a tensor, a model name, a field) so that a user sees a one-line, actionable message.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are wrong (truncated, corrupt, missing a tensor...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// A model name that no source knows.
    #[error("unknown model `{name}`: {hint}")]
    UnknownModel { name: String, hint: String },
    /// Network failures (downloads, the hub, the package index).
    #[error("network: {0}")]
    Network(String),
    /// Bad arguments or values given by the user (a shape, a hook name, an option).
    #[error("{0}")]
    Invalid(String),
    /// A stop asked for by Ctrl-C (or [`crate::interrupt::request`]), seen by
    /// [`crate::interrupt::check`] between steps of long work.
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn bad_file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.to_string(),
        }
    }
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
    /// Say which item an error is about (`dialog 3: ...`). File errors already name their file
    /// and a Ctrl-C stays a Ctrl-C; both are left as they are.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            e @ (Error::Interrupted | Error::Io { .. } | Error::BadFile { .. }) => e,
            e => Error::Invalid(format!("{what}: {e}")),
        }
    }
}
