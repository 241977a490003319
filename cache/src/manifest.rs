//! The action cache: manifests of finished actions, and the two-step commit that writes them.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    ActionKey, ArtifactDigest, Cache, CacheError, HitSource, KeyLock, create_dir, io_err,
    tree_digest,
};

/// The manifest format this build reads and writes.
pub const MANIFEST_SCHEMA: u32 = 1;

/// A manifest read within this long of its last use is not touched again (keeps no-op runs
/// free of writes while still giving `gc` a least-recently-used order).
const TOUCH_AFTER: Duration = Duration::from_secs(3600);

/// One file of an action's output tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the output directory, `/`-separated.
    pub path: String,
    pub digest: ArtifactDigest,
    pub size: u64,
    #[serde(default)]
    pub executable: bool,
}

/// When the action ran and for how long.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimings {
    pub started_unix_ms: u64,
    pub duration_ms: u64,
}

/// What the action cache stores for a key. The caller's JSON stays unparsed until asked for,
/// so a no-op run over thousands of stages does not build JSON trees it never reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub key: ActionKey,
    /// The digest of the whole output tree.
    pub tree: ArtifactDigest,
    pub files: Vec<FileEntry>,
    /// The action's combined stdout and stderr.
    pub log: Option<ArtifactDigest>,
    /// The caller's key record: what was hashed into `key`, kept so a rerun can be explained.
    pub record: Box<RawValue>,
    /// Whatever else the caller wants to keep (stage id, pipeline, metrics).
    pub metadata: Box<RawValue>,
    pub timings: StageTimings,
}

impl Manifest {
    /// The digest of an output path: `""` is the whole tree, a file gives its content digest,
    /// a directory the digest of the subtree under it.
    pub fn digest_of(&self, path: &str) -> Option<ArtifactDigest> {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return Some(self.tree);
        }
        if let Some(file) = self.files.iter().find(|f| f.path == path) {
            return Some(file.digest);
        }
        let prefix = format!("{path}/");
        let sub: Vec<_> = self
            .files
            .iter()
            .filter_map(|f| {
                f.path
                    .strip_prefix(&prefix)
                    .map(|rel| (rel, &f.digest, f.executable))
            })
            .collect();
        (!sub.is_empty()).then(|| tree_digest(sub))
    }

    /// The caller's key record, parsed.
    pub fn record_value(&self) -> serde_json::Value {
        serde_json::from_str(self.record.get()).unwrap_or(serde_json::Value::Null)
    }

    /// The caller's metadata, parsed.
    pub fn metadata_value(&self) -> serde_json::Value {
        serde_json::from_str(self.metadata.get()).unwrap_or(serde_json::Value::Null)
    }

    pub fn total_size(&self) -> u64 {
        // Saturating: a hand-edited manifest may claim sizes that overflow.
        self.files
            .iter()
            .fold(0u64, |n, f| n.saturating_add(f.size))
    }
}

/// An action whose blobs are in the store but whose manifest is not yet written. It holds the
/// key's lock until [`Cache::commit`] writes the manifest.
#[derive(Debug)]
pub struct PendingAction {
    pub manifest: Manifest,
    lock: KeyLock,
}

impl Cache {
    /// Looks a key up, here and then in the remote cache: a remote hit is downloaded, every
    /// blob verified, and stored locally before it is returned. A missing entry is `Ok(None)`;
    /// a local manifest of an unknown schema is an error, never silently reused. Remote
    /// problems are never errors here: they leave a warning (see
    /// [`Cache::take_remote_warnings`]) and the key counts as missing.
    pub fn lookup(&self, key: &ActionKey) -> Result<Option<Manifest>, CacheError> {
        if let Some(manifest) = self.lookup_local(key)? {
            return Ok(Some(manifest));
        }
        Ok(self.remote.as_ref().and_then(|r| r.fetch(self, key)))
    }

    /// As [`Cache::lookup`], asking the remote again even where it lacked the key before: for
    /// a result another machine was computing, and may have uploaded since.
    pub fn lookup_again(&self, key: &ActionKey) -> Result<Option<Manifest>, CacheError> {
        if let Some(remote) = &self.remote {
            remote.forget(key);
        }
        self.lookup(key)
    }

    /// Where a key's entry is, without downloading anything: the local manifest, or the remote
    /// one (checked, but its blobs not yet fetched). What `status` uses.
    pub fn find(&self, key: &ActionKey) -> Result<Option<(Manifest, HitSource)>, CacheError> {
        if let Some(manifest) = self.lookup_local(key)? {
            return Ok(Some((manifest, HitSource::Local)));
        }
        Ok(self
            .remote
            .as_ref()
            .and_then(|r| r.entry(key))
            .map(|entry| (entry.manifest.clone(), HitSource::Remote)))
    }

