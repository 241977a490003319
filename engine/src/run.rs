//! Planning and running: stage keys against the cache, `status` with reasons, and the scheduler
//! that runs ready stages in parallel within CPU, GPU and memory limits.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use autoscale_cache::{
    ActionKey, Cache, HitSource, LockHolder, Manifest, PendingAction, StageTimings,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::devices::GpuSpec;
use crate::error::{ConfigErrors, EngineError};
use crate::files::FileHasher;
use crate::graph::topological_order;
use crate::key::{CACHE_SCHEMA, KeyRecord, group_digest};
use crate::kind::{InputPath, KindRegistry, StageContext, StageError};
use crate::pipeline::{FANOUT_FILE, FanoutChild, FanoutList, InputRef, Overrides, Pipeline};

/// The engine: a cache, the known stage kinds, and the workspace file memo.
pub struct Engine {
    cache: Cache,
    kinds: KindRegistry,
    files: FileHasher,
}

/// Where a stage stands before a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StageState {
    Cached {
        key: ActionKey,
        /// Found in the remote cache, not yet here: a run downloads it instead of running it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        remote: bool,
    },
    WillRun {
        key: ActionKey,
        reasons: Vec<String>,
    },
    /// Its key is unknown until this upstream stage has run.
    Waiting { on: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub kind: String,
    #[serde(flatten)]
    pub state: StageState,
}

/// What `explain` shows for one stage.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub stage: String,
    pub state: StageState,
    /// The record the key is the hash of; inputs still unknown are left out.
    pub record: Value,
    pub previous_key: Option<ActionKey>,
    pub previous_record: Option<Value>,
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Executed,
    Cached,
    Failed,
    Skipped,
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
        devices: Option<Vec<u32>>,
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
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub gpus: GpuSpec,
    pub keep_going: bool,
    pub cancel: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpus: GpuSpec::Auto,
            keep_going: false,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: bool,
    pub duration_ms: u64,
    /// A no-op answered from the last run's stamp (see [`crate::stamp`]), without planning.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub from_stamp: bool,
}

enum Msg {
    Waiting(usize, Option<LockHolder>),
    Progress(usize, Value),
    /// Ran and ingested: digests known, resources free, manifest not yet committed.
    Ran(usize, Manifest),
    /// Another process committed it while we waited for the lock.
    FoundCached(usize, Manifest),
    Failed(usize, String, Option<PathBuf>),
    Committed(Vec<usize>),
    CommitFailed(String),
}

#[derive(Debug, Clone)]
enum Slot {
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

    fn refs_path(&self, pipeline: &Pipeline) -> PathBuf {
        let name: String = pipeline
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.cache.refs_dir().join(format!("pipeline-{name}.json"))
    }

