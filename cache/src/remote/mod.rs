//! Remote caches: the action cache shared by a team through a directory (an NFS mount) or an
//! object store (S3 and S3-compatible). A local miss is looked up there and its blobs are
//! downloaded and verified before anything lands locally; a commit uploads blobs first and the
//! manifest last, with create-only puts, so two members who finish the same action end with one
//! entry and a killed upload never leaves a manifest that points at missing blobs.
//!
//! A remote that is down, slow or serving a bad entry never fails a run: the problem becomes a
//! [`RemoteWarning`] (see [`crate::Cache::take_remote_warnings`]) and the run goes on locally.

mod config;
mod directory;
mod object;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use autoscale_errors::Hint;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use config::{
    CONFIG_FILE, DEFAULT_TIMEOUT, ENV_MODE, ENV_TIMEOUT, ENV_URL, RemoteConfig, RemoteLocation,
    RemoteMode,
};

use crate::manifest::parse_manifest;
use crate::{ActionKey, ArtifactDigest, Cache, CacheError, LAYOUT_VERSION, Manifest, tree_digest};

/// The version of a remote action entry (the envelope around a manifest).
pub const REMOTE_ENTRY_FORMAT: u32 = 1;

/// Blobs at least this large are offered to zstd; smaller ones are stored raw.
const COMPRESS_MIN: u64 = 4096;
/// How much of a blob is compressed to decide whether compressing all of it pays.
const COMPRESS_SAMPLE: usize = 1 << 20;

/// What a remote's entries may claim before they are refused. A remote is untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteLimits {
    /// The largest action entry (manifest) read.
    pub max_entry_bytes: u64,
    /// The largest single blob.
    pub max_blob_bytes: u64,
    /// The most bytes one entry may reference.
    pub max_entry_total_bytes: u64,
    /// The most files one entry may list.
    pub max_files: usize,
}

impl Default for RemoteLimits {
    fn default() -> Self {
        Self {
            max_entry_bytes: 64 << 20,
            max_blob_bytes: 256 << 30,
            max_entry_total_bytes: 4 << 40,
            max_files: 1_000_000,
        }
    }
}

/// Everything that can go wrong with a remote cache.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("`{url}` is not a remote cache location this autoscale can use")]
    BadUrl { url: String, hint: String },
    #[error("remote cache mode `{mode}` is unknown")]
    BadMode { mode: String },
    #[error("{origin} = `{value}` is not a time-out in seconds")]
    BadTimeout { origin: String, value: String },
    #[error("config file `{path}` is invalid: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot read config file `{path}`")]
    ConfigIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the remote cache `{remote}`")]
    Open {
        remote: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("remote cache `{remote}` is unreachable or refused the request")]
    Unavailable {
        remote: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("remote cache `{remote}` did not answer within {secs:.1}s")]
    TimedOut { remote: String, secs: f64 },
    #[error("remote cache `{remote}` is read-only here")]
    ReadOnly { remote: String },
    #[error("no remote cache is configured")]
    NotConfigured,
    #[error("remote object `{name}` is larger than the {limit}-byte limit")]
    TooLarge { name: String, limit: u64 },
    #[error("remote entry {key} is not a valid manifest")]
    BadEntry {
        key: ActionKey,
        #[source]
        source: Box<CacheError>,
    },
    #[error("remote entry {key} is refused: {reason}")]
    Refused { key: ActionKey, reason: String },
    #[error("remote blob {digest} is corrupt: its bytes hash to {actual}")]
    Corrupt {
        digest: ArtifactDigest,
        actual: ArtifactDigest,
    },
    #[error("remote blob {digest} has {actual} bytes where its manifest says {expected}")]
    SizeMismatch {
        digest: ArtifactDigest,
        expected: u64,
        actual: u64,
    },
    #[error("remote blob {digest} is missing")]
    MissingBlob { digest: ArtifactDigest },
    #[error("remote blob {digest} is not valid zstd")]
    BadCompression {
        digest: ArtifactDigest,
        #[source]
        source: std::io::Error,
    },
    #[error("writing what the remote sent to the local cache failed")]
    Local {
        #[source]
        source: Box<CacheError>,
    },
}