    /// Asks the remote cache for many keys at once, ahead of [`Cache::find`] or
    /// [`Cache::lookup`] of each; a no-op without a remote.
    pub fn prefetch(&self, keys: &[ActionKey]) {
        if let Some(remote) = &self.remote {
            let missing: Vec<ActionKey> = keys
                .iter()
                .filter(|k| !self.manifest_path(k).exists())
                .copied()
                .collect();
            remote.prefetch(&missing);
        }
    }

    /// Looks a key up in this cache only. An entry found broken ([`Cache::check_entry`]) is
    /// set aside and is a miss.
    pub fn lookup_local(&self, key: &ActionKey) -> Result<Option<Manifest>, CacheError> {
        let path = self.manifest_path(key);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let manifest = parse_manifest(&path, &bytes)?;
        if let Some(problem) = self.check_entry(&manifest)? {
            self.quarantine(key, &problem)?;
            return Ok(None);
        }
        if let Ok(modified) = file.metadata().and_then(|m| m.modified())
            && modified.elapsed().is_ok_and(|age| age > TOUCH_AFTER)
            && let Ok(f) = fs::File::options().append(true).open(&path)
        {
            // Best effort: a read-only cache still serves hits.
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(manifest))
    }

    /// Makes sure a committed action's output tree is on disk, rebuilding it from blobs when it
    /// was removed, and returns its path.
    pub fn materialize(&self, manifest: &Manifest) -> Result<PathBuf, CacheError> {
        let dir = self.output_dir(&manifest.key);
        if dir.is_dir() {
            return Ok(dir);
        }
        let staging = self.tmp_file("materialize");
        for file in &manifest.files {
            let target = staging.join(&file.path);
            create_dir(target.parent().unwrap_or(&staging))?;
            self.link_blob(&file.digest, &target)?;
        }
        create_dir(&staging)?;
        match fs::rename(&staging, &dir) {
            Ok(()) => Ok(dir),
            // Someone else materialized it first.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(dir)
            }
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    fn link_blob(&self, digest: &ArtifactDigest, target: &Path) -> Result<(), CacheError> {
        let raw = self.blob_path(digest);
        if fs::hard_link(&raw, target).is_ok() {
            return Ok(());
        }
        if raw.exists() {
            fs::copy(&raw, target).map_err(io_err(target))?;
        } else {
            let bytes = self.read_blob(digest)?;
            fs::write(target, bytes).map_err(io_err(target))?;
        }
        let mut perms = fs::metadata(target).map_err(io_err(target))?.permissions();
        perms.set_mode(perms.mode() & 0o555);
        fs::set_permissions(target, perms).map_err(io_err(target))
    }

    /// A fresh, empty staging directory for this attempt at a key whose lock the caller
    /// holds. The folders of earlier attempts (a killed holder's) are removed first.
    pub fn staging(&self, lock: &KeyLock) -> Result<PathBuf, CacheError> {
        let tmp = self.base.join("tmp");
        let prefix = format!("{}.", lock.key().to_hex());
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = self.staging_dir(lock);
        create_dir(&dir.join("out"))?;
        Ok(dir)
    }

    /// Moves a finished action's outputs (`<staging>/out`) into the store and lays out its
    /// read-only output tree. The manifest is not written yet: see [`Cache::commit`].
    pub fn ingest(
        &self,
        lock: KeyLock,
        log: &[u8],
        record: serde_json::Value,
        metadata: serde_json::Value,
        timings: StageTimings,
    ) -> Result<PendingAction, CacheError> {
        let key = *lock.key();
        let staging = self.staging_dir(&lock);
        let out = staging.join("out");
        let tree = staging.join("tree");
        create_dir(&tree)?;
        let mut files = Vec::new();
        collect_files(&out, &out, &mut files)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len());
        for (rel, path) in files {
            let meta = fs::metadata(&path).map_err(io_err(&path))?;
            let executable = meta.permissions().mode() & 0o111 != 0;
            let digest = self.adopt_file(&path)?;
            let target = tree.join(&rel);
            if let Some(parent) = target.parent() {
                create_dir(parent)?;
            }
            self.link_blob(&digest, &target)?;
            entries.push(FileEntry {
                path: rel,
                digest,
                size: meta.len(),
                executable,
            });
        }
        let tree_digest = tree_digest(
            entries
                .iter()
                .map(|e| (e.path.as_str(), &e.digest, e.executable)),
        );
        let raw = |v: serde_json::Value| {
            serde_json::value::to_raw_value(&v).map_err(|source| CacheError::BadManifest {
                path: staging.clone(),
                source,
            })
        };
        let (record, metadata) = (raw(record)?, raw(metadata)?);
        let log = if log.is_empty() {
            None
        } else {
            Some(self.put_bytes(log)?)
        };
        // Left by a run that was killed before its manifest was written, or by a broken entry.
        let dir = self.output_dir(&key);
        crate::health::remove_tree(&dir)?;
        fs::rename(&tree, &dir).map_err(io_err(&dir))?;
        Ok(PendingAction {
            manifest: Manifest {
                schema: MANIFEST_SCHEMA,
                key,
                tree: tree_digest,
                files: entries,
                log,
                record,
                metadata,
                timings,
            },
            lock,
        })
    }

