//! `hf:ORG/NAME[@REV]`: models on the Hugging Face hub, through hf-hub's sync API and its cache.
//!
//! Files already in the local hub cache are used without touching the network. Missing files
//! are downloaded unless offline mode (`HF_HUB_OFFLINE=1`) is on. Before the first download a
//! short-timeout request checks that the hub is reachable and the repo exists, so an unreachable
//! hub gives one clear line instead of a long hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::fsutil::FileLock;
use super::local::{
    shard_names, CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, WEIGHTS, WEIGHTS_INDEX,
};
use super::ModelSource;
use crate::{Error, Result};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A parsed `hf:` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HfSpec {
    pub repo: String,
    pub revision: String,
}

impl HfSpec {
    /// The name as a user writes it (`@main` left out).
    fn name(&self) -> String {
        if self.revision == "main" {
            format!("hf:{}", self.repo)
        } else {
            format!("hf:{}@{}", self.repo, self.revision)
        }
    }

    fn hub_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// Parse what follows `hf:`: `ORG/NAME` or `ORG/NAME@REVISION` (also a bare `NAME`, as for
/// legacy repos like `gpt2`).
pub(crate) fn parse(spec: &str) -> Result<HfSpec> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (spec, "main"),
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with('.')
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let rev_ok = !revision.is_empty()
        && !revision.chars().any(|c| c.is_whitespace() || c == '@')
        && !revision
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..");
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) || !rev_ok {
        return Err(Error::invalid(format!(
            "bad hub model name `hf:{spec}`: expected hf:ORG/NAME or hf:ORG/NAME@REVISION"
        )));
    }
    Ok(HfSpec {
        repo: repo.to_string(),
        revision: revision.to_string(),
    })
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// The Hugging Face home: `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    if let Some(home) = env_nonempty("HF_HOME") {
        return home.into();
    }
    env_nonempty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("huggingface")
}

/// The hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub` (see [`hf_home`]).
pub(crate) fn hub_cache_dir() -> PathBuf {
    match env_nonempty("HF_HUB_CACHE") {
        Some(dir) => dir.into(),
        None => hf_home().join("hub"),
    }
}

