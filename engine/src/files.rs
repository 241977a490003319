//! Workspace file inputs, hashed once and memoized on path, size, mtime and inode.

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
    ino: u64,
    digest: ArtifactDigest,
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
        collect(path, path, &mut files)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len());
        for (rel, full) in files {
            let meta = fs::metadata(&full).map_err(|source| CacheError::Io {
                path: full.clone(),
                source,
            })?;
            let exec = meta.permissions().mode() & 0o111 != 0;
            entries.push((rel, self.file_digest(&full, &meta)?, exec));
        }
        Ok(tree_digest(
            entries.iter().map(|(p, d, x)| (p.as_str(), d, *x)),
        ))
    }

    fn file_digest(&self, path: &Path, meta: &fs::Metadata) -> Result<ArtifactDigest, CacheError> {
        let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        let (size, ino) = (meta.len(), meta.ino());
        if let Ok(memo) = self.memo.lock()
            && let Some(s) = memo.0.get(&abs)
            && s.size == size
            && s.mtime_ns == mtime_ns
            && s.ino == ino
        {
            return Ok(s.digest);
        }
        let digest = hash_file(path)?;
        if let Ok(mut memo) = self.memo.lock() {
            memo.0.insert(
                abs,
                Stamp {
                    size,
                    mtime_ns,
                    ino,
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

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if let Some(rel) = path.strip_prefix(root).ok().and_then(|p| p.to_str()) {
            out.push((rel.to_string(), path.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_survives_a_reload_and_sees_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.txt");
        fs::write(&file, "one").unwrap();
        let memo = dir.path().join("memo.json");
        let hasher = FileHasher::open(memo.clone());
        let d1 = hasher.digest(&file).unwrap();
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
}
