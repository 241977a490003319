//! Whether a committed entry can still be served, and setting aside the ones that cannot.
//!
//! A manifest says what an action produced; the bytes live in `blobs/` and, as hard links to
//! the same inodes, in `out/<key>/`. Someone can replace a file in `out/<key>/`, edit a blob in
//! place or delete both. Every hit runs [`Cache::check_entry`], which only `stat`s when the
//! output tree is made of the blobs' own inodes and hashes a file only when it is not. An entry
//! found broken (there, or by `verify`'s full re-hash) is moved to `quarantine/` with the
//! reason beside it, so that it is a miss everywhere and the next run recomputes it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{ActionKey, Cache, CacheError, FileEntry, Manifest, VerifyProblem, hash_file, io_err};

impl Cache {
    /// The first reason the entry cannot be served, if any. Cheap: one `stat` of each output
    /// file and of its blob; a file is hashed only when it is not the blob's own inode (a
    /// replaced file, or a tree copied where hard links were refused). A blob edited in place
    /// keeps its inode and is found by `verify`, which re-hashes every blob.
    pub fn check_entry(&self, manifest: &Manifest) -> Result<Option<VerifyProblem>, CacheError> {
        let out = self.output_dir(&manifest.key);
        if !out.is_dir() {
            // The tree is rebuilt from blobs on use (hard links to them), as long as they are
            // all there at their size: a short blob left from an interrupted download or a
            // damaged store would otherwise be linked in and served.
            for file in &manifest.files {
                if !self.has_blob_of_size(&file.digest, Some(file.size)) {
                    return Ok(Some(VerifyProblem {
                        path: self.blob_path(&file.digest),
                        problem: format!(
                            "the blob of `{}` is missing or not its size, and the output folder is gone",
                            file.path
                        ),
                    }));
                }
            }
            return Ok(None);
        }
        for file in &manifest.files {
            if let Some(problem) = self.check_output_file(&out, file)? {
                return Ok(Some(problem));
            }
        }
        Ok(None)
    }

    /// What is wrong with one file of an output tree `out`, if anything: missing, not a regular
    /// file, another size, or neither the blob's own inode nor hashing to its digest.
    pub(crate) fn check_output_file(
        &self,
        out: &Path,
        file: &FileEntry,
    ) -> Result<Option<VerifyProblem>, CacheError> {
        let path = out.join(&file.path);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // A file where a folder of the path belongs says `NotADirectory`.
            Err(e) => {
                let problem = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
                        "missing from the output folder".to_string()
                    }
                    _ => format!("cannot be read: {e}"),
                };
                return Ok(Some(VerifyProblem { path, problem }));
            }
        };
        let problem = if !meta.is_file() {
            Some("is no longer a regular file".to_string())
        } else if meta.len() != file.size {
            Some(format!(
                "size {} differs from the manifest's {}",
                meta.len(),
                file.size
            ))
        } else {
            let same_inode = fs::metadata(self.blob_path(&file.digest))
                .is_ok_and(|blob| blob.dev() == meta.dev() && blob.ino() == meta.ino());
            (!same_inode && hash_file(&path)? != file.digest)
                .then(|| format!("its bytes no longer hash to {}", file.digest.short()))
        };
        Ok(problem.map(|problem| VerifyProblem { path, problem }))
    }

    /// Takes a broken entry out of service: its manifest moves to `quarantine/<key>.json` with
    /// the reason in `quarantine/<key>.why`, and its output tree is removed. Racing another
    /// process that does the same is harmless; either way the key is a miss afterwards.
    pub fn quarantine(&self, key: &ActionKey, problem: &VerifyProblem) -> Result<(), CacheError> {
        let dir = self.base.join("quarantine");
        crate::create_dir(&dir)?;
        let hex = key.to_hex();
        let why = dir.join(format!("{hex}.why"));
        fs::write(
            &why,
            format!("{}: {}\n", problem.path.display(), problem.problem),
        )
        .map_err(io_err(&why))?;
        let manifest = self.manifest_path(key);
        match fs::rename(&manifest, dir.join(format!("{hex}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&manifest)(e)),
        }
        tracing::warn!(key = %key.short(), problem = %problem.problem, path = %problem.path.display(), "cache entry is broken; set aside");
        remove_tree(&self.output_dir(key))
    }

    /// Why the entry of `key` was set aside, if it was (and not recomputed since).
    pub fn quarantined(&self, key: &ActionKey) -> Option<String> {
        if self.manifest_path(key).exists() {
            return None;
        }
        let why = self
            .base
            .join("quarantine")
            .join(format!("{}.why", key.to_hex()));
        fs::read_to_string(why).ok().map(|s| s.trim().to_string())
    }
}

/// Removes a read-only output tree (its folders are writable; its files need not be).
pub(crate) fn remove_tree(dir: &Path) -> Result<(), CacheError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testing::commit;

    fn replace(path: &Path, content: &str) {
        fs::remove_file(path).unwrap();
        fs::write(path, content).unwrap();
    }

    #[test]
    fn a_replaced_output_file_is_a_miss_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 1, "good");
        replace(&cache.output_dir(&m.key).join("f"), "evil");
        assert!(cache.lookup(&m.key).unwrap().is_none());
        let why = cache.quarantined(&m.key).unwrap();
        assert!(why.contains("no longer hash"), "{why}");
        assert!(!cache.output_dir(&m.key).exists());
        // The recomputed entry replaces it, and is served.
        let again = commit(&cache, 1, "good");
        assert_eq!(cache.lookup(&again.key).unwrap().unwrap().tree, m.tree);
        assert_eq!(cache.quarantined(&m.key), None);
    }

    #[test]
    fn a_replaced_file_of_the_same_content_is_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 2, "same");
        replace(&cache.output_dir(&m.key).join("f"), "same");
        assert!(cache.lookup(&m.key).unwrap().is_some());
    }

    #[test]
    fn an_entry_without_blobs_or_tree_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 3, "gone");
        fs::remove_dir_all(cache.output_dir(&m.key)).unwrap();
        fs::remove_file(cache.blob_path(&m.files[0].digest)).unwrap();
        assert!(cache.lookup(&m.key).unwrap().is_none());
        assert!(cache.quarantined(&m.key).unwrap().contains("missing"));
    }

    #[test]
    fn a_short_blob_is_not_linked_into_a_rebuilt_tree() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 5, "whole");
        fs::remove_dir_all(cache.output_dir(&m.key)).unwrap();
        let blob = cache.blob_path(&m.files[0].digest);
        fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&blob, "who").unwrap();
        assert!(cache.lookup(&m.key).unwrap().is_none());
        assert!(cache.quarantined(&m.key).unwrap().contains("not its size"));
    }

    #[test]
    fn a_blob_edited_in_place_is_found_by_verify_and_then_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 4, "12345");
        let blob = cache.blob_path(&m.files[0].digest);
        fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&blob, "54321").unwrap();
        let report = cache.verify().unwrap();
        assert!(!report.problems.is_empty());
        assert_eq!(report.set_aside, vec![m.key]);
        assert!(cache.lookup(&m.key).unwrap().is_none());
        assert!(!blob.exists(), "a corrupt blob is dropped, never reused");
        // A recompute stores the right bytes again.
        let again = commit(&cache, 4, "12345");
        assert!(cache.check_entry(&again).unwrap().is_none());
        assert!(cache.verify().unwrap().problems.is_empty());
    }
}