    /// Writes a manifest whose blobs are durable already (temp file, rename).
    pub(crate) fn write_manifest(&self, manifest: &Manifest) -> Result<(), CacheError> {
        let path = self.manifest_path(&manifest.key);
        create_dir(path.parent().unwrap_or(&self.base))?;
        let bytes = serde_json::to_vec(manifest).map_err(|source| CacheError::BadManifest {
            path: path.clone(),
            source,
        })?;
        let tmp = self.tmp_file("manifest");
        let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Commits a batch: one flush makes every blob durable, then each manifest is written
    /// (temp file, rename), and only then are the keys unlocked and the staging removed.
    /// With a read-write remote, each committed action is then uploaded, blobs first and
    /// manifest last; an upload that fails leaves a warning, never an error.
    pub fn commit(&self, batch: Vec<PendingAction>) -> Result<Vec<Manifest>, CacheError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.sync()?;
        let mut done = Vec::with_capacity(batch.len());
        for pending in batch {
            self.write_manifest(&pending.manifest)?;
            let key = pending.manifest.key;
            let _ = fs::remove_dir_all(self.staging_dir(&pending.lock));
            let _ = fs::remove_dir_all(self.base.join("scratch").join(key.to_hex()));
            drop(pending.lock);
            done.push(pending.manifest);
        }
        if let Some(remote) = &self.remote {
            remote.upload_committed(self, &done);
        }
        Ok(done)
    }

    /// Drops a failed action's staging; failures are never cached.
    pub fn abandon(&self, lock: KeyLock) {
        let _ = fs::remove_dir_all(self.staging_dir(&lock));
    }
}

pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, CacheError> {
    #[derive(Deserialize)]
    struct Head {
        schema: u32,
    }
    let bad = |source| CacheError::BadManifest {
        path: path.to_path_buf(),
        source,
    };
    let manifest: Manifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        // A manifest of another schema may not parse at all: say which schema it is.
        Err(e) => {
            let head: Head = serde_json::from_slice(bytes).map_err(bad)?;
            if head.schema != MANIFEST_SCHEMA {
                return Err(CacheError::SchemaVersion {
                    path: path.to_path_buf(),
                    found: head.schema,
                    expected: MANIFEST_SCHEMA,
                });
            }
            return Err(bad(e));
        }
    };
    if manifest.schema != MANIFEST_SCHEMA {
        return Err(CacheError::SchemaVersion {
            path: path.to_path_buf(),
            found: manifest.schema,
            expected: MANIFEST_SCHEMA,
        });
    }
    // Paths are relative, `/`-separated, with no empty, `.` or `..` segment and no NUL: the
    // exact spelling `collect_files` writes, so a path names one file one way.
    for file in &manifest.files {
        let bad_segment = |s: &str| s.is_empty() || s == "." || s == ".." || s.contains('\0');
        if file.path.split('/').any(bad_segment) {
            return Err(CacheError::BadOutputPath(PathBuf::from(&file.path)));
        }
    }
    // No tree holds one path twice, or a path as a file and as a folder (`a` and `a/b`).
    let mut seen = std::collections::HashSet::with_capacity(manifest.files.len());
    for file in &manifest.files {
        if !seen.insert(file.path.as_str()) {
            return Err(CacheError::ConflictingOutputPath(file.path.clone().into()));
        }
    }
    for file in &manifest.files {
        let mut folders = file.path.match_indices('/').map(|(i, _)| &file.path[..i]);
        if folders.any(|folder| seen.contains(folder)) {
            return Err(CacheError::ConflictingOutputPath(file.path.clone().into()));
        }
    }
    Ok(manifest)
}

