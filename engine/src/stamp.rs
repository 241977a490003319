//! The no-op fast path: after a run in which every stage ended cached or executed, a stamp
//! records what that answer depended on. A later `run` or `status` with the same invocation
//! checks the stamp with `stat` calls alone (no YAML, no keys, no hashing) and, when nothing
//! moved, answers "everything cached" from it.
//!
//! What a stamp covers, and why that is enough: a stage key is a function of the pipeline text
//! and overlays, `--set`, the declared env values, the content of file inputs, the kinds' code
//! (this binary, and the trainer identity compiled into it) and upstream results (in the cache,
//! content-addressed). So the stamp holds the `stat` (size, mtime, ctime, inode) of the binary,
//! of the pipeline file and overlays, and of every file and folder under the file inputs; the
//! declared env values; and each stage's key with the `stat` of its manifest and output folder.
//! Any difference, a missing entry, or a file whose mtime or ctime is not older than the moment
//! its stat was taken (git's racy rule) is doubt, and doubt takes the full path.
//!
//! The stats are taken before the run and again after it; a stamp is written only when both
//! agree, so a file edited while the run hashed it never gets a stamp.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use autoscale_cache::{ActionKey, Cache};
use serde::{Deserialize, Serialize};

use crate::files::{change_times_ns, now_ns, racy};
use crate::pipeline::{InputRef, Pipeline};

/// Bumped when the stamp's meaning changes.
const STAMP_SCHEMA: u32 = 2;

/// What was asked: a stamp answers only the same question.
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    /// The pipeline file, absolute.
    pub file: PathBuf,
    /// `--with` files, absolute, in order.
    pub overlays: Vec<PathBuf>,
    pub sets: Vec<String>,
    pub targets: Vec<String>,
}

impl Invocation {
    pub fn new(file: &Path, overlays: &[PathBuf], sets: &[String], targets: &[String]) -> Self {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Self {
            file: abs(file),
            overlays: overlays.iter().map(|p| abs(p)).collect(),
            sets: sets.to_vec(),
            targets: targets.to_vec(),
        }
    }

    fn id(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
    }
}

/// A file's identity without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dir: bool,
}

impl Stat {
    fn of(path: &Path) -> Option<Stat> {
        let m = std::fs::metadata(path).ok()?;
        let (mtime_ns, ctime_ns) = change_times_ns(&m);
        Some(Stat {
            size: if m.is_dir() { 0 } else { m.len() },
            mtime_ns,
            ctime_ns,
            ino: m.ino(),
            dir: m.is_dir(),
        })
    }
}

/// A cache entry as seen from outside: its manifest's size and inode (not its mtime, which
/// lookups touch for `cache gc`) and its output folder's stat, which changes when a file in it
/// is added, removed or replaced (the full path then checks the entry, see the cache's
/// `check_entry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    manifest_size: u64,
    manifest_ino: u64,
    out: Option<Stat>,
}

impl Entry {
    fn of(cache_root: &Path, key: &ActionKey) -> Option<Entry> {
        let (manifest, out) = autoscale_cache::entry_paths(cache_root, key);
        let m = std::fs::metadata(manifest).ok()?;
        Some(Entry {
            manifest_size: m.len(),
            manifest_ino: m.ino(),
            out: Stat::of(&out).filter(|s| s.dir),
        })
    }
}

/// One stage as a no-op reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StampedStage {
    pub id: String,
    pub kind: String,
    pub key: ActionKey,
    entry: Entry,
}

/// The record of a run that a no-op can be answered from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stamp {
    schema: u32,
    /// What else the binary answers for: the trainer identity, the crate version.
    identity: String,
    binary: Stat,
    /// Wall clock when the stats were taken, before the run.
    taken_ns: i128,
    files: Vec<(PathBuf, Stat)>,
    env: BTreeMap<String, String>,
    pub pipeline: String,
    /// The run's `--gpus`, which a run (not `status`) must repeat to be answered from here.
    pub gpus: Option<String>,
    /// Whether the run had GPUs, when a key depended on it (a `train` stage asking for GPUs
    /// is keyed `cuda` or `cpu`): a no-op must find the same, or take the full path.
    #[serde(default)]
    pub gpus_present: Option<bool>,
    /// The pipeline's root, whose `autoscale.toml` may send stages to Slurm (where they get
    /// the GPUs they ask for): read again when `gpus_present` matters.
    #[serde(default)]
    pub root: Option<PathBuf>,
    pub stages: Vec<StampedStage>,
    /// Warnings the run gave before its plan (resources, devices), repeated by a no-op.
    pub warnings: Vec<String>,
}

/// What a finished run tells its stamp.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The pipeline's name.
    pub pipeline: String,
    /// The run's `--gpus`.
    pub gpus: Option<String>,
    /// [`crate::Engine::gpus_asked`] after the run.
    pub gpus_present: Option<bool>,
    /// The pipeline's root.
    pub root: PathBuf,
    /// The stages as they finished: id, kind, key.
    pub stages: Vec<(String, String, ActionKey)>,
    /// Warnings given before the plan.
    pub warnings: Vec<String>,
}

