//! Listing, verifying and garbage-collecting the store.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::manifest::parse_manifest;
use crate::{ActionKey, ArtifactDigest, Cache, CacheError, Manifest, io_err};

/// One line of `cache ls`.
#[derive(Debug, Clone, Serialize)]
pub struct ActionSummary {
    pub key: ActionKey,
    pub metadata: serde_json::Value,
    pub files: usize,
    pub bytes: u64,
    /// Last use, as the manifest's modification time.
    pub last_used_unix: u64,
    pub duration_ms: u64,
}

/// What `verify` found wrong with one entry.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProblem {
    pub path: PathBuf,
    pub problem: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub actions: usize,
    pub blobs: usize,
    pub problems: Vec<VerifyProblem>,
    /// Staging directories no live process holds: what a killed run left, removed by `gc`.
    pub stale_staging: Vec<PathBuf>,
    /// Entries with a problem, set aside (`quarantine/`): the next run recomputes them.
    pub set_aside: Vec<ActionKey>,
}

#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Keep only these actions (and what they reference); `None` keeps every action.
    pub keep: Option<HashSet<ActionKey>>,
    /// Then drop least-recently-used actions until the blobs fit in this many bytes.
    pub max_bytes: Option<u64>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub actions_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub bytes_kept: u64,
}

/// A manifest file, what parsing it gave, and when it was last used.
type ManifestFile = (PathBuf, Result<Manifest, CacheError>, SystemTime);

impl Cache {
    fn manifests(&self) -> Result<Vec<ManifestFile>, CacheError> {
        let mut out = Vec::new();
        for path in walk_files(&self.base.join("actions"))? {
            if path.extension().is_some_and(|e| e == "json") {
                let modified = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let parsed = fs::read(&path)
                    .map_err(io_err(&path))
                    .and_then(|bytes| parse_manifest(&path, &bytes));
                out.push((path, parsed, modified));
            }
        }
        Ok(out)
    }

    /// Every committed action, most recently used first.
    pub fn list(&self) -> Result<Vec<ActionSummary>, CacheError> {
        let mut list: Vec<ActionSummary> = self
            .manifests()?
            .into_iter()
            .filter_map(|(_, manifest, modified)| {
                let m = manifest.ok()?;
                Some(ActionSummary {
                    key: m.key,
                    files: m.files.len(),
                    bytes: m.total_size(),
                    last_used_unix: unix_secs(modified),
                    duration_ms: m.timings.duration_ms,
                    metadata: m.metadata_value(),
                })
            })
            .collect();
        list.sort_by(|a, b| {
            b.last_used_unix
                .cmp(&a.last_used_unix)
                .then(a.key.cmp(&b.key))
        });
        Ok(list)
    }

