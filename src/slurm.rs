//! `--executor slurm`: each stage that is not cached becomes one `sbatch` job that runs the same
//! stage on a compute node with the same `autoscale` build (`autoscale run FILE STAGE`), against
//! the same cache or the team's remote. The engine then reads the result from the cache.
//!
//! - **Submission:** `sbatch --parsable`, job name `as-<first 16 hex of the key>`, resources from
//!   the stage's `resources` (`cpus` → `--cpus-per-task`, `memory` → `--mem`, `gpus` →
//!   `--gres=gpu:N` or `--gpus=N`; no GPU request for 0), `partition`/`account`/`qos`/`time`
//!   and `extra` from `[slurm]` in `autoscale.toml`, output to `<log_dir>/as-<key>-<job>.log`.
//! - **The journal** (`<cache>/slurm/jobs/<key>.json`): each submission's key, job id, time and
//!   head. A head that starts again finds its jobs there and waits on them instead of
//!   submitting again; two heads serialize on a lock per key (`flock` on the journal file's
//!   `.lock`, on the same filesystem as the cache).
//! - **State:** one batched query per interval for every job in flight: `sacct` when accounting
//!   is on, else `squeue --states=all` (which lists finished jobs for `MinJobAge`). The interval
//!   starts at `poll_min_s` and doubles while nothing changes, up to `poll_max_s`. A query that
//!   fails is retried until `outage_s`; a job that no query knows any more is given up after
//!   `vanish_s`. The job's state is never the result: the engine checks the cache.
//! - **Ctrl-C** `scancel`s every job of the run in one call.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use autoscale_engine::{Executor, ExecutorFailure, Submission};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How a GPU request is written: clusters accept one or the other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuFlag {
    /// `--gres=gpu:N`
    #[default]
    Gres,
    /// `--gpus=N`
    Gpus,
}

/// `[slurm]` in `autoscale.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time`, e.g. `4:00:00`.
    pub time: Option<String>,
    pub gpu_flag: GpuFlag,
    /// More `sbatch` arguments, passed as they are.
    pub extra: Vec<String>,
    /// The `autoscale` binary on the nodes [default: this one's path].
    pub autoscale: Option<PathBuf>,
    /// The cache the jobs use [default: the head's]. With `remote`, a node-local folder.
    pub cache_dir: Option<PathBuf>,
    /// The remote cache the jobs read and write [default: none; the jobs share the head's cache].
    pub remote: Option<String>,
    /// Job logs [default: `<cache>/slurm/logs`].
    pub log_dir: Option<PathBuf>,
    pub poll_min_s: f64,
    pub poll_max_s: f64,
    /// How long the scheduler may fail to answer before the run gives up.
    pub outage_s: f64,
    /// How long a job may be unknown to every query before it is given up.
    pub vanish_s: f64,
    /// How long a result may take to show in the cache after its job completed.
    pub result_grace_s: f64,
    /// Stages in flight at once.
    pub max_jobs: usize,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            qos: None,
            time: None,
            gpu_flag: GpuFlag::Gres,
            extra: Vec::new(),
            autoscale: None,
            cache_dir: None,
            remote: None,
            log_dir: None,
            poll_min_s: 5.0,
            poll_max_s: 60.0,
            outage_s: 600.0,
            vanish_s: 300.0,
            result_grace_s: 60.0,
            max_jobs: 200,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    executor: Option<String>,
    #[serde(default)]
    slurm: Option<toml::Value>,
}