impl Hint for RemoteError {
    /// What the person can do about it.
    fn hint(&self) -> Option<String> {
        Some(match self {
            RemoteError::BadUrl { hint, .. } => hint.clone(),
            RemoteError::BadMode { .. } => format!(
                "use one of: {} (--remote-mode, {ENV_MODE}, or `mode` in [remote] of {CONFIG_FILE})",
                RemoteMode::NAMES.join(", ")
            ),
            RemoteError::BadTimeout { .. } => "write a number of seconds, e.g. `20`".into(),
            RemoteError::Config { .. } => format!(
                "[remote] takes `url` (s3://bucket/prefix, file:///path or a path), `mode` ({}) and `timeout_secs`",
                RemoteMode::NAMES.join(", ")
            ),
            RemoteError::Open { .. } => {
                "check AWS_REGION, AWS_ENDPOINT_URL and the credentials in the environment".into()
            }
            RemoteError::Unavailable { .. } | RemoteError::TimedOut { .. } => format!(
                "check the network and the credentials, raise {ENV_TIMEOUT}, or run with --remote-mode off"
            ),
            RemoteError::ReadOnly { .. } => {
                "set --remote-mode read-write (or AUTOSCALE_REMOTE_MODE) to upload".into()
            }
            RemoteError::NotConfigured => {
                format!("name one with --remote URL, {ENV_URL}, or [remote] url in {CONFIG_FILE}")
            }
            RemoteError::Corrupt { .. }
            | RemoteError::SizeMismatch { .. }
            | RemoteError::MissingBlob { .. }
            | RemoteError::BadCompression { .. } => {
                "the entry is not used; ask whoever runs the remote to remove it".into()
            }
            _ => return None,
        })
    }
}

impl RemoteError {
    /// Whether the remote as a whole is failing (rather than one of its entries).
    fn is_outage(&self) -> bool {
        matches!(
            self,
            RemoteError::Unavailable { .. } | RemoteError::TimedOut { .. }
        )
    }
}

/// A remote problem the run went on past; the caller shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteWarning {
    /// The entry it concerns, when it concerns one.
    pub key: Option<ActionKey>,
    pub message: String,
}

impl fmt::Display for RemoteWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a [`crate::Cache::find`] hit was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HitSource {
    Local,
    /// In the remote cache: its blobs download on first use.
    Remote,
}

/// What `cache push` or `cache pull` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Entries copied.
    pub transferred: usize,
    /// Entries the other side had already.
    pub present: usize,
    /// Entries the source side does not have.
    pub absent: usize,
    /// Blob bytes moved.
    pub bytes: u64,
    /// Entries that failed, and why.
    pub problems: Vec<RemoteWarning>,
}

/// Counters since the remote was opened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemoteStats {
    pub manifests_fetched: u64,
    pub blobs_downloaded: u64,
    pub bytes_downloaded: u64,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub entries_uploaded: u64,
}

/// What a backend offers: whole small objects, streamed large ones, create-only puts. Names are
/// `/`-separated paths under the remote's root, as [`Remote`] lays them out.
pub(crate) trait Backend: Send + Sync {
    /// A whole object of at most `limit` bytes; `None` when absent.
    fn get(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, RemoteError>;
    /// [`Backend::get`] of many objects, concurrently where the backend can; in order.
    fn get_many(&self, names: &[String], limit: u64) -> Vec<Result<Option<Vec<u8>>, RemoteError>> {
        names.iter().map(|name| self.get(name, limit)).collect()
    }
    /// Streams an object of at most `limit` bytes into `sink`; `false` when absent. A write
    /// error of the sink comes back as [`SinkError`] inside [`RemoteError::Local`].
    fn get_to(&self, name: &str, limit: u64, sink: &mut dyn Write) -> Result<bool, RemoteError>;
    fn exists(&self, name: &str) -> Result<bool, RemoteError>;
    /// Creates `name` with `bytes` unless it exists; `false` when it did.
    fn create(&self, name: &str, bytes: &[u8]) -> Result<bool, RemoteError>;
    /// Creates `name` with the contents of a local file unless it exists; `false` when it did.
    fn create_from_file(&self, name: &str, file: &Path) -> Result<bool, RemoteError>;
    /// Every name under `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<String>, RemoteError>;
}

/// A remote cache: a backend, how it is used, and what this process learned of it.
///
/// Its layout, the same on a shared directory and under an object store prefix:
///
/// ```text
/// <root or s3://bucket/prefix>/v1/
///   blobs/ab/abcdef…          a blob, raw, named by the blake3 of its bytes
///   blobs/ab/abcdef….zst      a blob, zstd-compressed where that saves a tenth, still named
///                             by the blake3 of its *uncompressed* bytes
///   actions/ab/<key>.json     an action entry, written last, create-only:
///                             {"format": 1, "compressed": [digests stored as .zst],
///                              "manifest": <the local cache's manifest, verbatim>}
///   tmp/                      (directory remotes) uploads in flight, linked into place
/// ```
///
/// Entries are untrusted: an entry is refused unless it parses as this format and schema, is
/// filed under the key it names, lists only relative paths, declares sizes within
/// [`RemoteLimits`] and its tree digest matches its files; every blob is hashed as it
/// downloads, and nothing lands in the local cache until all of an entry's blobs check out.
pub struct Remote {
    backend: Box<dyn Backend>,
    location: RemoteLocation,
    mode: RemoteMode,
    limits: RemoteLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Why the remote was given up on for the rest of this process, after its first outage.
    down: Option<String>,
    warnings: Vec<RemoteWarning>,
    /// Entries looked up so far: `None` when absent or refused.
    entries: HashMap<ActionKey, Option<Arc<RemoteEntry>>>,
    stats: RemoteStats,
}

/// A verified remote action entry.
#[derive(Debug)]
pub(crate) struct RemoteEntry {
    pub manifest: Manifest,
    compressed: HashSet<ArtifactDigest>,
}

#[derive(Serialize, Deserialize)]
struct EntryFile<'a> {
    format: u32,
    #[serde(default)]
    compressed: Vec<ArtifactDigest>,
    #[serde(borrow)]
    manifest: &'a RawValue,
}

