//! Small file-system helpers for the caches: an inter-process lock file, temporary files that
//! vanish unless renamed into place, and streaming sha256.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Prefix of every temporary file we create inside a cache directory.
pub(crate) const TMP_PREFIX: &str = ".lqa-tmp-";

/// An exclusive, blocking, inter-process lock held on a lock file. The lock file is removed when
/// the lock is released, so a cache directory holds no lock files at rest.
///
/// Removing a lock file is racy on its own (a waiter may lock the removed inode while a newcomer
/// creates and locks a new file), so after locking we check that the path still names the file
/// we locked, and start over if it does not.
pub(crate) struct FileLock {
    path: PathBuf,
    // dropped (and so unlocked) after `Drop::drop` has removed the path
    _file: File,
}

impl FileLock {
    /// Block until the lock at `path` is ours; `what` names the guarded work in the message shown
    /// while waiting for another process.
    pub(crate) fn acquire(path: &Path, what: &str) -> Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut announced = false;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !announced {
                        tracing::info!("waiting for another lqa process ({what})");
                        announced = true;
                    }
                    file.lock().map_err(|e| Error::io(path, e))?;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
            }
            if still_names(path, &file) {
                return Ok(FileLock {
                    path: path.to_path_buf(),
                    _file: file,
                });
            }
            // the holder before us removed the file: lock whatever is there now
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // remove while still holding the lock (see the type's doc); on platforms where an open
        // file cannot be removed this fails harmlessly and the file stays
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn still_names(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_names(path: &Path, _file: &File) -> bool {
    path.exists()
}

/// A file being written under a temporary name in its final directory. It is removed on drop
/// unless [`TempFile::persist`] renamed it into place.
pub(crate) struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Create `DIR/.lqa-tmp-STEM-PID-N.part`.
    pub(crate) fn new_in(dir: &Path, stem: &str) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{TMP_PREFIX}{stem}-{}-{n}.part",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    /// Write all of `buf`.
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .expect("temp file is open until persisted");
        file.write_all(buf).map_err(|e| Error::io(&self.path, e))
    }

    /// Flush to disk and rename onto `dest` (atomic on one file system).
    pub(crate) fn persist(mut self, dest: &Path) -> Result<()> {
        let file = self.file.take().expect("temp file is open until persisted");
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        drop(file);
        std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?;
        // renamed: nothing left for Drop to remove
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file.take();
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Remove leftovers of [`TempFile`]s from interrupted runs. Call only while holding the lock
/// that guards every writer of `dir`.
pub(crate) fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Lower-case hex sha256 of a whole file.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(hasher))
}

/// Lower-case hex of a finished hasher.
pub(crate) fn hex(hasher: Sha256) -> String {
    format!("{:x}", hasher.finalize())
}