fn read_config(file: &Path) -> Result<Option<ConfigFile>, String> {
    let Ok(text) = fs::read_to_string(file) else {
        return Ok(None);
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// What `autoscale.toml` says of executors, each file read once.
#[derive(Debug, Default)]
pub struct ExecutorConfig {
    /// `executor = "..."` from the first of the files that sets it, with that file.
    pub executor: Option<(String, PathBuf)>,
    /// `[slurm]` from the first of the files that has one.
    pub slurm: SlurmConfig,
}

impl ExecutorConfig {
    pub fn from_files(files: &[PathBuf]) -> Result<Self, String> {
        let mut found = Self::default();
        let mut slurm = None;
        for file in files {
            let Some(parsed) = read_config(file)? else {
                continue;
            };
            if found.executor.is_none()
                && let Some(name) = parsed.executor
            {
                found.executor = Some((name, file.clone()));
            }
            if slurm.is_none()
                && let Some(section) = parsed.slurm
            {
                let config: SlurmConfig = section
                    .try_into()
                    .map_err(|e| format!("{}: [slurm]: {e}", file.display()))?;
                config
                    .check()
                    .map_err(|e| format!("{}: [slurm]: {e}", file.display()))?;
                slurm = Some(config);
            }
        }
        found.slurm = slurm.unwrap_or_default();
        Ok(found)
    }
}

impl SlurmConfig {
    fn check(&self) -> Result<(), String> {
        if !(self.poll_min_s >= 0.1 && self.poll_max_s >= self.poll_min_s) {
            return Err(format!(
                "poll_min_s ({}) must be at least 0.1 and at most poll_max_s ({})",
                self.poll_min_s, self.poll_max_s
            ));
        }
        if self.max_jobs == 0 {
            return Err("max_jobs must be at least 1".into());
        }
        Ok(())
    }
}

/// How a node runs one stage: the pieces of the head's own command line that name the pipeline.
#[derive(Debug, Clone)]
pub struct NodeCommand {
    /// The pipeline file, absolute.
    pub file: PathBuf,
    pub overlays: Vec<PathBuf>,
    pub sets: Vec<String>,
    /// The head's cache (the jobs' too, unless `cache_dir` says otherwise).
    pub cache_dir: PathBuf,
    /// The folder the jobs start in (the head's working directory).
    pub workdir: PathBuf,
}

/// One submission, as the journal keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JournalEntry {
    key: String,
    pipeline: String,
    stage: String,
    job_id: String,
    attempt: u32,
    submitted_unix_ms: u64,
    head: String,
    log: PathBuf,
}

/// What the scheduler last said of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JobState {
    Active(String),
    Ended(String),
    /// No query knows it (since the instant).
    Unknown(Instant),
}

#[derive(Default)]
struct Tracker {
    /// Job id → last state.
    jobs: HashMap<String, JobState>,
    /// Job id → when a query that asked for it last answered.
    polled: HashMap<String, Instant>,
    last_poll: Option<Instant>,
    interval: Duration,
    polling: bool,
    failing_since: Option<Instant>,
    /// Some(false) once `sacct` said accounting is off.
    accounting: Option<bool>,
    /// The jobs cancelled with the run (Ctrl-C).
    cancelled: Option<Vec<String>>,
}

pub struct SlurmExecutor {
    config: SlurmConfig,
    node: NodeCommand,
    journal: PathBuf,
    log_dir: PathBuf,
    head: String,
    tracker: Mutex<Tracker>,
    changed: Condvar,
    /// `sbatch` calls and state queries, for the record of a run.
    pub submissions: AtomicU64,
    pub queries: AtomicU64,
}

impl SlurmExecutor {
    pub fn new(config: SlurmConfig, node: NodeCommand) -> Result<Self, String> {
        let journal = node.cache_dir.join("slurm").join("jobs");
        let log_dir = config
            .log_dir
            .clone()
            .unwrap_or_else(|| node.cache_dir.join("slurm").join("logs"));
        for dir in [&journal, &log_dir] {
            fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
        }
        which("sbatch")?;
        let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let interval = Duration::from_secs_f64(config.poll_min_s);
        Ok(Self {
            head: format!("{}:{}", host.trim(), std::process::id()),
            tracker: Mutex::new(Tracker {
                interval,
                ..Tracker::default()
            }),
            config,
            node,
            journal,
            log_dir,
            changed: Condvar::new(),
            submissions: AtomicU64::new(0),
            queries: AtomicU64::new(0),
        })
    }

