//! Where a stage whose result is not cached runs.
//!
//! By default the engine runs it itself ([`crate::Engine`]'s local path: lock the key, run the
//! kind in this process or its children, ingest, commit). An [`Executor`] runs it elsewhere
//! instead, for example as a Slurm job: something that runs the same stage under the same key,
//! with the same environment contract, against a cache this engine can read (the same
//! directory, or the team's remote). The engine then takes the result from the cache, never from
//! the executor's word: a job that reports success but left no result under the key fails.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use autoscale_cache::ActionKey;
use serde_json::Value;

use crate::key::KeyRecord;
use crate::pipeline::{Pipeline, Resources, SlurmSettings};
use crate::run::{Engine, Failure, Msg};

/// One stage to run elsewhere.
#[derive(Debug)]
pub struct Submission<'a> {
    /// The pipeline's name.
    pub pipeline: &'a str,
    /// The stage id (a fanned-out child's full id, `train[base]`).
    pub stage: &'a str,
    /// The key the result must be cached under.
    pub key: ActionKey,
    pub resources: &'a Resources,
    /// The stage's own `slurm:` settings, if it has any.
    pub slurm: Option<&'a SlurmSettings>,
    /// 1 for the first try; retries count up.
    pub attempt: u32,
}

/// Why a stage run elsewhere did not succeed.
#[derive(Debug, Clone)]
pub struct ExecutorFailure {
    pub message: String,
    pub hint: Option<String>,
    /// The last lines of the job's log, shown under the message.
    pub log_tail: String,
    /// Whether another attempt could end otherwise (the stage's `retries` allowing): not for
    /// a job that ran out of its time or memory, which would again.
    pub retryable: bool,
}

impl ExecutorFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            log_tail: String::new(),
            retryable: true,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Runs stages away from this process. Implementations block in [`Executor::run`] until the
/// stage has ended, and return early (cancelling what they started) once `cancel` is set.
pub trait Executor: Send + Sync {
    /// A short name for messages (`slurm`).
    fn name(&self) -> &str;

    /// Runs the stage and waits for it to end. `progress` reports what the user should see
    /// while it waits (a job id, a queue state), as a JSON object.
    fn run(
        &self,
        job: &Submission<'_>,
        cancel: &AtomicBool,
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), ExecutorFailure>;

    /// How long a result may take to become visible in the cache after the executor reported
    /// success (a shared filesystem's attribute cache, an upload to the remote).
    fn result_grace(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// How many stages may be in flight at once.
    fn max_in_flight(&self) -> usize {
        100
    }
}

impl Engine {
    /// Runs one stage through `executor` and reads its result back from the cache, where the
    /// executor's run of the same key must have committed it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn execute_elsewhere(
        &self,
        executor: &dyn Executor,
        pipeline: &Pipeline,
        i: usize,
        record: &KeyRecord,
        attempt: u32,
        cancel: &AtomicBool,
        tx: &mpsc::Sender<Msg>,
    ) -> Msg {
        let stage = &pipeline.stages[i];
        let key = record.key();
        let job = Submission {
            pipeline: &pipeline.name,
            stage: &stage.id,
            key,
            resources: &stage.resources,
            slurm: stage.slurm.as_ref(),
            attempt,
        };
        let progress = |data: Value| {
            let _ = tx.send(Msg::Progress(i, data));
        };
        if let Err(failure) = executor.run(&job, cancel, &progress) {
            let mut message = failure.message;
            if !failure.log_tail.is_empty() {
                message.push_str("\n--- last lines of its log ---\n");
                message.push_str(&failure.log_tail);
            }
            let error = Failure {
                message,
                hint: failure.hint,
                retryable: failure.retryable,
            };
            return Msg::Failed(i, error, None);
        }
        // The cache is the truth: a shared filesystem may show the result late.
        // Asked again at 0.25 s, 0.5 s, 1 s, then every 2 s: each ask may be a remote request.
        let deadline = Instant::now() + executor.result_grace();
        let mut wait = Duration::from_millis(250);
        loop {
            match self.cache.lookup_again(&key) {
                Ok(Some(manifest)) => return Msg::RanElsewhere(i, manifest),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Ok(None) => {
                    return Msg::Failed(
                        i,
                        Failure::new(
                            format!(
                                "the {} job of `{}` ended, but no result is cached under its key {}",
                                executor.name(),
                                stage.id,
                                key.short()
                            ),
                            Some(
                                "the job computed another key or wrote to another cache: it must run the same autoscale build against this cache (or the same remote); `autoscale explain` on the node shows its key".into(),
                            ),
                        ),
                        None,
                    );
                }
                Err(e) => {
                    return Msg::Failed(i, Failure::of(&e), None);
                }
            }
        }
    }
}
