//! Workspace file inputs, hashed once and memoized on path, size, mtime, ctime and inode.
//!
//! A memo entry is trusted only when the file's mtime and ctime are older than the moment it
//! was hashed (git's "racy clean" rule): a file written in the same clock tick as its hashing,
//! or edited with its mtime put back (`touch -r`, which still moves the ctime), is hashed again.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use autoscale_cache::{ArtifactDigest, CacheError, hash_file, tree_digest};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    #[serde(default)]
    ctime_ns: i128,
    ino: u64,
    /// Wall clock when the hashing started; 0 in memos written before it was recorded.
    #[serde(default)]
    hashed_ns: i128,
    digest: ArtifactDigest,
}

/// A stamp is racy when the file changed less than this before it was hashed: timestamps are
/// coarser than the clock on some filesystems.
pub(crate) const RACY_NS: i128 = 2_000_000_000;

pub(crate) fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// A file's mtime and ctime, in nanoseconds.
pub(crate) fn change_times_ns(meta: &fs::Metadata) -> (i128, i128) {
    (
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    )
}

/// Git's racy rule: a file changed within [`RACY_NS`] of `at` may change again unseen.
pub(crate) fn racy(mtime_ns: i128, ctime_ns: i128, at_ns: i128) -> bool {
    mtime_ns.max(ctime_ns) + RACY_NS >= at_ns
}

/// Content digests of workspace files, remembered across runs in one small JSON file.
#[derive(Debug)]
pub struct FileHasher {
    path: PathBuf,
    memo: Mutex<(HashMap<PathBuf, Stamp>, bool)>,
}

impl FileHasher {
    pub fn open(path: PathBuf) -> Self {
        let memo = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            memo: Mutex::new((memo, false)),
        }
    }

    /// The digest of a file, or of a directory as a tree of its files.
    pub fn digest(&self, path: &Path) -> Result<ArtifactDigest, CacheError> {
        let io = |source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        if !meta.is_dir() {
            return self.file_digest(path, &meta);
        }
        let mut files = Vec::new();
        let mut seen = std::collections::HashSet::from([(meta.dev(), meta.ino())]);
        collect(path, path, &mut files, &mut seen)?;
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries = Vec::with_capacity(files.len());
        for (rel, full, meta) in files {
            let exec = meta.permissions().mode() & 0o111 != 0;
            entries.push((rel, self.file_digest(&full, &meta)?, exec));
        }
        Ok(tree_digest(
            entries.iter().map(|(p, d, x)| (p.as_str(), d, *x)),
        ))
    }

    fn file_digest(&self, path: &Path, meta: &fs::Metadata) -> Result<ArtifactDigest, CacheError> {
        if !meta.is_file() {
            // A device or FIFO would never end (`/dev/zero`) or block the hasher.
            return Err(CacheError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file (a device, FIFO or socket); inputs are hashed by content",
                ),
            });
        }
        let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let (mtime_ns, ctime_ns) = change_times_ns(meta);
        let (size, ino) = (meta.len(), meta.ino());
        if let Ok(memo) = self.memo.lock()
            && let Some(s) = memo.0.get(&abs)
            && s.size == size
            && s.mtime_ns == mtime_ns
            && s.ctime_ns == ctime_ns
            && s.ino == ino
            && !racy(mtime_ns, ctime_ns, s.hashed_ns)
        {
            return Ok(s.digest);
        }
        let hashed_ns = now_ns();
        let digest = hash_file(path)?;
        if let Ok(mut memo) = self.memo.lock() {
            memo.0.insert(
                abs,
                Stamp {
                    size,
                    mtime_ns,
                    ctime_ns,
                    ino,
                    hashed_ns,
                    digest,
                },
            );
            memo.1 = true;
        }
        Ok(digest)
    }

    /// Writes the memo back if anything new was hashed. Losing it only costs a re-hash.
    pub fn save(&self) {
        let Ok(mut memo) = self.memo.lock() else {
            return;
        };
        if !memo.1 {
            return;
        }
        if let Ok(bytes) = serde_json::to_vec(&memo.0) {
            let tmp = self
                .path
                .with_extension(format!("tmp.{}", std::process::id()));
            if fs::write(&tmp, bytes).is_ok() {
                let _ = fs::rename(&tmp, &self.path);
            }
        }
        memo.1 = false;
    }
}