    /// The shell command a job runs.
    fn job_command(&self, job: &Submission<'_>) -> String {
        let exe = self
            .config
            .autoscale
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("autoscale"));
        let cache = self
            .config
            .cache_dir
            .as_ref()
            .unwrap_or(&self.node.cache_dir);
        let mut words: Vec<String> = vec![
            exe.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
        ];
        if let Some(remote) = &self.config.remote {
            words.extend(["--remote".into(), remote.clone()]);
            words.extend(["--remote-mode".into(), "read-write".into()]);
        }
        // `--executor local`: the job runs the stage itself, whatever autoscale.toml says.
        words.extend(["run".into(), "--executor".into(), "local".into()]);
        words.push(self.node.file.display().to_string());
        words.push(job.stage.to_string());
        for overlay in &self.node.overlays {
            words.extend(["--with".into(), overlay.display().to_string()]);
        }
        for set in &self.node.sets {
            words.extend(["--set".into(), set.clone()]);
        }
        words.extend(["--jobs".into(), job.resources.cpus.max(1).to_string()]);
        // The GPUs are the ones Slurm gave the job (CUDA_VISIBLE_DEVICES), or none.
        words.extend(["--gpus".into(), "auto".into()]);
        // Words come from paths and `--set` values: only a NUL byte cannot be quoted, and
        // none reaches here (arguments and paths cannot hold one).
        let line = shlex::try_join(words.iter().map(String::as_str)).unwrap_or_default();
        format!("exec {line}")
    }

    fn sbatch_args(&self, job: &Submission<'_>, log: &Path) -> Vec<String> {
        let r = job.resources;
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name={}", job_name(job)),
            format!("--output={}", log.display()),
            format!("--error={}", log.display()),
            format!("--chdir={}", self.node.workdir.display()),
            format!("--cpus-per-task={}", r.cpus.max(1)),
        ];
        if let Some(mb) = r.memory_mb {
            args.push(format!("--mem={mb}M"));
        }
        if r.gpus > 0 {
            args.push(match self.config.gpu_flag {
                GpuFlag::Gres => format!("--gres=gpu:{}", r.gpus),
                GpuFlag::Gpus => format!("--gpus={}", r.gpus),
            });
        }
        // The stage's own `slurm:` settings win over the config's.
        let own = job.slurm.cloned().unwrap_or_default();
        for (flag, value) in [
            (
                "partition",
                own.partition.as_ref().or(self.config.partition.as_ref()),
            ),
            (
                "account",
                own.account.as_ref().or(self.config.account.as_ref()),
            ),
            ("qos", own.qos.as_ref().or(self.config.qos.as_ref())),
            ("time", own.time.as_ref().or(self.config.time.as_ref())),
        ] {
            if let Some(v) = value {
                args.push(format!("--{flag}={v}"));
            }
        }
        args.extend(self.config.extra.iter().cloned());
        args.extend(own.extra);
        args.push(format!("--wrap={}", self.job_command(job)));
        args
    }

    fn submit(&self, job: &Submission<'_>) -> Result<JournalEntry, ExecutorFailure> {
        let key = job.key.to_hex();
        // The log's name holds the job id, which only sbatch knows: `%j`.
        let pattern = self.log_dir.join(format!("{}-%j.log", job_name(job)));
        let args = self.sbatch_args(job, &pattern);
        self.submissions.fetch_add(1, Ordering::Relaxed);
        let out = run_tool("sbatch", &args, Duration::from_secs(120)).map_err(|e| {
            ExecutorFailure::new(format!("cannot submit `{}`: {e}", job.stage))
                .hint("check that `sbatch` works here and the [slurm] settings in autoscale.toml (partition, account)")
        })?;
        let job_id = out
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if job_id.is_empty() || !job_id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return Err(ExecutorFailure::new(format!(
                "sbatch answered `{}` for `{}`, not a job id",
                out.trim(),
                job.stage
            )));
        }
        let log = self.log_dir.join(format!("{}-{job_id}.log", job_name(job)));
        Ok(JournalEntry {
            key,
            pipeline: job.pipeline.to_string(),
            stage: job.stage.to_string(),
            job_id,
            attempt: job.attempt,
            submitted_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            head: self.head.clone(),
            log,
        })
    }

    /// The job to wait on for this key: the journal's, while the scheduler still runs it (a
    /// head that died and came back, or another head), else a new submission. Serialized per
    /// key by a lock next to the journal entry.
    fn job_for(&self, job: &Submission<'_>) -> Result<(JournalEntry, bool), ExecutorFailure> {
        let key = job.key.to_hex();
        let entry_path = self.journal.join(format!("{key}.json"));
        let lock_path = self.journal.join(format!("{key}.lock"));
        let io = |e: std::io::Error, p: &Path| {
            ExecutorFailure::new(format!("slurm journal `{}`: {e}", p.display()))
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(e, &lock_path))?;
        lock.lock().map_err(|e| io(e, &lock_path))?;
        // A retry (attempt 2+) in this run submits again; a new run first looks for a live job.
        if job.attempt == 1
            && let Ok(text) = fs::read_to_string(&entry_path)
            && let Ok(previous) = serde_json::from_str::<JournalEntry>(&text)
        {
            let state = self.fresh_state(&previous.job_id);
            if matches!(state, Some(JobState::Active(_))) {
                return Ok((previous, true));
            }
            // Ended or gone: no longer one of the jobs to poll.
            self.forget(&previous.job_id);
        }
        let entry = self.submit(job)?;
        let text = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        let tmp = self
            .journal
            .join(format!("{key}.json.{}", std::process::id()));
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &entry_path))
            .map_err(|e| io(e, &entry_path))?;
        drop(lock);
        Ok((entry, false))
    }

    /// The state of job `id` from a query made after this call (and of every job in flight),
    /// whatever the interval; `None` if no query answered within a minute.
    fn fresh_state(&self, id: &str) -> Option<JobState> {
        let asked = Instant::now();
        if let Ok(mut t) = self.tracker.lock() {
            t.jobs
                .entry(id.to_string())
                .or_insert(JobState::Unknown(asked));
            t.last_poll = None;
        }
        let deadline = asked + Duration::from_secs(60);
        while Instant::now() < deadline {
            self.poll_if_due();
            let t = self.tracker.lock().ok()?;
            if t.polled.get(id).is_some_and(|at| *at >= asked) {
                return t.jobs.get(id).cloned();
            }
            // Another thread's query, begun before `id` was added, does not count: ask again.
            let mut t = self
                .changed
                .wait_timeout(t, Duration::from_millis(200))
                .ok()?
                .0;
            if !t.polling {
                t.last_poll = None;
            }
        }
        None
    }

    /// Stops polling job `id`.
    fn forget(&self, id: &str) {
        if let Ok(mut t) = self.tracker.lock() {
            t.jobs.remove(id);
            t.polled.remove(id);
        }
    }

    /// One batched query for every tracked job, by whichever waiting thread finds it due.
    fn poll_if_due(&self) {
        let (ids, accounting) = {
            let Ok(mut t) = self.tracker.lock() else {
                return;
            };
            let due = t.last_poll.is_none_or(|at| at.elapsed() >= t.interval);
            if !due || t.polling || t.jobs.is_empty() {
                return;
            }
            t.polling = true;
            let ids: Vec<String> = t.jobs.keys().cloned().collect();
            (ids, t.accounting)
        };
        let asked = Instant::now();
        let answer = self.query(&ids, accounting);
        let Ok(mut t) = self.tracker.lock() else {
            return;
        };
        t.polling = false;
        t.last_poll = Some(Instant::now());
        match answer {
            Ok((states, accounting)) => {
                t.failing_since = None;
                t.accounting = Some(accounting);
                let mut moved = false;
                for id in ids {
                    let new = match states.get(&id) {
                        Some(state) if is_active(state) => JobState::Active(state.clone()),
                        Some(state) => JobState::Ended(state.clone()),
                        None => match t.jobs.get(&id) {
                            Some(JobState::Unknown(since)) => JobState::Unknown(*since),
                            _ => JobState::Unknown(Instant::now()),
                        },
                    };
                    if t.jobs.get(&id) != Some(&new) {
                        moved = true;
                    }
                    t.polled.insert(id.clone(), asked);
                    t.jobs.insert(id, new);
                }
                let min = Duration::from_secs_f64(self.config.poll_min_s);
                let max = Duration::from_secs_f64(self.config.poll_max_s);
                t.interval = if moved {
                    min
                } else {
                    (t.interval * 2).min(max)
                };
            }
            Err(e) => {
                tracing::warn!("slurm: cannot query job states: {e}");
                t.failing_since.get_or_insert_with(Instant::now);
            }
        }
        self.changed.notify_all();
    }

    /// `(job id → state, whether accounting answered)`: `sacct` while accounting works, else
    /// `squeue --states=all`, and `scontrol show job` for what squeue no longer lists.
    fn query(
        &self,
        ids: &[String],
        accounting: Option<bool>,
    ) -> Result<(HashMap<String, String>, bool), String> {
        let timeout = Duration::from_secs(60);
        if accounting != Some(false) {
            self.queries.fetch_add(1, Ordering::Relaxed);
            let args = [
                "-X".to_string(),
                "--parsable2".into(),
                "--noheader".into(),
                "--format=JobIdRaw,State".into(),
                format!("--jobs={}", ids.join(",")),
            ];
            match run_tool("sacct", &args, timeout) {
                Ok(out) => return Ok((parse_pairs(&out, '|'), true)),
                Err(e) if e.contains("accounting storage is disabled") => {
                    tracing::info!("slurm: accounting is off; job states come from squeue");
                }
                Err(e) if accounting.is_none() => {
                    tracing::info!(
                        "slurm: sacct does not answer ({e}); job states come from squeue"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        let args = [
            "--noheader".to_string(),
            "--states=all".into(),
            "--format=%i|%T".into(),
        ];
        let out = run_tool("squeue", &args, timeout)?;
        let mut states = parse_pairs(&out, '|');
        states.retain(|id, _| ids.contains(id));
        let missing: Vec<&String> = ids.iter().filter(|id| !states.contains_key(*id)).collect();
        for id in missing {
            self.queries.fetch_add(1, Ordering::Relaxed);
            if let Ok(out) = run_tool(
                "scontrol",
                &["show".into(), "job".into(), id.clone()],
                timeout,
            ) && let Some(state) = out
                .split_whitespace()
                .find_map(|w| w.strip_prefix("JobState="))
            {
                states.insert(id.clone(), state.to_string());
            }
        }
        Ok((states, false))
    }

    /// Cancels every job in flight, in one `scancel` per 500 jobs, the first time a waiting
    /// thread sees the run cancelled; later calls wait for that to be done.
    /// A job submitted after that batch (its thread was between `sbatch` and the tracker) is
    /// cancelled on its own.
    fn cancel_all(&self, mine: &str) {
        let ids: Vec<String> = {
            let Ok(mut t) = self.tracker.lock() else {
                return;
            };
            match &t.cancelled {
                Some(done) if done.iter().any(|id| id == mine) => return,
                Some(_) => vec![mine.to_string()],
                None => {
                    let ids: Vec<String> = t.jobs.keys().cloned().collect();
                    t.cancelled = Some(ids.clone());
                    ids
                }
            }
        };
        for batch in ids.chunks(500) {
            if let Err(e) = run_tool("scancel", batch, Duration::from_secs(60)) {
                tracing::warn!("slurm: scancel of {} jobs: {e}", batch.len());
            }
        }
        tracing::info!(jobs = ids.len(), "slurm: cancelled jobs of the run");
    }

    fn failure(&self, entry: &JournalEntry, state: &str) -> ExecutorFailure {
        let hint = match state {
            "TIMEOUT" => {
                "the job ran past its `--time`: raise `time` in the stage's `slurm:` or in [slurm] (autoscale.toml); a retry would time out again, so none is made"
            }
            "OUT_OF_MEMORY" => {
                "the job ran out of memory: raise the stage's `resources.memory` (no retry: it would run out again)"
            }
            "NODE_FAIL" | "BOOT_FAIL" | "PREEMPTED" => {
                "the node failed or the job was preempted: `retries` on the stage resubmits it"
            }
            "CANCELLED" => "the job was cancelled (scancel, or by the cluster)",
            _ => "its log is above; the full log is the file named here",
        };
        let mut f = ExecutorFailure::new(format!(
            "slurm job {} of `{}` ended {state} (log: {})",
            entry.job_id,
            entry.stage,
            entry.log.display()
        ))
        .hint(hint);
        f.log_tail = log_tail(&entry.log, 12);
        // Out of time or memory: the same job would be again.
        f.retryable = !matches!(state, "TIMEOUT" | "OUT_OF_MEMORY" | "DEADLINE");
        f
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &str {
        "slurm"
    }

    fn run(
        &self,
        job: &Submission<'_>,
        cancel: &AtomicBool,
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), ExecutorFailure> {
        let (entry, attached) = self.job_for(job)?;
        progress(json!({"executor": "slurm", "job": entry.job_id, "attached": attached}));
        tracing::info!(stage = job.stage, job = %entry.job_id, attached, "slurm job");
        if let Ok(mut t) = self.tracker.lock() {
            t.jobs
                .entry(entry.job_id.clone())
                .or_insert(JobState::Unknown(Instant::now()));
            // A new job: the next poll is due at the shortest interval.
            t.interval = Duration::from_secs_f64(self.config.poll_min_s);
        }
        let outage = Duration::from_secs_f64(self.config.outage_s);
        let vanish = Duration::from_secs_f64(self.config.vanish_s);
        let mut shown = String::new();
        let result = loop {
            if cancel.load(Ordering::Relaxed) {
                self.cancel_all(&entry.job_id);
                break Err(ExecutorFailure::new(format!(
                    "cancelled slurm job {} of `{}`",
                    entry.job_id, entry.stage
                )));
            }
            self.poll_if_due();
            let (state, failing) = {
                let Ok(t) = self.tracker.lock() else {
                    break Err(ExecutorFailure::new("slurm tracker poisoned"));
                };
                (t.jobs.get(&entry.job_id).cloned(), t.failing_since)
            };
            if let Some(since) = failing
                && since.elapsed() > outage
            {
                break Err(ExecutorFailure::new(format!(
                    "Slurm has not answered a job query for {:.0} s; job {} of `{}` is left as it is",
                    since.elapsed().as_secs_f64(),
                    entry.job_id,
                    entry.stage
                ))
                .hint("check `squeue` and `sacct` on this machine; `autoscale run` again re-attaches to the job"));
            }
            match state {
                Some(JobState::Active(s)) if s != shown => {
                    progress(json!({"executor": "slurm", "job": entry.job_id, "state": s}));
                    shown = s;
                }
                Some(JobState::Ended(s)) if s == "COMPLETED" => break Ok(()),
                Some(JobState::Ended(s)) => break Err(self.failure(&entry, &s)),
                Some(JobState::Unknown(since)) if since.elapsed() > vanish => {
                    break Err(ExecutorFailure::new(format!(
                        "slurm job {} of `{}` is known neither to squeue nor to sacct (for {:.0} s)",
                        entry.job_id,
                        entry.stage,
                        since.elapsed().as_secs_f64()
                    ))
                    .hint("raise MinJobAge in slurm.conf, or turn accounting on, so that finished jobs stay visible"));
                }
                _ => {}
            }
            if let Ok(t) = self.tracker.lock() {
                let wait = t.interval.min(Duration::from_millis(500));
                let _ = self.changed.wait_timeout(t, wait);
            }
        };
        self.forget(&entry.job_id);
        result
    }

    fn result_grace(&self) -> Duration {
        Duration::from_secs_f64(self.config.result_grace_s)
    }

    fn max_in_flight(&self) -> usize {
        self.config.max_jobs
    }
}

impl Drop for SlurmExecutor {
    fn drop(&mut self) {
        tracing::info!(
            submissions = self.submissions.load(Ordering::Relaxed),
            queries = self.queries.load(Ordering::Relaxed),
            "slurm executor"
        );
    }
}

/// `as-<first 16 hex digits of the key>`: what a head finds its jobs by.
fn job_name(job: &Submission<'_>) -> String {
    format!("as-{}", &job.key.to_hex()[..16])
}

fn is_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
    )
}

/// `id|STATE` lines; sacct writes `CANCELLED by 0`, of which the state is the first word.
fn parse_pairs(text: &str, sep: char) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (id, state) = line.split_once(sep)?;
            let state = state.split_whitespace().next()?.trim_end_matches('+');
            Some((id.trim().to_string(), state.to_string()))
        })
        .collect()
}

