//! A run: passes of the scheduler ([`crate::scheduler`]) until no run-time fan-out is left to
//! expand, the events it reports, and the committer that makes results durable in batches. The
//! plan (keys, status) is in [`crate::plan`]; where a stage runs is the local path
//! ([`crate::local`]) or an [`Executor`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use autoscale_cache::{ActionKey, Cache, LockHolder, Manifest, PendingAction};
use serde::Serialize;
use serde_json::Value;

use crate::devices::{Device, GpuSpec};
use crate::error::{ConfigErrors, EngineError};
use crate::executor::Executor;
use crate::files::FileHasher;
use crate::key::KeyRecord;
use crate::kind::KindRegistry;
use crate::pipeline::{Overrides, Pipeline};

/// The engine: a cache, the known stage kinds, and the workspace file memo.
pub struct Engine {
    pub(crate) cache: Cache,
    pub(crate) kinds: KindRegistry,
    pub(crate) files: FileHasher,
    /// Whether stages that ask for GPUs get them: 0 not known yet (resolved from
    /// `CUDA_VISIBLE_DEVICES` or `nvidia-smi` when a key first needs it), 1 no, 2 yes.
    gpus: AtomicU8,
    /// Whether a key has depended on [`Engine::gpus_present`].
    gpus_asked: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Executed,
    Cached,
    Failed,
    Skipped,
    /// Stopped by Ctrl-C or the run's own cancellation, not by a fault of its own.
    Interrupted,
}

/// What the engine tells its caller while it runs; the CLI renders these.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Plan {
        pipeline: String,
        stages: usize,
    },
    Started {
        stage: String,
        kind: String,
        attempt: u32,
        devices: Option<Vec<Device>>,
    },
    Waiting {
        stage: String,
        holder: Option<LockHolder>,
    },
    Progress {
        stage: String,
        data: Value,
    },
    Warning {
        stage: Option<String>,
        message: String,
    },
    Finished {
        stage: String,
        outcome: Outcome,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<ActionKey>,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// What the person can do about the failure, when the stage said.
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<PathBuf>,
    },
}

#[derive(Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub gpus: GpuSpec,
    pub keep_going: bool,
    pub cancel: Arc<AtomicBool>,
    /// Runs the stages that are not cached elsewhere (for example as Slurm jobs); `None` runs
    /// them here. With an executor, `jobs` and the local GPUs do not limit what is in flight:
    /// [`Executor::max_in_flight`] does, and the executor's scheduler places the stages.
    pub executor: Option<Arc<dyn Executor>>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("jobs", &self.jobs)
            .field("gpus", &self.gpus)
            .field("keep_going", &self.keep_going)
            .field("executor", &self.executor.as_ref().map(|e| e.name()))
            .finish()
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpus: GpuSpec::Auto,
            keep_going: false,
            cancel: Arc::new(AtomicBool::new(false)),
            executor: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Stages stopped while they ran, because the run was interrupted.
    #[serde(default)]
    pub stopped: usize,
    pub interrupted: bool,
    pub duration_ms: u64,
    /// A no-op answered from the last run's stamp (see [`crate::stamp`]), without planning.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub from_stamp: bool,
}

/// Why a stage did not finish: what went wrong, and what to do about it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
    /// Whether `retries` may try again (not after a Slurm TIMEOUT or OUT_OF_MEMORY).
    pub(crate) retryable: bool,
}

impl Failure {
    pub(crate) fn new(message: String, hint: Option<String>) -> Self {
        Self {
            message,
            hint,
            retryable: true,
        }
    }

    /// An error's message on one line, with its hint.
    pub(crate) fn of(e: &impl autoscale_errors::Hint) -> Self {
        Self::new(autoscale_errors::one_line(e), e.hint())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::new(message, None)
    }
}

pub(crate) enum Msg {
    Waiting(usize, Option<LockHolder>),
    Progress(usize, Value),
    /// Ran and ingested: digests known, resources free, manifest not yet committed.
    Ran(usize, Manifest),
    /// Ran by an executor, which committed it: the manifest was read back from the cache.
    RanElsewhere(usize, Manifest),
    /// Another process committed it while we waited for the lock.
    FoundCached(usize, Manifest),
    Failed(usize, Failure, Option<PathBuf>),
    Committed(Vec<usize>),
    CommitFailed(String),
}