fn collect_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), CacheError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .ok()
                .and_then(|p| p.to_str())
                .ok_or_else(|| CacheError::BadOutputPath(path.clone()))?
                .to_string();
            out.push((rel, path));
        } else {
            return Err(CacheError::UnsupportedFileType {
                path,
                what: if kind.is_symlink() {
                    "symbolic link"
                } else {
                    "special file"
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ActionKey {
        ActionKey::from(blake3::hash(&[n]))
    }

    #[test]
    fn ingest_then_commit_makes_a_hit_with_read_only_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let k = key(1);
        assert!(cache.lookup(&k).unwrap().is_none());
        let lock = cache.lock(&k, "test").unwrap();
        let staging = cache.staging(&lock).unwrap();
        fs::create_dir_all(staging.join("out/sub")).unwrap();
        fs::write(staging.join("out/a.txt"), "a").unwrap();
        fs::write(staging.join("out/sub/b.txt"), "b").unwrap();
        let pending = cache
            .ingest(
                lock,
                b"log",
                serde_json::json!({"p": 1}),
                serde_json::json!({}),
                StageTimings::default(),
            )
            .unwrap();
        assert!(
            cache.lookup(&k).unwrap().is_none(),
            "nothing is cached before commit"
        );
        let committed = cache.commit(vec![pending]).unwrap();
        let hit = cache.lookup(&k).unwrap().unwrap();
        assert_eq!(hit.key, committed[0].key);
        assert_eq!(hit.record_value(), serde_json::json!({"p": 1}));
        assert_eq!(hit.files.len(), 2);
        assert!(hit.digest_of("sub").is_some());
        assert_eq!(
            hit.digest_of("a.txt").unwrap(),
            ArtifactDigest::from(blake3::hash(b"a"))
        );
        let out = cache.materialize(&hit).unwrap();
        assert_eq!(fs::read_to_string(out.join("sub/b.txt")).unwrap(), "b");
        let mode = fs::metadata(out.join("a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "outputs are read-only");
        assert_eq!(cache.read_blob(&hit.log.unwrap()).unwrap(), b"log");
    }

    #[test]
    fn materialize_rebuilds_a_removed_tree() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let lock = cache.lock(&key(2), "test").unwrap();
        let staging = cache.staging(&lock).unwrap();
        fs::write(staging.join("out/x"), "x").unwrap();
        let pending = cache
            .ingest(
                lock,
                b"",
                serde_json::Value::Null,
                serde_json::Value::Null,
                StageTimings::default(),
            )
            .unwrap();
        let manifest = cache.commit(vec![pending]).unwrap().remove(0);
        fs::remove_dir_all(cache.output_dir(&manifest.key)).unwrap();
        let out = cache.materialize(&manifest).unwrap();
        assert_eq!(fs::read_to_string(out.join("x")).unwrap(), "x");
    }

    #[test]
    fn unknown_schema_and_traversal_are_rejected() {
        let p = Path::new("m.json");
        let k = key(3);
        let bad_schema = format!(r#"{{"schema": 99, "key": "{k}"}}"#);
        assert!(matches!(
            parse_manifest(p, bad_schema.as_bytes()),
            Err(CacheError::SchemaVersion { found: 99, .. })
        ));
        let d = ArtifactDigest::from(blake3::hash(b""));
        let traversal = serde_json::json!({
            "schema": 1, "key": k, "tree": d, "log": null, "record": null, "metadata": null,
            "timings": {"started_unix_ms": 0, "duration_ms": 0},
            "files": [{"path": "../../etc/passwd", "digest": d, "size": 0}]
        });
        assert!(matches!(
            parse_manifest(p, traversal.to_string().as_bytes()),
            Err(CacheError::BadOutputPath(_))
        ));
        let mut conflicting = traversal.clone();
        conflicting["files"] = serde_json::json!([
            {"path": "a", "digest": d, "size": 0},
            {"path": "a/b", "digest": d, "size": 0},
        ]);
        assert!(matches!(
            parse_manifest(p, conflicting.to_string().as_bytes()),
            Err(CacheError::ConflictingOutputPath(_))
        ));
        // A path that sorts between `a` and `a/b` does not hide the conflict.
        conflicting["files"] = serde_json::json!([
            {"path": "a/b", "digest": d, "size": 0},
            {"path": "a b", "digest": d, "size": 0},
            {"path": "a", "digest": d, "size": 0},
        ]);
        assert!(matches!(
            parse_manifest(p, conflicting.to_string().as_bytes()),
            Err(CacheError::ConflictingOutputPath(_))
        ));
        for bad in ["a\0b", "a//b", "a/./b", "", "a/", "/a"] {
            let mut odd = traversal.clone();
            odd["files"] = serde_json::json!([{"path": bad, "digest": d, "size": 0}]);
            assert!(
                matches!(
                    parse_manifest(p, odd.to_string().as_bytes()),
                    Err(CacheError::BadOutputPath(_))
                ),
                "{bad:?}"
            );
        }
    }
}
