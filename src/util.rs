//! Small file helpers: atomic writes and directory swaps, so that an interrupted run never
//! leaves a half-written checkpoint or output behind.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A temporary name next to `path` (same directory, so the rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_replace(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Write `value` as pretty JSON to `path` atomically.
pub fn atomic_write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::bad_file(path, e))?;
    atomic_write(path, text.as_bytes())
}

/// Let `write` fill a temporary file, then rename it over `path`. On error the temporary file
/// is removed and `path` is untouched.
pub fn atomic_replace(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    // a writer killed between filling its temporary file and the rename left it behind
    remove_stale_tmp(path, true);
    let tmp = temp_path(path);
    match write(&tmp).and_then(|()| readable(&tmp)) {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Build the directory `path` atomically: `fill` writes the new contents into
/// `<path>.tmp<PID>` (a leftover one is removed first); then the current `path`, if any, is
/// renamed to `<path>.old`, the new one renamed into place, and `<path>.old` removed. The
/// previous contents are replaced only once the new ones are complete; a swap interrupted
/// between the two renames leaves `<path>.old`, which [`recover_dir`] puts back. On error the
/// temporary directory is removed and `path` is untouched.
pub fn atomic_dir(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(path, &format!("tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(path, "old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if path.exists() {
        std::fs::rename(path, &old).map_err(|e| Error::io(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// An [`atomic_dir`] swap interrupted between its two renames leaves `<path>.old` and no
/// `path`: rename it back. A writer killed while filling leaves `<path>.tmp<PID>`: such
/// folders of processes that are gone are removed (never read).
pub fn recover_dir(path: &Path) -> Result<()> {
    let old = sibling(path, "old");
    if !path.exists() && old.exists() {
        std::fs::rename(&old, path).map_err(|e| Error::io(path, e))?;
    }
    remove_stale_tmp(path, false);
    Ok(())
}

/// Remove the temporary siblings of `path` left by writers that no longer run (best effort):
/// [`temp_path`]'s files `.<name>.tmp<PID>` (`files`), or [`atomic_dir`]'s folders
/// `<name>.tmp<PID>`.
fn remove_stale_tmp(path: &Path, files: bool) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = match files {
        true => format!(".{}.tmp", name.to_string_lossy()),
        false => format!("{}.tmp", name.to_string_lossy()),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            if files {
                let _ = std::fs::remove_file(e.path());
            } else {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Whether a process with this id exists (on other systems: assume it does).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// `<path>.<suffix>`: `checkpoint` -> `checkpoint.old`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Make a file readable by everyone (`rw-r--r--`): some writers (safetensors) create files
/// private to the owner, which is wrong for outputs and shipped adapters.
fn readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Keep freed memory for reuse instead of handing it back to the kernel (glibc only; a no-op
/// elsewhere). A training or control step frees and re-allocates gigabytes of temporaries;
/// by default glibc returns blocks above its (dynamic) mmap threshold to the kernel and the next
/// step faults them in again, zeroed: ~15 % of a LIT step. With blocks up to 32 MiB served from
/// the heap and no trimming, they are reused. Call once at start-up, before other threads run.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets malloc parameters; called before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}

/// Hand malloc's free memory back to the OS (glibc's `malloc_trim`): [`tune_allocator`] keeps
/// freed memory for reuse, and after a model load that is the loader's temporary f32 copies
/// (about 50 MiB on the default model, whose packed weights live in their own mappings).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer killed between filling its temporary file and the rename leaves
    /// `.<name>.tmp<PID>`: the next atomic write of the same file removes it when that process
    /// is gone, and leaves a live writer's alone.
    #[test]
    fn atomic_write_removes_temp_files_of_dead_writers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.svg");
        let dead = dir.path().join(".loss.svg.tmp99999999"); // no such process
        let live = dir.path().join(".loss.svg.tmp1"); // init runs
        let other = dir.path().join(".metrics.jsonl.tmp99999999"); // another file's
        for f in [&dead, &live, &other] {
            std::fs::write(f, "half").unwrap();
        }
        atomic_write(&out, b"<svg/>").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"<svg/>");
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }
}
