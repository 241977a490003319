//! The autoscale cache: a content-addressed blob store plus an action cache that maps an
//! [`ActionKey`] to the [`Manifest`] of the outputs it produced.
//!
//! It knows nothing of pipelines: a caller hands it a key, a directory of outputs and an opaque
//! JSON record, and gets back digests. Commits are crash-safe (blobs first, manifest last, each
//! through a temp file and a rename), and a per-key [`KeyLock`] keeps two processes from
//! producing the same entry at once.
//!
//! A [`Remote`] cache (a shared directory or an S3-compatible bucket) can stand behind it: a
//! local miss is looked up there, and a commit is uploaded there (see the [`remote`] module).

mod blob;
mod digest;
mod error;
mod health;
mod lock;
mod maintenance;
mod manifest;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use blob::hash_file;
pub use digest::{ActionKey, ArtifactDigest, DigestParseError, tree_digest};
pub use error::CacheError;
pub use lock::{KeyLock, LockHolder, ProcessGroup};
pub use maintenance::{ActionSummary, GcOptions, GcReport, VerifyProblem, VerifyReport};
pub use manifest::{FileEntry, MANIFEST_SCHEMA, Manifest, PendingAction, StageTimings};
pub use remote::{
    HitSource, Remote, RemoteConfig, RemoteError, RemoteMode, RemoteWarning, SyncReport,
};

/// The version of the on-disk layout; a new layout lives beside the old one, never over it.
pub const LAYOUT_VERSION: &str = "v1";

/// A cache rooted at a directory.
///
/// ```text
/// <root>/v1/
///   blobs/ab/abcdef…          file contents, named by blake3, read-only
///   blobs/ab/abcdef….zst      the same, zstd-compressed where that pays (logs)
///   actions/ab/<key>.json     manifest of a finished action, written last
///   out/<key>/…               the action's output tree: read-only hardlinks into blobs/
///   locks/ab/<key>.lock       per-key lock file (flock), holding its holder's pid and host
///   tmp/<key>/                staging area of a running action, removed on commit
///   scratch/<key>/            an action's resumable scratch space (checkpoints)
///   refs/                     small indexes a caller keeps (for example the last key per stage)
///   quarantine/<key>.json     the manifest of an entry found broken, with <key>.why beside it
/// ```
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    base: PathBuf,
    /// A team's shared cache behind this one, if any.
    remote: Option<Arc<Remote>>,
}

/// Where a key's manifest and output tree are in the cache rooted at `root`, without opening
/// it (the no-op fast path only `stat`s them).
pub fn entry_paths(root: &Path, key: &ActionKey) -> (PathBuf, PathBuf) {
    let base = root.join(LAYOUT_VERSION);
    let hex = key.to_hex();
    (
        base.join("actions")
            .join(&hex[..2])
            .join(format!("{hex}.json")),
        base.join("out").join(hex),
    )
}

impl Cache {
    /// Opens (creating when needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = root.into();
        let base = root.join(LAYOUT_VERSION);
        for sub in [
            "blobs",
            "actions",
            "out",
            "locks",
            "tmp",
            "scratch",
            "refs",
            "quarantine",
        ] {
            let dir = base.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(Self {
            root,
            base,
            remote: None,
        })
    }

    /// This cache with a remote cache behind it.
    pub fn with_remote(mut self, remote: Remote) -> Self {
        self.remote = Some(Arc::new(remote));
        self
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    /// What went wrong with the remote since the last call: a remote that is down, slow or
    /// serving a bad entry never fails an operation, it leaves a warning here to show.
    pub fn take_remote_warnings(&self) -> Vec<RemoteWarning> {
        self.remote
            .as_ref()
            .map(|r| r.take_warnings())
            .unwrap_or_default()
    }

    /// Uploads the local entries of `keys` (every local entry when `None`) to the remote.
    pub fn push(&self, keys: Option<&[ActionKey]>) -> Result<SyncReport, CacheError> {
        let remote = self.remote.as_ref().ok_or(RemoteError::NotConfigured)?;
        let all;
        let keys = match keys {
            Some(keys) => keys,
            None => {
                all = self.list()?.into_iter().map(|a| a.key).collect::<Vec<_>>();
                &all
            }
        };
        Ok(remote.push(self, keys)?)
    }

    /// Downloads the remote entries of `keys` (every remote entry when `None`) that are not
    /// local yet, verifying every blob.
    pub fn pull(&self, keys: Option<&[ActionKey]>) -> Result<SyncReport, CacheError> {
        let remote = self.remote.as_ref().ok_or(RemoteError::NotConfigured)?;
        let all;
        let keys = match keys {
            Some(keys) => keys,
            None => {
                all = remote.keys()?;
                &all
            }
        };
        Ok(remote.pull(self, keys)?)
    }

    /// The directory the user named.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a caller may keep its own small index files.
    pub fn refs_dir(&self) -> PathBuf {
        self.base.join("refs")
    }

    /// The read-only output tree of a committed action.
    pub fn output_dir(&self, key: &ActionKey) -> PathBuf {
        entry_paths(&self.root, key).1
    }

    /// Scratch space that survives a killed run of the same key (for checkpoints), and is
    /// removed once the action commits.
    pub fn scratch_dir(&self, key: &ActionKey) -> Result<PathBuf, CacheError> {
        let dir = self.base.join("scratch").join(key.to_hex());
        create_dir(&dir)?;
        Ok(dir)
    }

    /// Where a committed action's manifest is.
    pub fn manifest_path(&self, key: &ActionKey) -> PathBuf {
        entry_paths(&self.root, key).0
    }

    /// The staging folder of one attempt: `tmp/<key>.<attempt>`. A process left over from an
    /// earlier attempt (a killed run's stage) can only write into its own attempt's folder,
    /// never into the one a later attempt will store.
    fn staging_dir(&self, lock: &KeyLock) -> PathBuf {
        self.base
            .join("tmp")
            .join(format!("{}.{}", lock.key().to_hex(), lock.attempt()))
    }

    pub(crate) fn tmp_file(&self, label: &str) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.base
            .join("tmp")
            .join(format!(".{label}.{}.{n}", std::process::id()))
    }

    /// Flushes everything written so far to stable storage with one `syncfs`, so that a batch
    /// of blobs costs one flush instead of one `fsync` each.
    pub fn sync(&self) -> Result<(), CacheError> {
        let dir = std::fs::File::open(&self.base).map_err(|source| CacheError::Io {
            path: self.base.clone(),
            source,
        })?;
        rustix::fs::syncfs(&dir).map_err(|e| CacheError::Io {
            path: self.base.clone(),
            source: e.into(),
        })
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), CacheError> {
    std::fs::create_dir_all(dir).map_err(|source| CacheError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{ActionKey, Cache, Manifest, StageTimings};

    /// Commits one action of key `blake3([n])` whose output is a file `f` holding `content`.
    pub fn commit(cache: &Cache, n: u8, content: &str) -> Manifest {
        let key = ActionKey::from(blake3::hash(&[n]));
        let lock = cache.lock(&key, "t").unwrap();
        let staging = cache.staging(&lock).unwrap();
        std::fs::write(staging.join("out/f"), content).unwrap();
        let p = cache
            .ingest(
                lock,
                b"",
                serde_json::Value::Null,
                serde_json::json!({"n": n}),
                StageTimings::default(),
            )
            .unwrap();
        cache.commit(vec![p]).unwrap().remove(0)
    }
}
