//! The plan: each stage's key from its params, inputs and code, looked up in the cache, and why a
//! stage that is not cached will run (`status`, `explain`); fan-outs planned from params or read
//! from a cached source's `fanout.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use autoscale_cache::{ActionKey, HitSource, Manifest};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::EngineError;
use crate::graph::topological_order;
use crate::key::{CACHE_SCHEMA, KeyRecord, group_digest};
use crate::kind::DeviceClass;
use crate::pipeline::{FANOUT_FILE, FanoutChild, FanoutList, InputRef, Pipeline};
use crate::run::Engine;

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

pub(crate) fn fanout_error(source: &str, stage: &str, message: String) -> EngineError {
    EngineError::Resources {
        message: format!("cannot fan out `{stage}` from `{source}`: {message}"),
        hint: format!(
            "`{source}` must write `{FANOUT_FILE}` as {{\"children\": [{{\"id\": \"name\", \"params\": {{...}}}}]}}"
        ),
    }
}

impl Engine {
    pub(crate) fn refs_path(&self, pipeline: &Pipeline) -> PathBuf {
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

    pub(crate) fn read_refs(&self, pipeline: &Pipeline) -> BTreeMap<String, ActionKey> {
        std::fs::read(self.refs_path(pipeline))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(crate) fn write_refs(&self, pipeline: &Pipeline, refs: &BTreeMap<String, ActionKey>) {
        let path = self.refs_path(pipeline);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        if let Ok(bytes) = serde_json::to_vec(refs)
            && std::fs::write(&tmp, bytes).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// The key record of stage `i`, or the upstream stage it waits on.
    pub(crate) fn record<'m>(
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
        // Only a device-dependent kind with a GPU request may need to know whether GPUs are
        // there (which may ask `nvidia-smi`); every other key is made without asking.
        let device = kind.device_identity(DeviceClass::Cpu).map(|cpu| {
            if stage.resources.gpus > 0 && self.gpus_present() {
                kind.device_identity(DeviceClass::Cuda).unwrap_or(cpu)
            } else {
                cpu
            }
        });
        Ok(Ok(KeyRecord {
            schema: CACHE_SCHEMA,
            kind: stage.kind.clone(),
            kind_version: kind.implementation().version,
            implementation: kind.implementation().libraries().map(str::to_string),
            device: device.map(str::to_string),
            params: Value::Object(stage.params.clone()),
            env: stage.env.clone(),
            inputs,
        }))
    }

    pub(crate) fn reasons(
        &self,
        refs: &BTreeMap<String, ActionKey>,
        id: &str,
        record: &KeyRecord,
    ) -> Result<Vec<String>, EngineError> {
        let failed_log = self.failed_log_path(&record.key());
        if failed_log.is_file() {
            return Ok(vec![format!(
                "failed last run (log: {})",
                failed_log.display()
            )]);
        }
        let Some(old_key) = refs.get(id) else {
            return Ok(vec!["never run".into()]);
        };
        let Some((old, _)) = self.cache.find(old_key)? else {
            return Ok(vec![match self.cache.quarantined(old_key) {
                Some(why) => format!(
                    "its last result ({}) was found broken and set aside: {why}",
                    old_key.short()
                ),
                None => format!(
                    "its last result ({}) is no longer in the cache",
                    old_key.short()
                ),
            }]);
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
    pub(crate) fn expand_one_planned_fanout(
        &self,
        pipeline: &mut Pipeline,
    ) -> Result<bool, EngineError> {
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

    pub(crate) fn status_once(&self, pipeline: &Pipeline) -> Result<Vec<StageStatus>, EngineError> {
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
        let i = stage_index(pipeline, id)?;
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
        let i = stage_index(pipeline, id)?;
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

    /// The children a run-time fan-out source listed in its `fanout.json`.
    pub(crate) fn read_fanout(
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

    /// Expands run-time fan-out `placeholder` into the children its `source` listed in the
    /// `fanout.json` of its result `manifest`: what a run does once the source has run, and
    /// `status` once it is cached. (Fan-outs planned from params: [`Self::expanded`].)
    pub(crate) fn expand_from_result(
        &self,
        pipeline: &mut Pipeline,
        placeholder: usize,
        source: usize,
        manifest: &Manifest,
    ) -> Result<(), EngineError> {
        let children = self.read_fanout(pipeline, placeholder, manifest)?;
        let source_id = pipeline.stages[source].id.clone();
        let id = pipeline.stages[placeholder].id.clone();
        pipeline
            .expand_fanout(placeholder, &children)
            .map_err(|m| fanout_error(&source_id, &id, m))
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
                self.expand_from_result(pipeline, placeholder, source, &manifest)?;
                expanded = true;
                break;
            }
            if !expanded {
                break;
            }
        }
        Ok(())
    }
}

/// The position of stage `id`, or an error that suggests the nearest id.
fn stage_index(pipeline: &Pipeline, id: &str) -> Result<usize, EngineError> {
    pipeline
        .position(id)
        .ok_or_else(|| EngineError::UnknownStage {
            id: id.into(),
            hint: pipeline.suggest_stage(id),
        })
}

pub(crate) fn missing_output(
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
