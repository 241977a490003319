//! Per-key locks: an advisory `flock` on a file that also records who holds it and the process
//! group of the stage it runs. The kernel drops the lock when its holder dies, so a dead
//! holder's lock is taken over without any guessing; the new holder learns the dead one's
//! record ([`KeyLock::previous`]), and with it a process group that may still be writing.

use std::fs;
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
    /// The process group of the stage running under the lock, once it has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<ProcessGroup>,
}

/// A stage's process group, as recorded in its key's lock file: enough for a later holder to
/// kill it if its holder died, and not an unrelated group that reused the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessGroup {
    pub pgid: i32,
    /// The group leader's start time (`/proc/<pid>/stat`, clock ticks since boot).
    pub leader_start: u64,
}

/// An exclusive lock on one action key, released on drop.
#[derive(Debug)]
pub struct KeyLock {
    key: ActionKey,
    /// Names this holding of the lock, so each attempt stages into a folder of its own.
    attempt: String,
    holder: LockHolder,
    /// What the lock file said before this holder took it: a holder that died, or one that
    /// released it.
    previous: Option<LockHolder>,
    // Held for its lock; closing the file releases it.
    file: fs::File,
}

impl KeyLock {
    pub fn key(&self) -> &ActionKey {
        &self.key
    }

    pub(crate) fn attempt(&self) -> &str {
        &self.attempt
    }

    /// The record the lock file held before this holder took it.
    pub fn previous(&self) -> Option<&LockHolder> {
        self.previous.as_ref()
    }

    /// Records the process group of the stage now running under this lock, for a holder that
    /// takes the lock over if this process dies (see [`KeyLock::previous`]).
    pub fn record_group(&self, group: ProcessGroup) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let holder = LockHolder {
            group: Some(group),
            ..self.holder.clone()
        };
        let bytes = serde_json::to_vec(&holder).unwrap_or_default();
        self.file.set_len(0)?;
        self.file.write_all_at(&bytes, 0)
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
        let previous = {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io_err(path))?;
            serde_json::from_slice::<LockHolder>(&bytes).ok()
        };
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
            group: None,
        };
        let bytes = serde_json::to_vec(&holder).unwrap_or_default();
        file.set_len(0).map_err(io_err(path))?;
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).map_err(io_err(path))?;
        static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(KeyLock {
            key,
            attempt: format!("{}.{n}.{nanos:08x}", holder.pid),
            holder,
            previous,
            file,
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
        let taken = cache.try_lock(&key, "p/b").unwrap().unwrap();
        assert_eq!(taken.previous().unwrap().label, "p/a");
    }

    #[test]
    fn the_stage_group_is_recorded_for_the_next_holder() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = ActionKey::from(blake3::hash(b"g"));
        let held = cache.lock(&key, "p/a").unwrap();
        let group = ProcessGroup {
            pgid: 4242,
            leader_start: 7,
        };
        held.record_group(group).unwrap();
        let seen = cache.try_lock(&key, "p/b").unwrap().unwrap_err().unwrap();
        assert_eq!(seen.group, Some(group));
        assert_eq!(seen.label, "p/a");
        drop(held);
        let next = cache.lock(&key, "p/b").unwrap();
        assert_eq!(next.previous().unwrap().group, Some(group));
    }
}