#[derive(Debug, Clone)]
pub(crate) enum Slot {
    Blocked,
    Ready(KeyRecord),
    Running,
    Done(Manifest),
    Failed,
    Skipped,
}

impl Engine {
    pub fn new(cache: Cache, kinds: KindRegistry) -> Self {
        let files = FileHasher::open(cache.refs_dir().join("files.json"));
        Self {
            cache,
            kinds,
            files,
            gpus: AtomicU8::new(0),
            gpus_asked: AtomicBool::new(false),
        }
    }

    /// Says whether stages that ask for GPUs get them (a run's resolved `--gpus`, or an
    /// executor that places GPU requests): the device class that device-dependent kinds'
    /// keys record. Unset, it is resolved as `--gpus auto` would when a key first needs it.
    pub fn set_gpus(&self, present: bool) {
        self.gpus
            .store(if present { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// `Some(present)` once a key has depended on whether GPUs are present (a device-dependent
    /// kind asking for GPUs), `None` while none has: what a no-op stamp must check again.
    pub fn gpus_asked(&self) -> Option<bool> {
        self.gpus_asked
            .load(Ordering::Relaxed)
            .then(|| self.gpus_present())
    }

    /// Whether stages that ask for GPUs get them; see [`Engine::set_gpus`].
    pub fn gpus_present(&self) -> bool {
        self.gpus_asked.store(true, Ordering::Relaxed);
        match self.gpus.load(Ordering::Relaxed) {
            0 => {
                let present = !GpuSpec::Auto.resolve().is_empty();
                self.set_gpus(present);
                present
            }
            v => v == 2,
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn kinds(&self) -> &KindRegistry {
        &self.kinds
    }

    pub fn load(&self, file: &Path, overrides: &Overrides) -> Result<Pipeline, ConfigErrors> {
        Pipeline::load(file, overrides, &self.kinds)
    }

    /// Runs every stage that is not cached, in parallel within the resource limits. Run-time
    /// fan-outs expand as soon as the stage they name has run, and the run goes on with them.
    pub fn run(
        &self,
        pipeline: &Pipeline,
        options: &RunOptions,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        // Orphans of stage processes come to us, so `process::reap_group` can reap them.
        crate::process::become_subreaper();
        // Stages run elsewhere are placed by the executor's scheduler, not on this machine's
        // devices and memory.
        let elsewhere = options.executor.is_some();
        let devices = if elsewhere {
            Vec::new()
        } else {
            options.gpus.resolve()
        };
        let total_memory_mb = if elsewhere {
            u64::MAX
        } else {
            system_memory_mb()
        };
        if !elsewhere {
            self.check_resources(pipeline, &devices, total_memory_mb, on_event)?;
        }
        // Keys of device-dependent kinds name the class their stages run on: `cuda` for a GPU
        // request where this run has GPUs (or its executor places the request), else `cpu`.
        self.set_gpus(elsewhere || !devices.is_empty());
        on_event(Event::Plan {
            pipeline: pipeline.name.clone(),
            stages: pipeline.stages.len(),
        });
        let refs_before = self.read_refs(pipeline);
        let mut pipeline = pipeline.clone();
        let mut report = Report {
            seen: HashSet::new(),
            summary: RunSummary::default(),
            on_event,
        };
        let mut done;
        loop {
            let pass = self.run_pass(&pipeline, options, &devices, total_memory_mb, &mut report)?;
            done = pass.done;
            if pass.stopped {
                break;
            }
            let mut expanded = false;
            for (placeholder, source) in pipeline.fanout_placeholders() {
                let Some(manifest) = &done[source] else {
                    continue;
                };
                let id = pipeline.stages[placeholder].id.clone();
                match self.expand_from_result(&mut pipeline, placeholder, source, manifest) {
                    Ok(()) => expanded = true,
                    Err(e) => {
                        report.finish(&id, Outcome::Failed, None, 0, Some(Failure::of(&e)), None);
                    }
                }
                // Indices moved; expand the others in the next pass.
                break;
            }
            if !expanded || report.summary.interrupted {
                break;
            }
        }
        // Whatever never ran was skipped (a failure without --keep-going, or Ctrl-C).
        for stage in &pipeline.stages {
            report.finish(&stage.id, Outcome::Skipped, None, 0, None, None);
        }
        let mut refs = refs_before.clone();
        for (i, m) in done.iter().enumerate() {
            if let Some(m) = m {
                refs.insert(pipeline.stages[i].id.clone(), m.key);
            }
        }
        if refs != refs_before {
            self.write_refs(&pipeline, &refs);
        }
        self.files.save();
        let mut summary = report.summary;
        summary.duration_ms = started.elapsed().as_millis() as u64;
        Ok(summary)
    }

    fn check_resources(
        &self,
        pipeline: &Pipeline,
        devices: &[Device],
        memory_mb: u64,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> Result<(), EngineError> {
        for stage in &pipeline.stages {
            let r = &stage.resources;
            if r.gpus > 0 && devices.is_empty() && r.require_gpu {
                return Err(EngineError::Resources {
                    message: format!("stage `{}` requires {} GPU(s) and none is available", stage.id, r.gpus),
                    hint: "run on a machine with CUDA devices, name them with `--gpus 0,1`, or drop `require_gpu` to fall back to the CPU".into(),
                });
            }
            if r.gpus as usize > devices.len() && !devices.is_empty() {
                return Err(EngineError::Resources {
                    message: format!(
                        "stage `{}` needs {} GPUs but only {} are available ({})",
                        stage.id,
                        r.gpus,
                        devices.len(),
                        Device::visible(devices)
                    ),
                    hint: "lower `resources.gpus`, or make more devices visible with `--gpus`"
                        .into(),
                });
            }
            if let Some(m) = r.memory_mb
                && m > memory_mb
            {
                on_event(Event::Warning {
                    stage: Some(stage.id.clone()),
                    message: format!("needs {m} MB of memory but the machine has {memory_mb} MB"),
                });
            }
        }
        Ok(())
    }
}

/// Reports each stage's outcome once, however many passes see it.
pub(crate) struct Report<'a> {
    pub(crate) seen: HashSet<String>,
    pub(crate) summary: RunSummary,
    pub(crate) on_event: &'a (dyn Fn(Event) + Sync),
}

impl Report<'_> {
    pub(crate) fn finish(
        &mut self,
        stage: &str,
        outcome: Outcome,
        key: Option<ActionKey>,
        duration_ms: u64,
        failure: Option<Failure>,
        log: Option<PathBuf>,
    ) {
        if !self.seen.insert(stage.to_string()) {
            return;
        }
        match outcome {
            Outcome::Executed => self.summary.executed += 1,
            Outcome::Cached => self.summary.cached += 1,
            Outcome::Failed => self.summary.failed += 1,
            Outcome::Skipped => self.summary.skipped += 1,
            Outcome::Interrupted => self.summary.stopped += 1,
        }
        let (error, hint) = match failure {
            Some(f) => (Some(f.message), f.hint),
            None => (None, None),
        };
        (self.on_event)(Event::Finished {
            stage: stage.to_string(),
            outcome,
            key,
            duration_ms,
            error,
            hint,
            log,
        });
    }
}

/// The most often the committer flushes the file system. Each flush (`syncfs`) also stalls
/// every metadata write on the file system until the journal commits; one per stage made
/// `mkdir` cost 0.2 ms and a first run of 1,000 trivial stages 2x a shell loop (BENCHMARKS.md).
/// Nothing waits on a commit but the end of the run and other processes wanting the same key.
const COMMIT_EVERY: Duration = Duration::from_millis(50);

pub(crate) fn committer(
    cache: &Cache,
    rx: mpsc::Receiver<(usize, PendingAction)>,
    tx: mpsc::Sender<Msg>,
) {
    let mut last: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // After a quiet spell commit at once; while stages keep finishing, gather them.
        if let Some(until) = last.map(|t| t + COMMIT_EVERY) {
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
        }
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let ids: Vec<usize> = batch.iter().map(|(i, _)| *i).collect();
        let started = Instant::now();
        let result = cache.commit(batch.into_iter().map(|(_, p)| p).collect());
        last = Some(Instant::now());
        match result {
            Ok(_) => {
                tracing::debug!(
                    stages = ids.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "committed a batch"
                );
                let _ = tx.send(Msg::Committed(ids));
            }
            Err(e) => {
                let _ = tx.send(Msg::CommitFailed(autoscale_errors::one_line(&e)));
                return;
            }
        }
    }
}

fn system_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX / 2, |kb| kb / 1024)
}
