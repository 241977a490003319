//! The local executor: a stage that is not cached runs here, under its key's lock, in this
//! process or its children; its outputs are checked and ingested for the committer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use autoscale_cache::{ActionKey, Manifest, PendingAction, StageTimings};
use serde_json::{Value, json};

use autoscale_errors::Hint;

use crate::devices::Device;
use crate::error::EngineError;
use crate::key::KeyRecord;
use crate::kind::{InputPath, StageContext, StageError};
use crate::pipeline::{InputRef, Pipeline};
use crate::run::{Engine, Failure, Msg, Slot};

impl Engine {
    pub(crate) fn input_paths(
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
    pub(crate) fn execute(
        &self,
        pipeline: &Pipeline,
        i: usize,
        record: KeyRecord,
        inputs: BTreeMap<String, InputPath>,
        devices: Option<Vec<Device>>,
        cancel: &AtomicBool,
        tx: &mpsc::Sender<Msg>,
    ) -> Result<(Manifest, PendingAction), Msg> {
        let stage = &pipeline.stages[i];
        let key = record.key();
        let fail = |e: &autoscale_cache::CacheError| Msg::Failed(i, Failure::of(e), None);
        let label = format!("{}/{}", pipeline.name, stage.id);
        let lock = match self.cache.try_lock(&key, &label).map_err(|e| fail(&e))? {
            Ok(lock) => lock,
            Err(holder) => {
                tracing::info!(stage = %stage.id, ?holder, "waiting for another process holding the key");
                let _ = tx.send(Msg::Waiting(i, holder));
                self.cache.lock(&key, &label).map_err(|e| fail(&e))?
            }
        };
        // A holder that died may have left its stage's group running (a process that escaped
        // the guard): it must not write while this attempt stages.
        if let Some(previous) = lock.previous() {
            crate::process::kill_stale_group(previous);
        }
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
                    format!("unknown kind `{}`", stage.kind).into(),
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
            on_group: &|pgid| {
                if let Err(e) = lock.record_group(crate::process::group_record(pgid)) {
                    tracing::warn!(stage = %stage.id, "cannot record the stage's process group: {e}");
                }
            },
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
                let _ = std::fs::remove_file(self.failed_log_path(&key));
                Ok((pending.manifest.clone(), pending))
            }
            Err(e) => {
                // An interrupted attempt did not fail; only a failure is remembered as one.
                let kept = match &e {
                    StageError::Cancelled => {
                        let _ = std::fs::remove_file(self.failed_log_path(&key));
                        None
                    }
                    StageError::Failed { .. } => self.keep_failed_log(&key, &log),
                };
                self.cache.abandon(lock);
                let mut message = e.to_string();
                let tail = log_tail(&log, 12);
                if !tail.is_empty() {
                    message.push_str("\n--- last lines of its log ---\n");
                    message.push_str(&tail);
                }
                let hint = e.hint();
                Err(Msg::Failed(i, Failure::new(message, hint), kept))
            }
        }
    }

    /// Failed results are never cached, but their logs are kept for the person debugging.
    pub(crate) fn keep_failed_log(&self, key: &ActionKey, log: &[u8]) -> Option<PathBuf> {
        let path = self.failed_log_path(key);
        std::fs::create_dir_all(path.parent()?).ok()?;
        std::fs::write(&path, log).ok()?;
        Some(path)
    }

    /// Where the log of a key's last failed attempt is kept; `status` says "failed last run"
    /// while it is there (a success or an interruption removes it).
    pub(crate) fn failed_log_path(&self, key: &ActionKey) -> PathBuf {
        self.cache
            .refs_dir()
            .join("failed")
            .join(format!("{}.log", key.to_hex()))
    }
}

/// The last `lines` lines of a log, as text.
pub fn log_tail(log: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
