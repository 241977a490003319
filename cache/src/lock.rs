//! Per-key locks: an advisory `flock` on a file that also records who holds it. The kernel drops
//! the lock when its holder dies, so a dead holder's lock is taken over without any guessing.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ActionKey, Cache, CacheError, create_dir, io_err};

/// Who holds a key, as written into its lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    pub since_unix: u64,
    /// What the holder is doing, for example `pipeline/stage`.
    pub label: String,
}

/// An exclusive lock on one action key, released on drop.
#[derive(Debug)]
pub struct KeyLock {
    key: ActionKey,
    /// Names this holding of the lock, so each attempt stages into a folder of its own.
    attempt: String,
    // Held for its lock; closing the file releases it.
    _file: fs::File,
}

impl KeyLock {
    pub fn key(&self) -> &ActionKey {
        &self.key
    }

    pub(crate) fn attempt(&self) -> &str {
        &self.attempt
    }
}

impl Cache {
    fn lock_path(&self, key: &ActionKey) -> PathBuf {
        let hex = key.to_hex();
        self.base
            .join("locks")
            .join(&hex[..2])
            .join(format!("{hex}.lock"))
    }

    fn open_lock_file(&self, key: &ActionKey) -> Result<(fs::File, PathBuf), CacheError> {
        let path = self.lock_path(key);
        create_dir(path.parent().unwrap_or(&self.base))?;
        let file = fs::File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((file, path))
    }

    /// Takes the key's lock if it is free; otherwise returns who holds it (when they said).
    pub fn try_lock(
        &self,
        key: &ActionKey,
        label: &str,
    ) -> Result<Result<KeyLock, Option<LockHolder>>, CacheError> {
        let (file, path) = self.open_lock_file(key)?;
        match file.try_lock() {
            Ok(()) => Ok(Ok(self.record_holder(*key, file, &path, label)?)),
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                Ok(Err(holder))
            }
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// Waits for the key's lock.
    pub fn lock(&self, key: &ActionKey, label: &str) -> Result<KeyLock, CacheError> {
        let (file, path) = self.open_lock_file(key)?;
        file.lock().map_err(io_err(&path))?;
        self.record_holder(*key, file, &path, label)
    }

    fn record_holder(
        &self,
        key: ActionKey,
        mut file: fs::File,
        path: &std::path::Path,
        label: &str,
    ) -> Result<KeyLock, CacheError> {
        let holder = LockHolder {
            pid: std::process::id(),
            host: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            since_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            label: label.to_string(),
        };
        let bytes = serde_json::to_vec(&holder).unwrap_or_default();
        file.set_len(0).map_err(io_err(path))?;
        file.write_all(&bytes).map_err(io_err(path))?;
        static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(KeyLock {
            key,
            attempt: format!("{}.{n}.{nanos:08x}", holder.pid),
            _file: file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_locker_sees_the_holder_and_gets_it_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = ActionKey::from(blake3::hash(b"k"));
        let held = cache.try_lock(&key, "p/a").unwrap().unwrap();
        let holder = cache.try_lock(&key, "p/b").unwrap().unwrap_err().unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.label, "p/a");
        drop(held);
        assert!(cache.try_lock(&key, "p/b").unwrap().is_ok());
    }
}