    /// Re-hashes every blob that a manifest references and checks every output tree: each
    /// file is the blob's own inode or hashes to its digest, and nothing else is in the tree.
    /// An entry with a problem is set aside ([`Cache::quarantine`]), so that the next run
    /// recomputes it, and a blob whose bytes do not hash to its name is deleted, so that no
    /// recomputed entry can be deduplicated onto it.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        let mut checked: HashSet<ArtifactDigest> = HashSet::new();
        let mut corrupt: BTreeSet<ArtifactDigest> = BTreeSet::new();
        for (path, manifest, _) in self.manifests()? {
            report.actions += 1;
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(VerifyProblem {
                        path,
                        problem: autoscale_errors::one_line(&e),
                    });
                    continue;
                }
            };
            let expected = format!("{}.json", manifest.key);
            if path
                .file_name()
                .is_none_or(|n| n.to_string_lossy() != expected)
            {
                report.problems.push(VerifyProblem {
                    path: path.clone(),
                    problem: format!("file name does not match its key {}", manifest.key),
                });
                continue;
            }
            let mut problems = Vec::new();
            for digest in manifest.files.iter().map(|f| f.digest).chain(manifest.log) {
                if checked.insert(digest) && !self.blob_is_intact(&digest)? {
                    corrupt.insert(digest);
                }
                if corrupt.contains(&digest) {
                    problems.push(VerifyProblem {
                        path: self.blob_path(&digest),
                        problem: format!(
                            "blob {digest} is missing or its bytes do not hash to its name"
                        ),
                    });
                }
            }
            problems.extend(self.check_tree(&manifest)?);
            if let Some(first) = problems.first() {
                self.quarantine(&manifest.key, first)?;
                report.set_aside.push(manifest.key);
            }
            report.problems.extend(problems);
        }
        for digest in &corrupt {
            for path in [self.blob_path(digest), self.compressed_blob_path(digest)] {
                if path.exists() {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        report.blobs = checked.len();
        for entry in fs::read_dir(self.base.join("tmp")).map_err(io_err(&self.base))? {
            let entry = entry.map_err(io_err(&self.base))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = staging_key(&name)
                && let Ok(Ok(_lock)) = self.try_lock(&key, "verify")
            {
                report.stale_staging.push(entry.path());
            }
        }
        Ok(report)
    }

    /// Removes actions not kept, then least-recently-used ones over the size cap, then every
    /// blob and output tree no remaining manifest references.
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let mut live: Vec<(PathBuf, Manifest, SystemTime)> = Vec::new();
        for (path, manifest, modified) in self.manifests()? {
            match manifest {
                Ok(m)
                    if options
                        .keep
                        .as_ref()
                        .is_none_or(|keep| keep.contains(&m.key)) =>
                {
                    // A broken entry is never kept: it could not be served anyway.
                    if let Some(problem) = self.check_entry(&m)? {
                        report.actions_removed += 1;
                        if !options.dry_run {
                            self.quarantine(&m.key, &problem)?;
                        }
                        continue;
                    }
                    live.push((path, m, modified));
                }
                _ => {
                    report.actions_removed += 1;
                    if !options.dry_run {
                        fs::remove_file(&path).map_err(io_err(&path))?;
                    }
                }
            }
        }
        if let Some(cap) = options.max_bytes {
            live.sort_by_key(|(_, _, modified)| std::cmp::Reverse(*modified));
            let mut seen = HashSet::new();
            let mut total = 0u64;
            let mut keep_n = live.len();
            for (i, (_, m, _)) in live.iter().enumerate() {
                for f in &m.files {
                    if seen.insert(f.digest) {
                        total = total.saturating_add(f.size);
                    }
                }
                if total > cap {
                    keep_n = i;
                    break;
                }
            }
            for (path, _, _) in live.drain(keep_n..) {
                report.actions_removed += 1;
                if !options.dry_run {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        let referenced: HashSet<ArtifactDigest> = live
            .iter()
            .flat_map(|(_, m, _)| m.files.iter().map(|f| f.digest).chain(m.log))
            .collect();
        let live_keys: BTreeSet<String> = live.iter().map(|(_, m, _)| m.key.to_hex()).collect();
        for path in walk_files(&self.base.join("blobs"))? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let digest = name.trim_end_matches(".zst").parse::<ArtifactDigest>();
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if digest.is_ok_and(|d| referenced.contains(&d)) {
                report.bytes_kept += size;
                continue;
            }
            report.blobs_removed += 1;
            report.bytes_freed += size;
            if !options.dry_run {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        if !options.dry_run {
            for dir in ["out", "scratch", "tmp"] {
                for entry in fs::read_dir(self.base.join(dir)).map_err(io_err(&self.base))? {
                    let entry = entry.map_err(io_err(&self.base))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if dir == "tmp" && left_by_a_dead_process(&name) {
                        let path = entry.path();
                        let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
                        continue;
                    }
                    let Some(key) = staging_key(&name) else {
                        continue;
                    };
                    if dir == "out" && live_keys.contains(&name) {
                        continue;
                    }
                    // A running action holds its lock; leave its staging and scratch alone.
                    if let Ok(Ok(_lock)) = self.try_lock(&key, "gc") {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
            let quarantine = self.base.join("quarantine");
            for entry in fs::read_dir(&quarantine).map_err(io_err(&quarantine))? {
                let path = entry.map_err(io_err(&quarantine))?.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(report)
    }
}

/// The key of a `tmp/` or `out/` folder: `<key>` or a staging attempt's `<key>.<attempt>`.
fn staging_key(name: &str) -> Option<ActionKey> {
    name.split('.').next()?.parse().ok()
}

/// Whether a `tmp/` temp file or folder (`.<label>.<pid>.<n>`) belongs to a process that is
/// gone: a killed run's half-written blob, manifest or materialized tree.
fn left_by_a_dead_process(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some(pid) = rest.split('.').nth(1).and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|pid| rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH))
}

impl Cache {
    /// What is wrong with an entry's output tree, if it is there: a file that is neither the
    /// blob's inode nor hashes to its digest, a missing file, or a file the result never had.
    fn check_tree(&self, manifest: &Manifest) -> Result<Vec<VerifyProblem>, CacheError> {
        let out = self.output_dir(&manifest.key);
        if !out.is_dir() {
            // Rebuilt from blobs on use; the blobs were checked above.
            return Ok(Vec::new());
        }
        let mut problems = Vec::new();
        let mut expected = HashSet::new();
        for file in &manifest.files {
            expected.insert(out.join(&file.path));
            problems.extend(self.check_output_file(&out, file)?);
        }
        for path in walk_files(&out)? {
            if !expected.contains(&path) {
                problems.push(VerifyProblem {
                    path,
                    problem: "is not part of the cached result".into(),
                });
            }
        }
        Ok(problems)
    }
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            if entry.file_type().map_err(io_err(&d))?.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::commit;

    #[test]
    fn verify_finds_a_tampered_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let m = commit(&cache, 1, "hello");
        assert!(cache.verify().unwrap().problems.is_empty());
        let blob = cache.blob_path(&m.files[0].digest);
        let mut perms = fs::metadata(&blob).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        fs::set_permissions(&blob, perms).unwrap();
        fs::write(&blob, "HELLO").unwrap();
        let report = cache.verify().unwrap();
        assert_eq!(report.problems.len(), 1, "{report:?}");
    }

    #[test]
    fn gc_keeps_what_is_asked_and_drops_unreferenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let a = commit(&cache, 1, "a");
        let b = commit(&cache, 2, "b");
        let report = cache
            .gc(&GcOptions {
                keep: Some([a.key].into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(report.actions_removed, 1);
        assert_eq!(report.blobs_removed, 1);
        assert!(cache.lookup(&a.key).unwrap().is_some());
        assert!(cache.lookup(&b.key).unwrap().is_none());
        assert!(!cache.output_dir(&b.key).exists());
        assert!(cache.verify().unwrap().problems.is_empty());
        let capped = cache
            .gc(&GcOptions {
                max_bytes: Some(0),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(capped.actions_removed, 1);
        assert!(cache.list().unwrap().is_empty());
    }
}