    fn read_refs(&self, pipeline: &Pipeline) -> BTreeMap<String, ActionKey> {
        std::fs::read(self.refs_path(pipeline))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_refs(&self, pipeline: &Pipeline, refs: &BTreeMap<String, ActionKey>) {
        let path = self.refs_path(pipeline);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        if let Ok(bytes) = serde_json::to_vec(refs)
            && std::fs::write(&tmp, bytes).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// The key record of stage `i`, or the upstream stage it waits on.
    fn record<'m>(
        &self,
        pipeline: &Pipeline,
        i: usize,
        done: &dyn Fn(usize) -> Option<&'m Manifest>,
    ) -> Result<Result<KeyRecord, usize>, EngineError> {
        let stage = &pipeline.stages[i];
        let kind = self
            .kinds
            .get(&stage.kind)
            .ok_or_else(|| EngineError::UnknownStage {
                id: stage.id.clone(),
                hint: None,
            })?;
        let mut inputs = BTreeMap::new();
        for (name, input) in &stage.inputs {
            let digest = match input {
                InputRef::File(path) => self.files.digest(path)?,
                InputRef::Stage { id, path } => {
                    let up = pipeline.position(id).unwrap_or(i);
                    let Some(manifest) = done(up) else {
                        return Ok(Err(up));
                    };
                    manifest
                        .digest_of(path)
                        .ok_or_else(|| missing_output(stage, name, id, path, manifest))?
                }
                InputRef::Group { ids, .. } => {
                    let mut members = Vec::new();
                    for id in ids {
                        let up = pipeline.position(id).unwrap_or(i);
                        let Some(manifest) = done(up) else {
                            return Ok(Err(up));
                        };
                        members.push((id.as_str(), manifest.tree));
                    }
                    group_digest(members)
                }
            };
            inputs.insert(name.clone(), digest);
        }
        Ok(Ok(KeyRecord {
            schema: CACHE_SCHEMA,
            kind: stage.kind.clone(),
            kind_version: kind.version(),
            implementation: kind.implementation().map(str::to_string),
            params: Value::Object(stage.params.clone()),
            env: stage.env.clone(),
            inputs,
        }))
    }

    fn reasons(
        &self,
        refs: &BTreeMap<String, ActionKey>,
        id: &str,
        record: &KeyRecord,
    ) -> Result<Vec<String>, EngineError> {
        let Some(old_key) = refs.get(id) else {
            return Ok(vec!["never run".into()]);
        };
        let Some((old, _)) = self.cache.find(old_key)? else {
            return Ok(vec![format!(
                "its last result ({}) is no longer in the cache",
                old_key.short()
            )]);
        };
        let changes = serde_json::from_str::<KeyRecord>(old.record.get())
            .map(|old| record.changes_since(&old))
            .unwrap_or_else(|_| vec!["the last run's key record is unreadable".into()]);
        Ok(if changes.is_empty() {
            vec!["not in the cache".into()]
        } else {
            changes
        })
    }

    /// The pipeline with every run-time fan-out expanded whose source is cached, or whose
    /// source's kind knows its children from its params alone ([`StageKind::planned_fanout`]).
    pub fn expanded(&self, pipeline: &Pipeline) -> Result<Pipeline, EngineError> {
        let mut p = pipeline.clone();
        loop {
            self.expand_cached_fanouts(&mut p)?;
            if !self.expand_one_planned_fanout(&mut p)? {
                return Ok(p);
            }
        }
    }

    /// Expands the first placeholder whose (non-placeholder) source plans its children from
    /// its params; `false` when there is none.
    fn expand_one_planned_fanout(&self, pipeline: &mut Pipeline) -> Result<bool, EngineError> {
        for (placeholder, source) in pipeline.fanout_placeholders() {
            let src = &pipeline.stages[source];
            if src.fanout_from.is_some() {
                continue;
            }
            let Some(planned) = self
                .kinds
                .get(&src.kind)
                .and_then(|k| k.planned_fanout(&src.params))
            else {
                continue;
            };
            let (source_id, id) = (src.id.clone(), pipeline.stages[placeholder].id.clone());
            let children = planned.map_err(|m| fanout_error(&source_id, &id, m))?;
            pipeline
                .expand_fanout(placeholder, &children)
                .map_err(|m| fanout_error(&source_id, &id, m))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Every stage of `expanded(pipeline)`, cached or going to run, and why.
    pub fn status(&self, pipeline: &Pipeline) -> Result<Vec<StageStatus>, EngineError> {
        let p = self.expanded(pipeline)?;
        self.status_once(&p)
    }

    fn status_once(&self, pipeline: &Pipeline) -> Result<Vec<StageStatus>, EngineError> {
        let refs = self.read_refs(pipeline);
        let mut manifests: Vec<Option<Manifest>> = vec![None; pipeline.stages.len()];
        let mut states: Vec<Option<StageState>> = vec![None; pipeline.stages.len()];
        // --- remote cache (issue 7): stages by depth, so that the remote cache is asked for a
        // whole level's keys at once rather than one round trip per stage.
        let mut order = topological_order(pipeline);
        let mut depth = vec![0usize; pipeline.stages.len()];
        for &i in &order {
            depth[i] = pipeline
                .dependencies(i)
                .iter()
                .map(|&d| depth[d] + 1)
                .max()
                .unwrap_or(0);
        }
        // Stable: still topological, since a stage is deeper than all it depends on.
        order.sort_by_key(|&i| depth[i]);
        for (pos, &i) in order.iter().enumerate() {
            if self.cache.remote().is_some() && (pos == 0 || depth[order[pos - 1]] != depth[i]) {
                let level: Vec<ActionKey> = order[pos..]
                    .iter()
                    .take_while(|&&j| depth[j] == depth[i])
                    .filter_map(
                        |&j| match self.record(pipeline, j, &|k| manifests[k].as_ref()) {
                            Ok(Ok(record)) => Some(record.key()),
                            _ => None,
                        },
                    )
                    .collect();
                self.cache.prefetch(&level);
            }
            // --- end remote cache
            let stage = &pipeline.stages[i];
            if let Some(source) = &stage.fanout_from {
                states[i] = Some(StageState::Waiting { on: source.clone() });
                continue;
            }
            let state = match self.record(pipeline, i, &|j| manifests[j].as_ref())? {
                Err(up) => StageState::Waiting {
                    on: pipeline.stages[up].id.clone(),
                },
                Ok(record) => {
                    let key = record.key();
                    match self.cache.find(&key)? {
                        Some((m, source)) => {
                            manifests[i] = Some(m);
                            StageState::Cached {
                                key,
                                remote: source == HitSource::Remote,
                            }
                        }
                        None => StageState::WillRun {
                            key,
                            reasons: self.reasons(&refs, &stage.id, &record)?,
                        },
                    }
                }
            };
            states[i] = Some(state);
        }
        self.files.save();
        Ok(pipeline
            .stages
            .iter()
            .zip(states)
            .map(|(s, state)| StageStatus {
                stage: s.id.clone(),
                kind: s.kind.clone(),
                state: state.unwrap_or(StageState::Waiting { on: String::new() }),
            })
            .collect())
    }

    /// The key record of one stage and how it differs from the stage's last cached run.
    pub fn explain(&self, pipeline: &Pipeline, id: &str) -> Result<Explanation, EngineError> {
        let pipeline = &self.expanded(pipeline)?;
        let i = pipeline
            .position(id)
            .ok_or_else(|| EngineError::UnknownStage {
                id: id.into(),
                hint: pipeline.suggest_stage(id),
            })?;
        let status = self.status_once(pipeline)?;
        let refs = self.read_refs(pipeline);
        let previous_key = refs.get(id).copied();
        let previous_record = match &previous_key {
            Some(k) => self.cache.find(k)?.map(|(m, _)| m.record_value()),
            None => None,
        };
        let mut manifests: HashMap<usize, Manifest> = HashMap::new();
        for (j, s) in status.iter().enumerate() {
            if let StageState::Cached { key, .. } = &s.state
                && let Some((m, _)) = self.cache.find(key)?
            {
                manifests.insert(j, m);
            }
        }
        let (record, changes) = match self.record(pipeline, i, &|j| manifests.get(&j))? {
            Ok(record) => {
                let changes = match previous_record
                    .clone()
                    .map(serde_json::from_value::<KeyRecord>)
                {
                    Some(Ok(old)) => record.changes_since(&old),
                    _ => Vec::new(),
                };
                (record.to_value(), changes)
            }
            Err(up) => {
                let stage = &pipeline.stages[i];
                let partial = json!({
                    "schema": CACHE_SCHEMA,
                    "kind": stage.kind,
                    "params": stage.params,
                    "env": stage.env,
                    "inputs": format!("unknown until `{}` has run", pipeline.stages[up].id),
                });
                (partial, Vec::new())
            }
        };
        Ok(Explanation {
            stage: id.into(),
            state: status[i].state.clone(),
            record,
            previous_key,
            previous_record,
            changes,
        })
    }

    /// The committed manifest of a stage, when its current key is cached.
    pub fn cached_manifest(
        &self,
        pipeline: &Pipeline,
        id: &str,
    ) -> Result<Result<Manifest, StageState>, EngineError> {
        let pipeline = &self.expanded(pipeline)?;
        let i = pipeline
            .position(id)
            .ok_or_else(|| EngineError::UnknownStage {
                id: id.into(),
                hint: pipeline.suggest_stage(id),
            })?;
        let status = self.status_once(pipeline)?;
        match &status[i].state {
            StageState::Cached { key, .. } => match self.cache.lookup(key)? {
                Some(m) => {
                    self.cache.materialize(&m)?;
                    Ok(Ok(m))
                }
                None => Ok(Err(status[i].state.clone())),
            },
            other => Ok(Err(other.clone())),
        }
    }

    /// Every key the pipeline references now (for `cache gc`); stages still to run add none.
    pub fn live_keys(&self, pipeline: &Pipeline) -> Result<Vec<ActionKey>, EngineError> {
        Ok(self
            .status(pipeline)?
            .into_iter()
            .filter_map(|s| match s.state {
                StageState::Cached { key, .. } => Some(key),
                _ => None,
            })
            .collect())
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
        let devices = options.gpus.resolve();
        let total_memory_mb = system_memory_mb();
        self.check_resources(pipeline, &devices, total_memory_mb, on_event)?;
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
                match self
                    .read_fanout(&pipeline, placeholder, manifest)
                    .and_then(|children| {
                        pipeline
                            .expand_fanout(placeholder, &children)
                            .map_err(|m| fanout_error(&pipeline.stages[source].id, &id, m))
                    }) {
                    Ok(()) => expanded = true,
                    Err(e) => {
                        report.finish(&id, Outcome::Failed, None, 0, Some(error_text(&e)), None);
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

    /// The children a run-time fan-out source listed in its `fanout.json`.
    fn read_fanout(
        &self,
        pipeline: &Pipeline,
        placeholder: usize,
        manifest: &Manifest,
    ) -> Result<Vec<FanoutChild>, EngineError> {
        let source = pipeline.stages[placeholder]
            .fanout_from
            .clone()
            .unwrap_or_default();
        let id = &pipeline.stages[placeholder].id;
        let path = self.cache.materialize(manifest)?.join(FANOUT_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            fanout_error(
                &source,
                id,
                format!("cannot read `{}`: {e}", path.display()),
            )
        })?;
        let list: FanoutList = serde_json::from_slice(&bytes).map_err(|e| {
            fanout_error(
                &source,
                id,
                format!("`{}` is not a fan-out list: {e}", path.display()),
            )
        })?;
        Ok(list.children)
    }

    /// Expands every run-time fan-out whose source is cached, for `status` and `dag`.
    pub fn expand_cached_fanouts(&self, pipeline: &mut Pipeline) -> Result<(), EngineError> {
        while !pipeline.fanout_placeholders().is_empty() {
            let mut expanded = false;
            let status = self.status_once(pipeline)?;
            for (placeholder, source) in pipeline.fanout_placeholders() {
                let StageState::Cached { key, .. } = &status[source].state else {
                    continue;
                };
                let Some(manifest) = self.cache.lookup(key)? else {
                    continue;
                };
                let children = self.read_fanout(pipeline, placeholder, &manifest)?;
                let source_id = pipeline.stages[source].id.clone();
                let id = pipeline.stages[placeholder].id.clone();
                pipeline
                    .expand_fanout(placeholder, &children)
                    .map_err(|m| fanout_error(&source_id, &id, m))?;
                expanded = true;
                break;
            }
            if !expanded {
                break;
            }
        }
        Ok(())
    }

    /// One scheduling pass: runs what can run until nothing more can start. Fan-out
    /// placeholders, and what reads them, wait for the next pass.
    fn run_pass(
        &self,
        pipeline: &Pipeline,
        options: &RunOptions,
        devices: &[u32],
        total_memory_mb: u64,
        report: &mut Report<'_>,
    ) -> Result<Pass, EngineError> {
        let n = pipeline.stages.len();
        let jobs = options.jobs.max(1);
        let order = topological_order(pipeline);
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut waiting_on: Vec<usize> = vec![0; n];
        for (i, waiting) in waiting_on.iter_mut().enumerate() {
            let deps = pipeline.dependencies(i);
            *waiting = deps.len();
            for d in deps {
                dependents[d].push(i);
            }
        }
        let mut slots: Vec<Slot> = vec![Slot::Blocked; n];
        let mut attempts: Vec<u32> = vec![0; n];
        let mut ready: VecDeque<usize> = VecDeque::new();
        let mut resolve: VecDeque<usize> = order
            .iter()
            .copied()
            .filter(|&i| waiting_on[i] == 0)
            .collect();
        let mut free_cpus = jobs;
        let mut free_gpus: Vec<u32> = devices.to_vec();
        let mut free_memory = total_memory_mb;
        let mut held: HashMap<usize, (usize, Vec<u32>, u64)> = HashMap::new();
        let mut uncommitted = 0usize;
        let mut stop_launching = false;
        let (tx, rx) = mpsc::channel::<Msg>();
        let (commit_tx, commit_rx) = mpsc::channel::<(usize, PendingAction)>();

        std::thread::scope(|scope| -> Result<(), EngineError> {
            let cache = &self.cache;
            let committer_tx = tx.clone();
            scope.spawn(move || committer(cache, commit_rx, committer_tx));

            loop {
                // Resolve keys of stages whose inputs are all known; cached ones finish at once.
                while let Some(i) = resolve.pop_front() {
                    if !matches!(slots[i], Slot::Blocked)
                        || pipeline.stages[i].fanout_from.is_some()
                    {
                        continue;
                    }
                    let record = match self.record(pipeline, i, &|j| match &slots[j] {
                        Slot::Done(m) => Some(m),
                        _ => None,
                    }) {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => continue,
                        Err(e) => {
                            slots[i] = Slot::Failed;
                            report.finish(
                                &pipeline.stages[i].id,
                                Outcome::Failed,
                                None,
                                0,
                                Some(error_text(&e)),
                                None,
                            );
                            skip_dependents(pipeline, i, &dependents, &mut slots, report);
                            stop_launching |= !options.keep_going;
                            continue;
                        }
                    };
                    let key = record.key();
                    match self.cache.lookup(&key)? {
                        Some(m) => {
                            report.finish(
                                &pipeline.stages[i].id,
                                Outcome::Cached,
                                Some(key),
                                0,
                                None,
                                None,
                            );
                            slots[i] = Slot::Done(m);
                            unblock(&dependents[i], &mut waiting_on, &mut resolve);
                        }
                        None => {
                            slots[i] = Slot::Ready(record);
                            ready.push_back(i);
                        }
                    }
                }
                if options.cancel.load(Ordering::Relaxed) {
                    stop_launching = true;
                    report.summary.interrupted = true;
                }
                // Launch what fits.
                if !stop_launching {
                    let mut deferred = VecDeque::new();
                    while let Some(i) = ready.pop_front() {
                        let res = &pipeline.stages[i].resources;
                        let cpus = (res.cpus as usize).min(jobs);
                        let gpus = if devices.is_empty() {
                            0
                        } else {
                            res.gpus as usize
                        };
                        let memory = res.memory_mb.unwrap_or(0).min(total_memory_mb);
                        if cpus > free_cpus || gpus > free_gpus.len() || memory > free_memory {
                            deferred.push_back(i);
                            continue;
                        }
                        free_cpus -= cpus;
                        free_memory -= memory;
                        let granted: Vec<u32> = free_gpus.drain(..gpus).collect();
                        held.insert(i, (cpus, granted.clone(), memory));
                        let Slot::Ready(record) = std::mem::replace(&mut slots[i], Slot::Running)
                        else {
                            continue;
                        };
                        attempts[i] += 1;
                        let stage = &pipeline.stages[i];
                        let device_list = if res.gpus > 0 && !devices.is_empty() {
                            Some(granted)
                        } else {
                            None
                        };
                        if res.gpus > 0 && devices.is_empty() {
                            (report.on_event)(Event::Warning {
                                stage: Some(stage.id.clone()),
                                message: format!(
                                    "no GPU available: running `{}` on the CPU",
                                    stage.id
                                ),
                            });
                        }
                        (report.on_event)(Event::Started {
                            stage: stage.id.clone(),
                            kind: stage.kind.clone(),
                            attempt: attempts[i],
                            devices: device_list.clone(),
                        });
                        let tx = tx.clone();
                        let commit_tx = commit_tx.clone();
                        let inputs = self.input_paths(pipeline, i, &slots)?;
                        let cancel = &options.cancel;
                        scope.spawn(move || {
                            match self.execute(
                                pipeline,
                                i,
                                record,
                                inputs,
                                device_list,
                                cancel,
                                &tx,
                            ) {
                                Ok((manifest, pending)) => {
                                    let _ = tx.send(Msg::Ran(i, manifest));
                                    let _ = commit_tx.send((i, pending));
                                }
                                Err(msg) => {
                                    let _ = tx.send(msg);
                                }
                            }
                        });
                    }
                    ready = deferred;
                }
                if held.is_empty()
                    && uncommitted == 0
                    && resolve.is_empty()
                    && (ready.is_empty() || stop_launching)
                {
                    break;
                }
                let msg = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                match msg {
                    Msg::Waiting(i, holder) => (report.on_event)(Event::Waiting {
                        stage: pipeline.stages[i].id.clone(),
                        holder,
                    }),
                    Msg::Progress(i, data) => (report.on_event)(Event::Progress {
                        stage: pipeline.stages[i].id.clone(),
                        data,
                    }),
                    Msg::Ran(i, manifest) => {
                        release(
                            &mut held,
                            i,
                            &mut free_cpus,
                            &mut free_gpus,
                            &mut free_memory,
                        );
                        uncommitted += 1;
                        report.finish(
                            &pipeline.stages[i].id,
                            Outcome::Executed,
                            Some(manifest.key),
                            manifest.timings.duration_ms,
                            None,
                            None,
                        );
                        slots[i] = Slot::Done(manifest);
                        unblock(&dependents[i], &mut waiting_on, &mut resolve);
                    }
                    Msg::FoundCached(i, manifest) => {
                        release(
                            &mut held,
                            i,
                            &mut free_cpus,
                            &mut free_gpus,
                            &mut free_memory,
                        );
                        report.finish(
                            &pipeline.stages[i].id,
                            Outcome::Cached,
                            Some(manifest.key),
                            0,
                            None,
                            None,
                        );
                        slots[i] = Slot::Done(manifest);
                        unblock(&dependents[i], &mut waiting_on, &mut resolve);
                    }
                    // Reported as executed when it ran; the run returns only once it is durable.
                    Msg::Committed(list) => uncommitted -= list.len(),
                    Msg::CommitFailed(message) => {
                        return Err(EngineError::Resources {
                            message: format!("could not commit to the cache: {message}"),
                            hint: "check free space and permissions of the cache directory".into(),
                        });
                    }
                    Msg::Failed(i, error, log) => {
                        release(
                            &mut held,
                            i,
                            &mut free_cpus,
                            &mut free_gpus,
                            &mut free_memory,
                        );
                        let stage = &pipeline.stages[i];
                        let cancelled = options.cancel.load(Ordering::Relaxed);
                        if !cancelled && attempts[i] <= stage.retries {
                            (report.on_event)(Event::Warning {
                                stage: Some(stage.id.clone()),
                                message: format!(
                                    "attempt {} failed ({error}); retrying",
                                    attempts[i]
                                ),
                            });
                            if let Ok(Ok(record)) = self.record(pipeline, i, &|j| match &slots[j] {
                                Slot::Done(m) => Some(m),
                                _ => None,
                            }) {
                                slots[i] = Slot::Ready(record);
                                ready.push_back(i);
                                continue;
                            }
                        }
                        slots[i] = Slot::Failed;
                        report.finish(&stage.id, Outcome::Failed, None, 0, Some(error), log);
                        skip_dependents(pipeline, i, &dependents, &mut slots, report);
                        if !options.keep_going {
                            stop_launching = true;
                        }
                    }
                }
            }
            drop(commit_tx);
            Ok(())
        })?;
        let failed = slots.iter().any(|s| matches!(s, Slot::Failed));
        Ok(Pass {
            done: slots
                .into_iter()
                .map(|s| if let Slot::Done(m) = s { Some(m) } else { None })
                .collect(),
            stopped: report.summary.interrupted || (failed && !options.keep_going),
        })
    }

    fn check_resources(
        &self,
        pipeline: &Pipeline,
        devices: &[u32],
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
                        "stage `{}` needs {} GPUs but only {} are available ({:?})",
                        stage.id,
                        r.gpus,
                        devices.len(),
                        devices
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

    fn input_paths(
        &self,
        pipeline: &Pipeline,
        i: usize,
        slots: &[Slot],
    ) -> Result<BTreeMap<String, InputPath>, EngineError> {
        let done = |id: &str| -> Result<PathBuf, EngineError> {
            let j = pipeline.position(id).unwrap_or(i);
            match &slots[j] {
                Slot::Done(m) => Ok(self.cache.materialize(m)?),
                _ => Err(EngineError::UnknownStage {
                    id: id.into(),
                    hint: None,
                }),
            }
        };
        let mut inputs = BTreeMap::new();
        for (name, input) in &pipeline.stages[i].inputs {
            let path = match input {
                InputRef::File(p) => {
                    InputPath::One(std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                }
                InputRef::Stage { id, path } => {
                    let dir = done(id)?;
                    InputPath::One(if path.is_empty() { dir } else { dir.join(path) })
                }
                InputRef::Group { ids, .. } => InputPath::Many(
                    ids.iter()
                        .map(|id| Ok((id.clone(), done(id)?)))
                        .collect::<Result<_, EngineError>>()?,
                ),
            };
            inputs.insert(name.clone(), path);
        }
        Ok(inputs)
    }

    /// Runs one stage in a worker thread: lock, re-check, run, ingest. The `Err` is the message
    /// for the scheduler, sent once per stage, so its size does not matter.
    #[allow(clippy::too_many_arguments, clippy::result_large_err)]
    fn execute(
        &self,
        pipeline: &Pipeline,
        i: usize,
        record: KeyRecord,
        inputs: BTreeMap<String, InputPath>,
        devices: Option<Vec<u32>>,
        cancel: &AtomicBool,
        tx: &mpsc::Sender<Msg>,
    ) -> Result<(Manifest, PendingAction), Msg> {
        let stage = &pipeline.stages[i];
        let key = record.key();
        let fail = |e: &dyn std::error::Error| Msg::Failed(i, error_text(e), None);
        let label = format!("{}/{}", pipeline.name, stage.id);
        let lock = match self.cache.try_lock(&key, &label).map_err(|e| fail(&e))? {
            Ok(lock) => lock,
            Err(holder) => {
                tracing::info!(stage = %stage.id, ?holder, "waiting for another process holding the key");
                let _ = tx.send(Msg::Waiting(i, holder));
                self.cache.lock(&key, &label).map_err(|e| fail(&e))?
            }
        };
        if let Some(m) = self.cache.lookup(&key).map_err(|e| fail(&e))? {
            return Err(Msg::FoundCached(i, m));
        }
        let staging = self.cache.staging(&lock).map_err(|e| fail(&e))?;
        tracing::debug!(stage = %stage.id, key = %key.short(), staging = %staging.display(), "running");
        let scratch = self.cache.scratch_dir(&key).map_err(|e| fail(&e))?;
        let log_path = staging.join("log.txt");
        let kind = match self.kinds.get(&stage.kind) {
            Some(k) => k.clone(),
            None => {
                return Err(Msg::Failed(
                    i,
                    format!("unknown kind `{}`", stage.kind),
                    None,
                ));
            }
        };
        let progress = |data: Value| {
            let _ = tx.send(Msg::Progress(i, data));
        };
        let root = std::path::absolute(&pipeline.root).unwrap_or_else(|_| pipeline.root.clone());
        let ctx = StageContext {
            stage_id: &stage.id,
            params: &stage.params,
            inputs: &inputs,
            out_dir: staging.join("out"),
            scratch_dir: scratch,
            work_dir: root,
            log_path: log_path.clone(),
            devices,
            env: &stage.env,
            cancel,
            progress: &progress,
        };
        let t0 = Instant::now();
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let result = kind.run(&ctx).and_then(|r| {
            // A workspace file edited while the stage ran: the result may hold either version,
            // so it must not be cached under the key of the version hashed before.
            for (name, input) in &stage.inputs {
                if let InputRef::File(path) = input {
                    let now = self.files.digest(path).ok();
                    if now.as_ref() != record.inputs.get(name) {
                        return Err(StageError::Failed {
                            message: format!(
                                "input `{name}` (`{}`) changed while the stage ran; its result was not cached",
                                path.display()
                            ),
                            hint: Some("run again once the file has stopped changing".into()),
                        });
                    }
                }
            }
            Ok(r)
        });
        let log = std::fs::read(&log_path).unwrap_or_default();
        match result {
            Ok(result) => {
                let metadata = json!({
                    "pipeline": pipeline.name,
                    "stage": stage.id,
                    "kind": stage.kind,
                    "result": result,
                });
                let timings = StageTimings {
                    started_unix_ms,
                    duration_ms: t0.elapsed().as_millis() as u64,
                };
                let pending = self
                    .cache
                    .ingest(lock, &log, record.to_value(), metadata, timings)
                    .map_err(|e| fail(&e))?;
                Ok((pending.manifest.clone(), pending))
            }
            Err(e) => {
                let kept = self.keep_failed_log(&key, &log);
                self.cache.abandon(lock);
                let mut message = match &e {
                    StageError::Failed {
                        message,
                        hint: Some(h),
                    } => format!("{message} (hint: {h})"),
                    other => other.to_string(),
                };
                let tail = log_tail(&log, 12);
                if !tail.is_empty() {
                    message.push_str("\n--- last lines of its log ---\n");
                    message.push_str(&tail);
                }
                Err(Msg::Failed(i, message, kept))
            }
        }
    }

    /// Failed results are never cached, but their logs are kept for the person debugging.
    fn keep_failed_log(&self, key: &ActionKey, log: &[u8]) -> Option<PathBuf> {
        let dir = self.cache.refs_dir().join("failed");
        std::fs::create_dir_all(&dir).ok()?;
        let path = dir.join(format!("{}.log", key.to_hex()));
        std::fs::write(&path, log).ok()?;
        Some(path)
    }
}

/// What one scheduling pass leaves: each stage's manifest if it is done.
struct Pass {
    done: Vec<Option<Manifest>>,
    stopped: bool,
}

/// Reports each stage's outcome once, however many passes see it.
struct Report<'a> {
    seen: HashSet<String>,
    summary: RunSummary,
    on_event: &'a (dyn Fn(Event) + Sync),
}

impl Report<'_> {
    fn finish(
        &mut self,
        stage: &str,
        outcome: Outcome,
        key: Option<ActionKey>,
        duration_ms: u64,
        error: Option<String>,
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
        }
        (self.on_event)(Event::Finished {
            stage: stage.to_string(),
            outcome,
            key,
            duration_ms,
            error,
            log,
        });
    }
}

/// One input of each dependent is now known; those with none left to wait for get resolved.
fn unblock(dependents: &[usize], waiting_on: &mut [usize], resolve: &mut VecDeque<usize>) {
    for &d in dependents {
        waiting_on[d] -= 1;
        if waiting_on[d] == 0 {
            resolve.push_back(d);
        }
    }
}

fn skip_dependents(
    pipeline: &Pipeline,
    i: usize,
    dependents: &[Vec<usize>],
    slots: &mut [Slot],
    report: &mut Report<'_>,
) {
    let mut stack = dependents[i].clone();
    while let Some(d) = stack.pop() {
        if matches!(slots[d], Slot::Blocked | Slot::Ready(_)) {
            slots[d] = Slot::Skipped;
            report.finish(
                &pipeline.stages[d].id,
                Outcome::Skipped,
                None,
                0,
                Some(format!("`{}` failed", pipeline.stages[i].id)),
                None,
            );
            stack.extend(dependents[d].iter().copied());
        }
    }
}

fn fanout_error(source: &str, stage: &str, message: String) -> EngineError {
    EngineError::Resources {
        message: format!("cannot fan out `{stage}` from `{source}`: {message}"),
        hint: format!(
            "`{source}` must write `{FANOUT_FILE}` as {{\"children\": [{{\"id\": \"name\", \"params\": {{...}}}}]}}"
        ),
    }
}

/// The most often the committer flushes the file system. Each flush (`syncfs`) also stalls
/// every metadata write on the file system until the journal commits; one per stage made
/// `mkdir` cost 0.2 ms and a first run of 1,000 trivial stages 2x a shell loop (BENCHMARKS.md).
/// Nothing waits on a commit but the end of the run and other processes wanting the same key.
const COMMIT_EVERY: Duration = Duration::from_millis(50);

fn committer(cache: &Cache, rx: mpsc::Receiver<(usize, PendingAction)>, tx: mpsc::Sender<Msg>) {
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
                let _ = tx.send(Msg::CommitFailed(error_text(&e)));
                return;
            }
        }
    }
}

fn release(
    held: &mut HashMap<usize, (usize, Vec<u32>, u64)>,
    i: usize,
    cpus: &mut usize,
    gpus: &mut Vec<u32>,
    memory: &mut u64,
) {
    if let Some((c, g, m)) = held.remove(&i) {
        *cpus += c;
        gpus.extend(g);
        gpus.sort_unstable();
        *memory += m;
    }
}

fn missing_output(
    stage: &crate::pipeline::Stage,
    input: &str,
    upstream: &str,
    path: &str,
    manifest: &Manifest,
) -> EngineError {
    let available: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .take(10)
        .collect();
    EngineError::Resources {
        message: format!(
            "input `{input}` of stage `{}` names `{upstream}/{path}`, but `{upstream}` produced no such output",
            stage.id
        ),
        hint: format!(
            "`{upstream}` produced: {}",
            if available.is_empty() {
                "nothing".to_string()
            } else {
                available.join(", ")
            }
        ),
    }
}

/// An error and its causes on one line.
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn log_tail(log: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