/// Credentials and endpoints never show: only the location and the mode.
impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("location", &self.location.to_string())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// Opens the remote the settings name, or `None` when they name none or its mode is `off`.
    /// Nothing is contacted yet: a remote that is down shows on first use, as a warning.
    pub fn open(config: &RemoteConfig) -> Result<Option<Self>, RemoteError> {
        let mode = config.effective_mode();
        let Some(url) = config.url.as_deref().filter(|_| mode != RemoteMode::Off) else {
            return Ok(None);
        };
        let location = RemoteLocation::parse(url, config.base_dir.as_deref())?;
        let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
        Self::at(location, mode, timeout).map(Some)
    }

    /// Opens a remote at a parsed location.
    pub fn at(
        location: RemoteLocation,
        mode: RemoteMode,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let backend: Box<dyn Backend> = match &location {
            RemoteLocation::Directory(path) => {
                Box::new(directory::DirectoryBackend::new(path.clone()))
            }
            RemoteLocation::S3 { bucket, prefix } => Box::new(object::ObjectStoreBackend::s3(
                bucket,
                prefix,
                location.to_string(),
                timeout,
            )?),
        };
        Ok(Self {
            backend,
            location,
            mode,
            limits: RemoteLimits::default(),
            state: Mutex::new(State::default()),
        })
    }

    /// Replaces the limits on what an entry may claim.
    pub fn with_limits(mut self, limits: RemoteLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn location(&self) -> &RemoteLocation {
        &self.location
    }

    pub fn mode(&self) -> RemoteMode {
        self.mode
    }

    pub fn stats(&self) -> RemoteStats {
        self.state().stats.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take_warnings(&self) -> Vec<RemoteWarning> {
        std::mem::take(&mut self.state().warnings)
    }

    fn is_down(&self) -> bool {
        self.state().down.is_some()
    }

    /// Turns a failure into a warning; an outage also turns the remote off for this process,
    /// so a dead remote costs one time-out, not one per stage. The caller shows warnings; they
    /// are only logged at debug level, so as not to say them twice.
    fn warn(&self, key: Option<ActionKey>, error: &RemoteError, then: &str) {
        let mut state = self.state();
        if error.is_outage() {
            if state.down.is_some() {
                return;
            }
            state.down = Some(autoscale_errors::one_line(error));
            let message = format!(
                "{}; going on with the local cache only",
                autoscale_errors::one_line(error)
            );
            tracing::debug!(remote = %self.location, "{message}");
            state.warnings.push(RemoteWarning { key: None, message });
            return;
        }
        let message = format!("{}; {then}", autoscale_errors::one_line(error));
        tracing::debug!(remote = %self.location, "{message}");
        state.warnings.push(RemoteWarning { key, message });
    }

    fn action_name(key: &ActionKey) -> String {
        let hex = key.to_hex();
        format!("{LAYOUT_VERSION}/actions/{}/{hex}.json", &hex[..2])
    }

    fn blob_name(digest: &ArtifactDigest, compressed: bool) -> String {
        let hex = digest.to_hex();
        let ext = if compressed { ".zst" } else { "" };
        format!("{LAYOUT_VERSION}/blobs/{}/{hex}{ext}", &hex[..2])
    }

    /// The verified entry for `key`, fetched once per process; `None` when the remote lacks
    /// it, refuses it or is down (the last two leave a warning).
    pub(crate) fn entry(&self, key: &ActionKey) -> Option<Arc<RemoteEntry>> {
        if self.is_down() {
            return None;
        }
        if let Some(known) = self.state().entries.get(key) {
            return known.clone();
        }
        let found = match self.fetch_entry(key) {
            Ok(found) => found.map(Arc::new),
            Err(e) => {
                self.warn(Some(*key), &e, "the stage runs locally");
                if e.is_outage() {
                    // Not remembered as absent: the remote, not the entry, failed.
                    return None;
                }
                None
            }
        };
        self.state().entries.insert(*key, found.clone());
        found
    }

    /// Forgets what is known of `key` on the remote (an absence included), so that the next
    /// [`Remote::entry`] asks again: another machine may have uploaded it since.
    pub(crate) fn forget(&self, key: &ActionKey) {
        self.state().entries.remove(key);
    }

    /// Looks many keys up at once (what `status` does level by level), so that a wide
    /// pipeline costs a few round trips rather than one per stage. Results are remembered for
    /// [`Remote::entry`].
    pub(crate) fn prefetch(&self, keys: &[ActionKey]) {
        if self.is_down() {
            return;
        }
        let keys: Vec<ActionKey> = {
            let state = self.state();
            let mut seen = HashSet::new();
            keys.iter()
                .filter(|k| !state.entries.contains_key(k) && seen.insert(**k))
                .copied()
                .collect()
        };
        if keys.len() < 2 {
            return;
        }
        let names: Vec<String> = keys.iter().map(Self::action_name).collect();
        let results = self.backend.get_many(&names, self.limits.max_entry_bytes);
        for ((key, name), result) in keys.iter().zip(&names).zip(results) {
            let found = match result {
                Ok(Some(bytes)) => {
                    self.state().stats.manifests_fetched += 1;
                    parse_entry(key, name, &bytes, &self.limits).map(|e| Some(Arc::new(e)))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let found = match found {
                Ok(found) => found,
                Err(e) if e.is_outage() => {
                    self.warn(Some(*key), &e, "");
                    return;
                }
                Err(e) => {
                    self.warn(Some(*key), &e, "the stage runs locally");
                    None
                }
            };
            self.state().entries.insert(*key, found);
        }
    }

    fn fetch_entry(&self, key: &ActionKey) -> Result<Option<RemoteEntry>, RemoteError> {
        let name = Self::action_name(key);
        let Some(bytes) = self.backend.get(&name, self.limits.max_entry_bytes)? else {
            return Ok(None);
        };
        self.state().stats.manifests_fetched += 1;
        parse_entry(key, &name, &bytes, &self.limits).map(Some)
    }

    /// Downloads the blobs of `key`'s entry, verifies each, and only then stores them and the
    /// manifest locally. `None` when the remote has no usable entry (a warning says why).
    pub(crate) fn fetch(&self, cache: &Cache, key: &ActionKey) -> Option<Manifest> {
        let entry = self.entry(key)?;
        match self.download(cache, &entry) {
            Ok(Some(_)) => Some(entry.manifest.clone()),
            // Another process here holds the key: it is computing or downloading it.
            Ok(None) => None,
            Err(e) => {
                self.warn(
                    Some(*key),
                    &e,
                    "the entry is not used and the stage runs locally",
                );
                self.state().entries.insert(*key, None);
                None
            }
        }
    }

    /// Stores an entry's blobs (after verifying every one) and then its manifest, under the
    /// key's lock. Returns the bytes downloaded, or `None` when another process holds the key.
    fn download(&self, cache: &Cache, entry: &RemoteEntry) -> Result<Option<u64>, RemoteError> {
        let manifest = &entry.manifest;
        let local = |e: CacheError| RemoteError::Local {
            source: Box::new(e),
        };
        let Ok(_lock) = cache
            .try_lock(&manifest.key, "remote download")
            .map_err(local)?
        else {
            return Ok(None);
        };
        if cache.lookup_local(&manifest.key).map_err(local)?.is_some() {
            return Ok(Some(0));
        }
        // digest -> (declared size when a file names it, executable)
        let mut wanted: BTreeMap<ArtifactDigest, (Option<u64>, bool)> = BTreeMap::new();
        for f in &manifest.files {
            let slot = wanted.entry(f.digest).or_insert((Some(f.size), false));
            slot.1 |= f.executable;
        }
        if let Some(log) = manifest.log {
            wanted.entry(log).or_insert((None, false));
        }
        // A local blob of another size than the entry says (damaged) is downloaded again.
        wanted.retain(|digest, (size, _)| !cache.has_blob_of_size(digest, *size));
        let staging = cache.tmp_file("download");
        crate::create_dir(&staging).map_err(local)?;
        let _cleanup = RemoveOnDrop(staging.clone());
        let mut bytes = 0;
        for (digest, (size, executable)) in &wanted {
            let dest = staging.join(digest.to_hex());
            bytes += self.download_blob(digest, *size, entry.compressed.contains(digest), &dest)?;
            let mode = if *executable { 0o555 } else { 0o444 };
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .map_err(|e| local(crate::io_err(&dest)(e)))?;
        }
        // Every blob checked out: now, and only now, they enter the store.
        for digest in wanted.keys() {
            let from = staging.join(digest.to_hex());
            let to = cache.blob_path(digest);
            crate::create_dir(to.parent().unwrap_or(&staging)).map_err(local)?;
            if !cache.has_blob_of_size(digest, wanted[digest].0) {
                fs::rename(&from, &to).map_err(|e| local(crate::io_err(&to)(e)))?;
            }
        }
        // A tree left by a local run killed before its commit may hold other bytes.
        crate::health::remove_tree(&cache.output_dir(&manifest.key)).map_err(local)?;
        cache.sync().map_err(local)?;
        cache.write_manifest(manifest).map_err(local)?;
        tracing::debug!(key = %manifest.key.short(), blobs = wanted.len(), bytes, "downloaded from the remote cache");
        let mut state = self.state();
        state.stats.blobs_downloaded += wanted.len() as u64;
        state.stats.bytes_downloaded += bytes;
        Ok(Some(bytes))
    }

    /// Downloads one blob to `dest`, hashing as it goes; an error unless its bytes hash to
    /// `digest` and match the declared size.
    fn download_blob(
        &self,
        digest: &ArtifactDigest,
        size: Option<u64>,
        compressed_first: bool,
        dest: &Path,
    ) -> Result<u64, RemoteError> {
        let limit = size.unwrap_or(self.limits.max_blob_bytes);
        let local = |e: CacheError| RemoteError::Local {
            source: Box::new(e),
        };
        for compressed in [compressed_first, !compressed_first] {
            let name = Self::blob_name(digest, compressed);
            let file = fs::File::create(dest).map_err(|e| local(crate::io_err(dest)(e)))?;
            let mut sink = VerifyingWriter::new(file, limit);
            let found = if compressed {
                // zstd's worst case grows incompressible data by well under 1%.
                let object_limit = limit.saturating_add(limit / 64).saturating_add(1 << 16);
                let mut decoder = zstd::stream::write::Decoder::new(&mut sink)
                    .map_err(|e| local(crate::io_err(dest)(e)))?;
                let found = self.backend.get_to(&name, object_limit, &mut decoder);
                let found = found.and_then(|found| {
                    decoder
                        .flush()
                        .map(|()| found)
                        .map_err(|e| sink_error(dest, e))
                });
                drop(decoder);
                found
            } else {
                self.backend.get_to(&name, limit, &mut sink)
            };
            let found = match found {
                Ok(found) => found,
                Err(_) if sink.overflow => {
                    return Err(RemoteError::TooLarge { name, limit });
                }
                // The sink failed, but not on the local file: the decoder refused the bytes.
                Err(RemoteError::Local { source }) if compressed && !sink.file_failed => {
                    return Err(RemoteError::BadCompression {
                        digest: *digest,
                        source: std::io::Error::other(autoscale_errors::one_line(&source)),
                    });
                }
                Err(e) => return Err(e),
            };
            if !found {
                continue;
            }
            let (actual, len) = sink.finish().map_err(|e| local(crate::io_err(dest)(e)))?;
            if actual != *digest {
                return Err(RemoteError::Corrupt {
                    digest: *digest,
                    actual,
                });
            }
            if let Some(expected) = size
                && expected != len
            {
                return Err(RemoteError::SizeMismatch {
                    digest: *digest,
                    expected,
                    actual: len,
                });
            }
            return Ok(len);
        }
        Err(RemoteError::MissingBlob { digest: *digest })
    }

    /// Uploads a committed action: its blobs first, its entry last and create-only. `false`
    /// when the remote had the entry already (another member finished it first).
    pub(crate) fn upload(&self, cache: &Cache, manifest: &Manifest) -> Result<bool, RemoteError> {
        if self.mode != RemoteMode::ReadWrite {
            return Err(RemoteError::ReadOnly {
                remote: self.location.to_string(),
            });
        }
        let name = Self::action_name(&manifest.key);
        if self.backend.exists(&name)? {
            return Ok(false);
        }
        let compressed = self.upload_blobs(cache, manifest)?;
        let entry = EntryFile {
            format: REMOTE_ENTRY_FORMAT,
            compressed,
            manifest: &serde_json::value::to_raw_value(manifest).map_err(|source| {
                RemoteError::Local {
                    source: Box::new(CacheError::BadManifest {
                        path: name.clone().into(),
                        source,
                    }),
                }
            })?,
        };
        let bytes = serde_json::to_vec(&entry).map_err(|source| RemoteError::Local {
            source: Box::new(CacheError::BadManifest {
                path: name.clone().into(),
                source,
            }),
        })?;
        let created = self.backend.create(&name, &bytes)?;
        tracing::debug!(key = %manifest.key.short(), created, "uploaded to the remote cache");
        if created {
            self.state().stats.entries_uploaded += 1;
        }
        Ok(created)
    }

    /// The first half of an upload: every blob an action references, and no entry (what an
    /// upload killed before its manifest leaves).
    pub(crate) fn upload_blobs(
        &self,
        cache: &Cache,
        manifest: &Manifest,
    ) -> Result<Vec<ArtifactDigest>, RemoteError> {
        let mut compressed = Vec::new();
        let mut seen = HashSet::new();
        for digest in manifest.files.iter().map(|f| f.digest).chain(manifest.log) {
            if seen.insert(digest) && self.upload_blob(cache, &digest)? {
                compressed.push(digest);
            }
        }
        Ok(compressed)
    }

    /// Uploads one blob unless the remote has it; `true` when it is stored compressed.
    fn upload_blob(&self, cache: &Cache, digest: &ArtifactDigest) -> Result<bool, RemoteError> {
        let local = |e: CacheError| RemoteError::Local {
            source: Box::new(e),
        };
        let raw = cache.blob_path(digest);
        let zst = cache.compressed_blob_path(digest);
        let (path, compressed, tmp) = if raw.exists() {
            let compress = worth_compressing(&raw).map_err(local)?;
            if compress {
                let name = Self::blob_name(digest, true);
                if self.backend.exists(&name)? {
                    return Ok(true);
                }
                let tmp = cache.tmp_file("upload");
                compress_file(&raw, &tmp).map_err(local)?;
                (tmp.clone(), true, Some(RemoveOnDrop(tmp)))
            } else {
                (raw, false, None)
            }
        } else if zst.exists() {
            (zst, true, None)
        } else {
            return Err(local(CacheError::MissingBlob {
                digest: digest.to_hex(),
            }));
        };
        let name = Self::blob_name(digest, compressed);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // Large blobs are checked first so that bytes the remote has are not sent again;
        // small ones are simply offered, and a create-only put refuses a duplicate.
        if len >= 1 << 20 && self.backend.exists(&name)? {
            return Ok(compressed);
        }
        if self.backend.create_from_file(&name, &path)? {
            let mut state = self.state();
            state.stats.blobs_uploaded += 1;
            state.stats.bytes_uploaded += len;
        }
        drop(tmp);
        Ok(compressed)
    }

    /// Every action key the remote holds an entry for.
    pub(crate) fn keys(&self) -> Result<Vec<ActionKey>, RemoteError> {
        let prefix = format!("{LAYOUT_VERSION}/actions/");
        let mut keys: Vec<ActionKey> = self
            .backend
            .list(&prefix)?
            .iter()
            .filter_map(|name| {
                let file = name.rsplit('/').next()?;
                file.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Uploads each key's local entry; used by `cache push`.
    pub(crate) fn push(
        &self,
        cache: &Cache,
        keys: &[ActionKey],
    ) -> Result<SyncReport, RemoteError> {
        if self.mode != RemoteMode::ReadWrite {
            return Err(RemoteError::ReadOnly {
                remote: self.location.to_string(),
            });
        }
        let mut report = SyncReport::default();
        let before = self.stats().bytes_uploaded;
        for key in keys {
            let manifest = match cache.lookup_local(key) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    report.absent += 1;
                    continue;
                }
                Err(e) => {
                    report.problems.push(RemoteWarning {
                        key: Some(*key),
                        message: autoscale_errors::one_line(&e),
                    });
                    continue;
                }
            };
            match self.upload(cache, &manifest) {
                Ok(true) => report.transferred += 1,
                Ok(false) => report.present += 1,
                Err(e) if e.is_outage() => return Err(e),
                Err(e) => report.problems.push(RemoteWarning {
                    key: Some(*key),
                    message: autoscale_errors::one_line(&e),
                }),
            }
        }
        report.bytes = self.stats().bytes_uploaded - before;
        Ok(report)
    }

    /// Downloads each key's remote entry unless it is local; used by `cache pull`.
    pub(crate) fn pull(
        &self,
        cache: &Cache,
        keys: &[ActionKey],
    ) -> Result<SyncReport, RemoteError> {
        let mut report = SyncReport::default();
        for key in keys {
            if matches!(cache.lookup_local(key), Ok(Some(_))) {
                report.present += 1;
                continue;
            }
            let entry = match self.fetch_entry(key) {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    report.absent += 1;
                    continue;
                }
                Err(e) if e.is_outage() => return Err(e),
                Err(e) => {
                    report.problems.push(RemoteWarning {
                        key: Some(*key),
                        message: autoscale_errors::one_line(&e),
                    });
                    continue;
                }
            };
            match self.download(cache, &entry) {
                Ok(Some(bytes)) => {
                    report.transferred += 1;
                    report.bytes += bytes;
                }
                Ok(None) => report.problems.push(RemoteWarning {
                    key: Some(*key),
                    message: "another autoscale here holds the key; pull again once it is done"
                        .into(),
                }),
                Err(e) if e.is_outage() => return Err(e),
                Err(e) => report.problems.push(RemoteWarning {
                    key: Some(*key),
                    message: autoscale_errors::one_line(&e),
                }),
            }
        }
        Ok(report)
    }

    /// Uploads freshly committed actions; problems become warnings.
    pub(crate) fn upload_committed(&self, cache: &Cache, manifests: &[Manifest]) {
        if self.mode != RemoteMode::ReadWrite {
            return;
        }
        for manifest in manifests {
            if self.is_down() {
                return;
            }
            if let Err(e) = self.upload(cache, manifest) {
                self.warn(
                    Some(manifest.key),
                    &e,
                    "the result stays in the local cache only",
                );
            }
        }
    }
}

/// Checks an entry read from the remote before anything trusts it.
fn parse_entry(
    key: &ActionKey,
    name: &str,
    bytes: &[u8],
    limits: &RemoteLimits,
) -> Result<RemoteEntry, RemoteError> {
    let path = Path::new(name);
    let bad = |source: CacheError| RemoteError::BadEntry {
        key: *key,
        source: Box::new(source),
    };
    let refused = |reason: String| RemoteError::Refused { key: *key, reason };
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|source| {
        bad(CacheError::BadManifest {
            path: path.to_path_buf(),
            source,
        })
    })?;
    if head.format != REMOTE_ENTRY_FORMAT {
        return Err(refused(format!(
            "its format is {}, this autoscale reads {REMOTE_ENTRY_FORMAT}",
            head.format
        )));
    }
    let file: EntryFile<'_> = serde_json::from_slice(bytes).map_err(|source| {
        bad(CacheError::BadManifest {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let manifest = parse_manifest(path, file.manifest.get().as_bytes()).map_err(bad)?;
    if manifest.key != *key {
        return Err(refused(format!(
            "it is filed under {key} but names key {}",
            manifest.key
        )));
    }
    if manifest.files.len() > limits.max_files {
        return Err(refused(format!(
            "it lists {} files, more than the limit of {}",
            manifest.files.len(),
            limits.max_files
        )));
    }
    let mut total: u64 = 0;
    let mut paths = HashSet::new();
    let mut sizes: HashMap<ArtifactDigest, u64> = HashMap::new();
    for f in &manifest.files {
        if f.size > limits.max_blob_bytes {
            return Err(refused(format!(
                "file `{}` claims {} bytes, more than the limit of {}",
                f.path, f.size, limits.max_blob_bytes
            )));
        }
        // One digest, one content, one size.
        if *sizes.entry(f.digest).or_insert(f.size) != f.size {
            return Err(refused(format!(
                "file `{}` claims {} bytes for blob {}, which another of its files gives another size",
                f.path,
                f.size,
                f.digest.short()
            )));
        }
        total = total.saturating_add(f.size);
        // parse_manifest refused absolute paths and `..`; also refuse what would not lay out
        // as a tree: empty or non-canonical paths, duplicates, a file that is also a folder.
        let canonical = Path::new(&f.path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if f.path.is_empty() || canonical != f.path || !paths.insert(f.path.as_str()) {
            return Err(refused(format!("it lists the path `{}` badly", f.path)));
        }
    }
    for f in &manifest.files {
        let mut dir = f.path.as_str();
        while let Some((parent, _)) = dir.rsplit_once('/') {
            if paths.contains(parent) {
                return Err(refused(format!("`{parent}` is both a file and a folder")));
            }
            dir = parent;
        }
    }
    if total > limits.max_entry_total_bytes {
        return Err(refused(format!(
            "its files add up to {total} bytes, more than the limit of {}",
            limits.max_entry_total_bytes
        )));
    }
    let tree = tree_digest(
        manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), &f.digest, f.executable)),
    );
    if tree != manifest.tree {
        return Err(refused(format!(
            "its tree digest {} does not match its files ({tree})",
            manifest.tree
        )));
    }
    Ok(RemoteEntry {
        compressed: file.compressed.into_iter().collect(),
        manifest,
    })
}

/// Whether compressing a blob would save at least a tenth, judged on its first megabyte.
fn worth_compressing(path: &Path) -> Result<bool, CacheError> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(crate::io_err(path))?;
    let len = file.metadata().map_err(crate::io_err(path))?.len();
    if len < COMPRESS_MIN {
        return Ok(false);
    }
    let mut sample = Vec::with_capacity(COMPRESS_SAMPLE.min(len as usize));
    file.take(COMPRESS_SAMPLE as u64)
        .read_to_end(&mut sample)
        .map_err(crate::io_err(path))?;
    let packed = zstd::bulk::compress(&sample, 3).map_err(crate::io_err(path))?;
    Ok(packed.len() * 10 <= sample.len() * 9)
}

fn compress_file(from: &Path, to: &Path) -> Result<(), CacheError> {
    let input = fs::File::open(from).map_err(crate::io_err(from))?;
    let output = fs::File::create(to).map_err(crate::io_err(to))?;
    zstd::stream::copy_encode(input, output, 3).map_err(crate::io_err(to))
}

/// A write error of a download's sink, as a backend reports it.
pub(crate) fn sink_error(path: &Path, e: std::io::Error) -> RemoteError {
    RemoteError::Local {
        source: Box::new(crate::io_err(path)(e)),
    }
}

/// A file sink that hashes what it writes and refuses to grow past a limit.
struct VerifyingWriter {
    file: std::io::BufWriter<fs::File>,
    hasher: blake3::Hasher,
    len: u64,
    limit: u64,
    overflow: bool,
    /// Whether writing the local file failed (as opposed to the bytes being refused).
    file_failed: bool,
}

impl VerifyingWriter {
    fn new(file: fs::File, limit: u64) -> Self {
        Self {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            len: 0,
            limit,
            overflow: false,
            file_failed: false,
        }
    }

    fn finish(mut self) -> std::io::Result<(ArtifactDigest, u64)> {
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        Ok((self.hasher.finalize().into(), self.len))
    }
}

impl Write for VerifyingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len.saturating_add(buf.len() as u64) > self.limit {
            self.overflow = true;
            return Err(std::io::Error::other(
                "more bytes than the manifest declares",
            ));
        }
        let n = self
            .file
            .write(buf)
            .inspect_err(|_| self.file_failed = true)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush().inspect_err(|_| self.file_failed = true)
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests;