/// The access token: `HF_TOKEN`, else the file `HF_HOME/token` (written by `hf auth login`).
fn token() -> Option<String> {
    env_nonempty("HF_TOKEN")
        .or_else(|| std::fs::read_to_string(hf_home().join("token")).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `HF_HUB_OFFLINE` set to 1/true/yes/on.
pub(crate) fn offline() -> bool {
    env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Resolve `hf:SPEC` (SPEC without the prefix) from the environment's hub settings.
pub(crate) fn resolve(spec: &str) -> Result<ModelSource> {
    let spec = parse(spec)?;
    let mut fetcher = Fetcher::new(&spec);
    fetcher.resolve()
}

/// The snapshot directory of `repo` at `revision` in the local hub cache, if it has a
/// config.json.
pub(crate) fn cached_snapshot(repo: &str, revision: &str) -> Option<PathBuf> {
    let spec = HfSpec {
        repo: repo.to_string(),
        revision: revision.to_string(),
    };
    local_file(&Cache::new(hub_cache_dir()), &spec, CONFIG).and_then(|p| p.parent().map(Into::into))
}

/// Models in the local hub cache: (`hf:` name, snapshot directory), one per ref (or per
/// snapshot when no ref names it), keeping only snapshots with a config.json.
pub(crate) fn cached_models() -> Vec<(String, PathBuf)> {
    let cache = hub_cache_dir();
    let Ok(entries) = std::fs::read_dir(&cache) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = folder.strip_prefix("models--") else {
            continue;
        };
        let repo = id.replacen("--", "/", 1);
        let base = entry.path();
        let mut named = std::collections::HashSet::new();
        if let Ok(refs) = std::fs::read_dir(base.join("refs")) {
            for r in refs.flatten() {
                let Ok(commit) = std::fs::read_to_string(r.path()) else {
                    continue;
                };
                let snapshot = base.join("snapshots").join(commit.trim());
                if snapshot.join(CONFIG).is_file() {
                    let rev = r.file_name().to_string_lossy().into_owned();
                    named.insert(commit.trim().to_string());
                    let name = if rev == "main" {
                        format!("hf:{repo}")
                    } else {
                        format!("hf:{repo}@{rev}")
                    };
                    found.push((name, snapshot));
                }
            }
        }
        if let Ok(snapshots) = std::fs::read_dir(base.join("snapshots")) {
            for s in snapshots.flatten() {
                let commit = s.file_name().to_string_lossy().into_owned();
                if !named.contains(&commit) && s.path().join(CONFIG).is_file() {
                    found.push((format!("hf:{repo}@{commit}"), s.path()));
                }
            }
        }
    }
    found.sort();
    found
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file of `spec` in the local hub cache: through the ref, or directly in the snapshot named
/// by a commit-hash revision.
fn local_file(cache: &Cache, spec: &HfSpec, file: &str) -> Option<PathBuf> {
    if let Some(path) = cache.repo(spec.hub_repo()).get(file) {
        return Some(path);
    }
    if is_commit_hash(&spec.revision) {
        let path = cache
            .path()
            .join(spec.hub_repo().folder_name())
            .join("snapshots")
            .join(&spec.revision)
            .join(file);
        if path.exists() {
            return Some(path);
        }
    }
    None
}

/// Why the hub cannot be used for this repo.
enum Offline {
    /// offline mode is on
    Mode,
    /// the hub did not answer
    Unreachable(String),
    /// the hub answered that the repo (or revision) is not there
    NotFound(String),
    /// anything else
    Failed(String),
}

enum Online {
    Untried,
    Ready { api: Box<ApiRepo>, _lock: FileLock },
    Unavailable(Offline),
}

struct Fetcher<'a> {
    spec: &'a HfSpec,
    cache_dir: PathBuf,
    cache: Cache,
    offline: bool,
    online: Online,
}

impl<'a> Fetcher<'a> {
    fn new(spec: &'a HfSpec) -> Self {
        let cache_dir = hub_cache_dir();
        let offline = offline();
        Fetcher {
            spec,
            cache: Cache::new(cache_dir.clone()),
            cache_dir,
            offline,
            online: if offline {
                Online::Unavailable(Offline::Mode)
            } else {
                Online::Untried
            },
        }
    }

    fn resolve(&mut self) -> Result<ModelSource> {
        let config = self.required(CONFIG)?;
        let tokenizer = self.required(TOKENIZER)?;
        let tokenizer_config = self.optional(TOKENIZER_CONFIG)?;
        let generation_config = self.optional(GENERATION_CONFIG)?;
        let weights = self.weights()?;
        let root = config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cache_dir.clone());
        Ok(ModelSource::Dir {
            root,
            config,
            tokenizer,
            tokenizer_config,
            generation_config,
            weights,
        })
    }

    fn weights(&mut self) -> Result<Vec<PathBuf>> {
        // prefer what the cache already has, so a cached model needs no network
        let index = match local_file(&self.cache, self.spec, WEIGHTS_INDEX) {
            Some(index) => Some(index),
            None => match local_file(&self.cache, self.spec, WEIGHTS) {
                Some(single) => return Ok(vec![single]),
                // not `optional`: with no weights cached, an unreachable hub is an error
                None => self.get(WEIGHTS_INDEX)?,
            },
        };
        match index {
            Some(index) => shard_names(&index)?
                .iter()
                .map(|shard| self.required(shard))
                .collect(),
            None => match self.get(WEIGHTS)? {
                Some(single) => Ok(vec![single]),
                None => Err(self.missing(&format!("{WEIGHTS} or {WEIGHTS_INDEX}"))),
            },
        }
    }

    fn required(&mut self, file: &str) -> Result<PathBuf> {
        match self.get(file)? {
            Some(path) => Ok(path),
            None => Err(self.missing(file)),
        }
    }

    /// An optional file: absent from the repo, or (hub unreachable / offline) from the cache.
    fn optional(&mut self, file: &str) -> Result<Option<PathBuf>> {
        match self.get(file) {
            Ok(found) => Ok(found),
            Err(e) => match &self.online {
                Online::Unavailable(Offline::Unreachable(_)) => {
                    tracing::warn!("{}: skipping optional {file}: {e}", self.spec.name());
                    Ok(None)
                }
                _ => Err(e),
            },
        }
    }

    /// `Ok(None)`: the file is not in the repo (or, offline, not in the cache).
    fn get(&mut self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = local_file(&self.cache, self.spec, file) {
            return Ok(Some(path));
        }
        self.connect();
        let api = match &self.online {
            Online::Ready { api, .. } => api,
            Online::Unavailable(Offline::Mode) => return Ok(None),
            Online::Unavailable(why) => return Err(self.unavailable(why)),
            Online::Untried => unreachable!("connect() leaves Untried behind"),
        };
        // another process may have fetched it while we waited for the lock
        if let Some(path) = local_file(&self.cache, self.spec, file) {
            return Ok(Some(path));
        }
        match api.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) => match status(&e) {
                Some(404) => Ok(None),
                Some(code @ (401 | 403)) => Err(Error::Network(format!(
                    "the Hugging Face hub refused {file} of {} (HTTP {code}); gated or private \
                     repos need a token in HF_TOKEN",
                    self.spec.name()
                ))),
                _ if is_transport(&e) => Err(Error::Network(format!(
                    "cannot reach the Hugging Face hub for {} while downloading {file} ({e}); \
                     set HF_HUB_OFFLINE=1 to use only the local cache",
                    self.spec.name()
                ))),
                _ => Err(Error::Network(format!(
                    "downloading {file} of {}: {e}",
                    self.spec.name()
                ))),
            },
        }
    }

    /// The error for a file that neither the cache nor the hub has.
    fn missing(&self, file: &str) -> Error {
        let where_ = if self.offline {
            format!(
                "not in the local Hugging Face cache {} (HF_HUB_OFFLINE is set; unset it to \
                 download)",
                self.cache_dir.display()
            )
        } else {
            "not in the repo on the Hugging Face hub".to_string()
        };
        Error::bad_file(Path::new(&self.spec.name()).join(file), where_)
    }

    fn unavailable(&self, why: &Offline) -> Error {
        let name = self.spec.name();
        match why {
            Offline::Mode => Error::Network(format!(
                "{name}: HF_HUB_OFFLINE is set, so the hub is not consulted"
            )),
            Offline::Unreachable(e) => Error::Network(format!(
                "cannot reach the Hugging Face hub for {name} ({e}); set HF_HUB_OFFLINE=1 to use \
                 only the local cache"
            )),
            Offline::NotFound(msg) => Error::UnknownModel {
                name,
                hint: msg.clone(),
            },
            Offline::Failed(msg) => Error::Network(msg.clone()),
        }
    }

    /// On first need: check the hub answers for this repo (short timeouts), set up hf-hub's API,
    /// and take our lock for this repo so that concurrent processes download one at a time.
    fn connect(&mut self) {
        if !matches!(self.online, Online::Untried) {
            return;
        }
        self.online = match self.try_connect() {
            Ok(ready) => ready,
            Err(why) => Online::Unavailable(why),
        };
    }

    fn try_connect(&self) -> std::result::Result<Online, Offline> {
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = token();
        let name = self.spec.name();

        let probe = format!(
            "{endpoint}/api/models/{}/revision/{}",
            self.spec.repo,
            self.spec.revision.replace('/', "%2F")
        );
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build();
        let mut request = agent.get(&probe);
        if let Some(token) = &token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        match request.call() {
            Ok(_) => {}
            Err(ureq::Error::Status(code @ (401 | 404), _)) => {
                return Err(Offline::NotFound(format!(
                    "the Hugging Face hub has no repo `{}` at revision `{}` (HTTP {code}); \
                     private or gated repos need a token in HF_TOKEN",
                    self.spec.repo, self.spec.revision
                )));
            }
            // other statuses (rate limits, gated answers...): let the download itself report
            Err(ureq::Error::Status(code, _)) => {
                tracing::debug!("{probe}: HTTP {code}");
            }
            Err(ureq::Error::Transport(t)) => return Err(Offline::Unreachable(t.to_string())),
        }

        let api = ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(endpoint)
            .with_token(token)
            .with_progress(true)
            .build()
            .map_err(|e| {
                Offline::Failed(format!("cannot set up the hub client for {name}: {e}"))
            })?;
        let lock_path = super::lqa_home()
            .join("locks")
            .join(format!("hf-{}.lock", self.spec.hub_repo().folder_name()));
        let lock = FileLock::acquire(&lock_path, &format!("downloading {name}"))
            .map_err(|e| Offline::Failed(e.to_string()))?;
        Ok(Online::Ready {
            api: Box::new(api.repo(self.spec.hub_repo())),
            _lock: lock,
        })
    }
}

fn status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(boxed) => match boxed.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        ApiError::TooManyRetries(inner) => status(inner),
        _ => None,
    }
}

fn is_transport(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(boxed) => matches!(boxed.as_ref(), ureq::Error::Transport(_)),
        ApiError::TooManyRetries(inner) => is_transport(inner),
        ApiError::IoError(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_hub_names() {
        let s = parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(s.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(s.revision, "main");
        let s = parse("org/name@refs/pr/1").unwrap();
        assert_eq!(s.revision, "refs/pr/1");
        assert!(parse("gpt2").is_ok());
        for bad in [
            "", "a/b/c", "a/", "/b", "a b/c", "a/b@", "a/b@x y", "a/b@../x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