/// The files under `dir` with their metadata, following symlinks; `seen` holds the folders above this one, so that a
/// symlink back up the tree is refused instead of walked forever.
fn collect(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf, fs::Metadata)>,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(|source| CacheError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            if !seen.insert((meta.dev(), meta.ino())) {
                return Err(CacheError::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a symlink loops back to a folder the input already holds",
                    ),
                });
            }
            collect(root, &path, out, seen)?;
            seen.remove(&(meta.dev(), meta.ino()));
        } else {
            // A name that is not UTF-8 cannot enter the tree digest as it is; skipping it
            // would let its changes go unseen, so it is refused.
            let Some(rel) = path.strip_prefix(root).ok().and_then(|p| p.to_str()) else {
                return Err(CacheError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "an input file's name is not valid UTF-8, so its changes could not be tracked; rename it",
                    ),
                });
            };
            out.push((rel.to_string(), path.clone(), meta));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pretends every hashing happened well after the write, as it does on any later run.
    fn age_memo(hasher: &FileHasher) {
        for stamp in hasher.memo.lock().unwrap().0.values_mut() {
            stamp.hashed_ns += 10 * RACY_NS;
        }
    }

    #[test]
    fn memo_survives_a_reload_and_sees_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.txt");
        fs::write(&file, "one").unwrap();
        let memo = dir.path().join("memo.json");
        let hasher = FileHasher::open(memo.clone());
        let d1 = hasher.digest(&file).unwrap();
        hasher.save();
        age_memo(&hasher);
        hasher.memo.lock().unwrap().1 = true;
        hasher.save();
        let reloaded = FileHasher::open(memo);
        assert_eq!(reloaded.digest(&file).unwrap(), d1);
        assert!(!reloaded.memo.lock().unwrap().1, "served from the memo");
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&file, "two").unwrap();
        assert_ne!(reloaded.digest(&file).unwrap(), d1);
        let tree = reloaded.digest(dir.path()).unwrap();
        assert_ne!(tree, d1);
    }

    /// The repro: a same-size edit with the mtime put back (`touch -r`). The ctime moved,
    /// so the file is hashed again.
    #[test]
    fn an_edit_with_its_mtime_restored_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.txt");
        fs::write(&file, "aaaa").unwrap();
        let hasher = FileHasher::open(dir.path().join("memo.json"));
        let before = hasher.digest(&file).unwrap();
        age_memo(&hasher);
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&file, "bbbb").unwrap();
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        assert_ne!(hasher.digest(&file).unwrap(), before);
    }

    /// A file hashed in the same moment it was written is not trusted from the memo: a write
    /// later in that clock tick would keep the same mtime.
    #[test]
    fn a_racy_stamp_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.txt");
        fs::write(&file, "one").unwrap();
        let hasher = FileHasher::open(dir.path().join("memo.json"));
        hasher.digest(&file).unwrap();
        hasher.memo.lock().unwrap().1 = false;
        hasher.digest(&file).unwrap();
        assert!(hasher.memo.lock().unwrap().1, "hashed again, not served");
    }

    #[test]
    fn a_directory_input_with_a_non_utf8_name_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir(&input).unwrap();
        fs::write(input.join(std::ffi::OsStr::from_bytes(b"bad\xff")), "x").unwrap();
        let hasher = FileHasher::open(dir.path().join("memo.json"));
        let err = hasher.digest(&input).unwrap_err();
        assert!(format!("{err:?}").contains("not valid UTF-8"), "{err:?}");
    }
}