fn which(tool: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(format!(
            "`{tool}` is not on PATH: --executor slurm needs the Slurm client tools (sbatch, squeue, sacct, scancel)"
        ))
    }
}

/// Runs a Slurm tool with a time limit; its stdout, or its stderr as the error. The pipes are
/// read while it runs: `squeue` on a busy cluster writes more than a pipe holds.
fn run_tool(tool: &str, args: &[String], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{tool}`: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let waited = autoscale_engine::process::wait_or_cancel(
        &mut child,
        || Instant::now() >= deadline,
        Duration::from_millis(100),
    );
    let status = match waited {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{tool}` did not answer within {} s",
                timeout.as_secs()
            ));
        }
        Err(e) => return Err(format!("`{tool}`: {e}")),
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("`{tool}` failed ({status}): {}", stderr.trim()))
    }
}

/// Reads a child's pipe to its end in a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The last `lines` lines of a log file (of its last 64 KiB at most).
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    autoscale_engine::log_tail(&bytes, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_writes_more_than_a_pipe_holds_is_read_to_the_end() {
        let out = run_tool(
            "sh",
            &["-c".into(), "seq 1 100000; echo done >&2".into()],
            Duration::from_secs(30),
        )
        .expect("sh");
        assert_eq!(out.lines().count(), 100_000);
        let err = run_tool(
            "sh",
            &["-c".into(), "echo why >&2; exit 3".into()],
            Duration::from_secs(30),
        )
        .expect_err("exit 3");
        assert!(err.contains("why"), "{err}");
    }

    #[test]
    fn sacct_and_squeue_lines_parse_to_states() {
        let states = parse_pairs("12|COMPLETED\n13|CANCELLED by 0\n14|RUNNING\nbad\n", '|');
        assert_eq!(states["12"], "COMPLETED");
        assert_eq!(states["13"], "CANCELLED");
        assert!(is_active(&states["14"]));
        assert!(!is_active("TIMEOUT"));
        assert_eq!(states.len(), 3);
    }

    #[test]
    fn the_config_refuses_nonsense_intervals() {
        let bad = SlurmConfig {
            poll_min_s: 10.0,
            poll_max_s: 1.0,
            ..SlurmConfig::default()
        };
        assert!(bad.check().is_err());
        assert!(SlurmConfig::default().check().is_ok());
    }
}