/// The files and env a run's answer depends on, taken before it starts.
#[derive(Debug, Clone)]
pub struct Before {
    taken_ns: i128,
    /// The pipeline file, the overlays and the file inputs, each walked into `files`.
    roots: Vec<PathBuf>,
    files: Vec<(PathBuf, Stat)>,
    env: BTreeMap<String, String>,
}

fn stamp_path(cache_root: &Path, invocation: &Invocation) -> PathBuf {
    cache_root
        .join(autoscale_cache::LAYOUT_VERSION)
        .join("refs")
        .join("stamps")
        .join(format!("{}.json", invocation.id()))
}

/// Every file and folder under `path` (itself included), sorted, with its `stat`; `None` when
/// one cannot be read. Symlinks are followed, as the input hashing follows them.
fn walk(path: &Path, out: &mut Vec<(PathBuf, Stat)>) -> Option<()> {
    let stat = Stat::of(path)?;
    let dir = stat.dir;
    out.push((path.to_path_buf(), stat));
    if !dir {
        return Some(());
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    children.sort();
    for child in children {
        walk(&child, out)?;
    }
    Some(())
}

/// [`walk`] over each root in turn.
fn walk_all(roots: &[PathBuf]) -> Option<Vec<(PathBuf, Stat)>> {
    let mut files = Vec::new();
    for root in roots {
        walk(root, &mut files)?;
    }
    Some(files)
}

impl Before {
    /// Stats the pipeline file, overlays and every file input, and reads the declared env.
    /// `None` when one of them cannot be read (the run will say why).
    pub fn take(invocation: &Invocation, pipeline: &Pipeline) -> Option<Before> {
        let taken_ns = now_ns();
        let mut roots = vec![invocation.file.clone()];
        roots.extend(invocation.overlays.iter().cloned());
        let mut inputs = Vec::new();
        let mut env = BTreeMap::new();
        for stage in &pipeline.stages {
            for input in stage.inputs.values() {
                // Already joined to the pipeline's root.
                if let InputRef::File(path) = input {
                    inputs.push(std::path::absolute(path).ok()?);
                }
            }
            env.extend(stage.env.clone());
        }
        inputs.sort();
        inputs.dedup();
        roots.extend(inputs);
        let files = walk_all(&roots)?;
        Some(Before {
            taken_ns,
            roots,
            files,
            env,
        })
    }

    /// After a run in which every stage ended cached or executed: writes the stamp, unless a
    /// file moved during the run.
    pub fn write(self, cache: &Cache, invocation: &Invocation, identity: &str, run: RunRecord) {
        let RunRecord {
            pipeline,
            gpus,
            gpus_present,
            root,
            stages,
            warnings,
        } = run;
        // Walked again: a file added, removed or changed during the run shows up here.
        if walk_all(&self.roots).as_ref() != Some(&self.files) {
            return;
        }
        let Some(binary) = std::env::current_exe().ok().and_then(|e| Stat::of(&e)) else {
            return;
        };
        let mut stamped = Vec::with_capacity(stages.len());
        for (id, kind, key) in stages {
            let Some(entry) = Entry::of(cache.root(), &key) else {
                return;
            };
            stamped.push(StampedStage {
                id,
                kind,
                key,
                entry,
            });
        }
        let stamp = Stamp {
            schema: STAMP_SCHEMA,
            identity: identity.to_string(),
            binary,
            taken_ns: self.taken_ns,
            files: self.files,
            env: self.env,
            pipeline,
            gpus,
            gpus_present,
            root: Some(root),
            stages: stamped,
            warnings,
        };
        let path = stamp_path(cache.root(), invocation);
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        // Written aside and renamed: a reader sees the old stamp or the new one, whole.
        let tmp = dir.join(format!(".{}.{}", invocation.id(), std::process::id()));
        let Ok(bytes) = serde_json::to_vec(&stamp) else {
            return;
        };
        if std::fs::write(&tmp, bytes).is_err() || std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Removes the invocation's stamp: a run that did not end all cached or executed leaves none.
pub fn forget(cache_root: &Path, invocation: &Invocation) {
    let _ = std::fs::remove_file(stamp_path(cache_root, invocation));
}

impl Stamp {
    /// The stamp of this invocation, if every `stat` still matches it. Reads one small JSON
    /// file and stats the binary, the files and the cache entries; parses no YAML.
    pub fn check(cache_root: &Path, invocation: &Invocation, identity: &str) -> Option<Stamp> {
        let path = stamp_path(cache_root, invocation);
        let bytes = std::fs::read(&path).ok()?;
        let stamp: Stamp = serde_json::from_slice(&bytes).ok()?;
        if stamp.schema != STAMP_SCHEMA || stamp.identity != identity {
            return None;
        }
        let exe = std::env::current_exe().ok()?;
        if Stat::of(&exe)? != stamp.binary {
            return None;
        }
        for (name, value) in &stamp.env {
            if std::env::var(name).unwrap_or_default() != *value {
                return None;
            }
        }
        for (path, stat) in &stamp.files {
            if racy(stat.mtime_ns, stat.ctime_ns, stamp.taken_ns)
                || Stat::of(path).as_ref() != Some(stat)
            {
                return None;
            }
        }
        for stage in &stamp.stages {
            if Entry::of(cache_root, &stage.key).as_ref() != Some(&stage.entry) {
                return None;
            }
        }
        Some(stamp)
    }
}
