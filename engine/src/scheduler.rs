//! One scheduling pass: what is ready (its inputs done and its key resolved), what fits the free
//! CPU slots, GPUs and memory, and what happens when a stage ends (retries, skips, commits).
//! Where a launched stage runs is the local path ([`crate::local`]) or an [`Executor`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::Scope;
use std::time::Duration;

use autoscale_cache::PendingAction;

use crate::devices::Device;
use crate::error::EngineError;
use crate::executor::Executor;
use crate::graph::topological_order;
use crate::pipeline::Pipeline;
use crate::run::{Engine, Event, Failure, Msg, Outcome, Report, RunOptions, Slot, committer};

/// What a pass leaves: each stage's result (if it has one), and whether the run must stop.
pub(crate) struct Pass {
    pub(crate) done: Vec<Option<autoscale_cache::Manifest>>,
    pub(crate) stopped: bool,
}

/// What a running stage holds: CPU slots, devices, megabytes of memory.
type Held = (usize, Vec<Device>, u64);

struct Scheduler<'a, 'r> {
    engine: &'a Engine,
    pipeline: &'a Pipeline,
    options: &'a RunOptions,
    executor: Option<&'a dyn Executor>,
    /// Whether this machine has GPUs to hand out (none when an executor places stages).
    devices_known: bool,
    jobs: usize,
    total_memory_mb: u64,
    report: &'a mut Report<'r>,

    dependents: Vec<Vec<usize>>,
    waiting_on: Vec<usize>,
    slots: Vec<Slot>,
    attempts: Vec<u32>,
    /// Stages whose inputs are all done, to key and look up.
    resolve: VecDeque<usize>,
    /// Keyed, not cached: waiting for resources.
    ready: VecDeque<usize>,

    free_cpus: usize,
    free_gpus: Vec<Device>,
    free_memory: u64,
    held: HashMap<usize, Held>,
    uncommitted: usize,
    stop_launching: bool,
}

impl Engine {
    /// Runs what can run until nothing more can start. Fan-out placeholders, and what reads
    /// them, wait for the next pass.
    pub(crate) fn run_pass(
        &self,
        pipeline: &Pipeline,
        options: &RunOptions,
        devices: &[Device],
        total_memory_mb: u64,
        report: &mut Report<'_>,
    ) -> Result<Pass, EngineError> {
        let mut s = Scheduler::new(self, pipeline, options, devices, total_memory_mb, report);
        let (tx, rx) = mpsc::channel::<Msg>();
        let (commit_tx, commit_rx) = mpsc::channel::<(usize, PendingAction)>();
        std::thread::scope(|scope| -> Result<(), EngineError> {
            let cache = &self.cache;
            let committer_tx = tx.clone();
            scope.spawn(move || committer(cache, commit_rx, committer_tx));
            let result = s.drive(scope, &tx, &rx, commit_tx);
            // Giving up with an error: cancel the stages still running (the scope would
            // otherwise wait for each of them to finish).
            if result.is_err() {
                options.cancel.store(true, Ordering::Relaxed);
            }
            result
        })?;
        Ok(s.into_pass())
    }
}

impl<'a, 'r> Scheduler<'a, 'r> {
    fn new(
        engine: &'a Engine,
        pipeline: &'a Pipeline,
        options: &'a RunOptions,
        devices: &[Device],
        total_memory_mb: u64,
        report: &'a mut Report<'r>,
    ) -> Self {
        let n = pipeline.stages.len();
        let executor = options.executor.as_deref();
        // With an executor, a "CPU slot" is a stage in flight.
        let jobs = executor.map_or(options.jobs, |e| e.max_in_flight()).max(1);
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut waiting_on: Vec<usize> = vec![0; n];
        for (i, waiting) in waiting_on.iter_mut().enumerate() {
            let deps = pipeline.dependencies(i);
            *waiting = deps.len();
            for d in deps {
                dependents[d].push(i);
            }
        }
        let resolve = topological_order(pipeline)
            .into_iter()
            .filter(|&i| waiting_on[i] == 0)
            .collect();
        Self {
            engine,
            pipeline,
            options,
            executor,
            devices_known: !devices.is_empty(),
            jobs,
            total_memory_mb,
            report,
            dependents,
            waiting_on,
            slots: vec![Slot::Blocked; n],
            attempts: vec![0; n],
            resolve,
            ready: VecDeque::new(),
            free_cpus: jobs,
            free_gpus: devices.to_vec(),
            free_memory: total_memory_mb,
            held: HashMap::new(),
            uncommitted: 0,
            stop_launching: false,
        }
    }

    /// The loop: resolve, launch, wait for a message, until nothing runs or can start. The
    /// committer's sender is dropped on return, so the committer ends once it has flushed.
    fn drive<'s>(
        &mut self,
        scope: &'s Scope<'s, '_>,
        tx: &mpsc::Sender<Msg>,
        rx: &mpsc::Receiver<Msg>,
        commit_tx: mpsc::Sender<(usize, PendingAction)>,
    ) -> Result<(), EngineError>
    where
        'a: 's,
    {
        loop {
            self.resolve_keys()?;
            if self.options.cancel.load(Ordering::Relaxed) {
                self.stop_launching = true;
                self.report.summary.interrupted = true;
            }
            if !self.stop_launching {
                self.launch(scope, tx, &commit_tx)?;
            }
            if self.held.is_empty()
                && self.uncommitted == 0
                && self.resolve.is_empty()
                && (self.ready.is_empty() || self.stop_launching)
            {
                return Ok(());
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(msg) => self.on_message(msg)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Keys the stages whose inputs are all known; cached ones finish at once, the others
    /// become ready.
    fn resolve_keys(&mut self) -> Result<(), EngineError> {
        while let Some(i) = self.resolve.pop_front() {
            if !matches!(self.slots[i], Slot::Blocked)
                || self.pipeline.stages[i].fanout_from.is_some()
            {
                continue;
            }
            let slots = &self.slots;
            let record = match self.engine.record(self.pipeline, i, &|j| match &slots[j] {
                Slot::Done(m) => Some(m),
                _ => None,
            }) {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => continue,
                Err(e) => {
                    self.fail(i, Outcome::Failed, Failure::of(&e), None);
                    continue;
                }
            };
            let key = record.key();
            match self.engine.cache.lookup(&key)? {
                Some(m) => self.done(i, Outcome::Cached, m),
                None => {
                    self.slots[i] = Slot::Ready(record);
                    self.ready.push_back(i);
                }
            }
        }
        Ok(())
    }

    /// Starts every ready stage whose resources are free, in a thread of `scope`; the others
    /// stay ready.
    fn launch<'s>(
        &mut self,
        scope: &'s Scope<'s, '_>,
        tx: &mpsc::Sender<Msg>,
        commit_tx: &mpsc::Sender<(usize, PendingAction)>,
    ) -> Result<(), EngineError>
    where
        'a: 's,
    {
        let mut deferred = VecDeque::new();
        while let Some(i) = self.ready.pop_front() {
            let stage = &self.pipeline.stages[i];
            let res = &stage.resources;
            let cpus = if self.executor.is_some() {
                1
            } else {
                (res.cpus as usize).min(self.jobs)
            };
            let gpus = if self.devices_known {
                res.gpus as usize
            } else {
                0
            };
            let memory = res.memory_mb.unwrap_or(0).min(self.total_memory_mb);
            if cpus > self.free_cpus || gpus > self.free_gpus.len() || memory > self.free_memory {
                deferred.push_back(i);
                continue;
            }
            let Slot::Ready(record) = std::mem::replace(&mut self.slots[i], Slot::Running) else {
                continue;
            };
            self.free_cpus -= cpus;
            self.free_memory -= memory;
            let granted: Vec<Device> = self.free_gpus.drain(..gpus).collect();
            self.held.insert(i, (cpus, granted.clone(), memory));
            self.attempts[i] += 1;
            let attempt = self.attempts[i];
            let device_list = (res.gpus > 0 && self.devices_known).then_some(granted);
            if res.gpus > 0 && !self.devices_known && self.executor.is_none() {
                (self.report.on_event)(Event::Warning {
                    stage: Some(stage.id.clone()),
                    message: format!("no GPU available: running `{}` on the CPU", stage.id),
                });
            }
            (self.report.on_event)(Event::Started {
                stage: stage.id.clone(),
                kind: stage.kind.clone(),
                attempt,
                devices: device_list.clone(),
            });
            let (engine, pipeline) = (self.engine, self.pipeline);
            let cancel = &self.options.cancel;
            let tx = tx.clone();
            if let Some(executor) = self.executor {
                scope.spawn(move || {
                    let msg = engine
                        .execute_elsewhere(executor, pipeline, i, &record, attempt, cancel, &tx);
                    let _ = tx.send(msg);
                });
                continue;
            }
            let commit_tx = commit_tx.clone();
            let inputs = engine.input_paths(pipeline, i, &self.slots)?;
            scope.spawn(move || {
                match engine.execute(pipeline, i, record, inputs, device_list, cancel, &tx) {
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
        self.ready = deferred;
        Ok(())
    }

    fn on_message(&mut self, msg: Msg) -> Result<(), EngineError> {
        let stage_id = |i: usize| self.pipeline.stages[i].id.clone();
        match msg {
            Msg::Waiting(i, holder) => (self.report.on_event)(Event::Waiting {
                stage: stage_id(i),
                holder,
            }),
            Msg::Progress(i, data) => (self.report.on_event)(Event::Progress {
                stage: stage_id(i),
                data,
            }),
            // Reported as executed now; the run returns only once it is durable.
            Msg::Ran(i, manifest) => {
                self.release(i);
                self.uncommitted += 1;
                self.done(i, Outcome::Executed, manifest);
            }
            // The executor's run committed it.
            Msg::RanElsewhere(i, manifest) => {
                self.release(i);
                self.done(i, Outcome::Executed, manifest);
            }
            // Another process committed it while this one waited for the lock.
            Msg::FoundCached(i, manifest) => {
                self.release(i);
                self.done(i, Outcome::Cached, manifest);
            }
            Msg::Committed(list) => self.uncommitted -= list.len(),
            Msg::CommitFailed(message) => return Err(EngineError::Commit { message }),
            Msg::Failed(i, error, log) => {
                self.release(i);
                if !self.retry(i, &error) {
                    // A stage stopped by Ctrl-C did not fail.
                    let outcome = if self.options.cancel.load(Ordering::Relaxed) {
                        Outcome::Interrupted
                    } else {
                        Outcome::Failed
                    };
                    self.fail(i, outcome, error, log);
                }
            }
        }
        Ok(())
    }

    /// Makes a failed stage ready again, if it has retries left and the run goes on.
    fn retry(&mut self, i: usize, error: &Failure) -> bool {
        let stage = &self.pipeline.stages[i];
        if self.options.cancel.load(Ordering::Relaxed)
            || self.attempts[i] > stage.retries
            || !error.retryable
        {
            return false;
        }
        (self.report.on_event)(Event::Warning {
            stage: Some(stage.id.clone()),
            message: format!(
                "attempt {} failed ({}); retrying",
                self.attempts[i], error.message
            ),
        });
        let slots = &self.slots;
        let Ok(Ok(record)) = self.engine.record(self.pipeline, i, &|j| match &slots[j] {
            Slot::Done(m) => Some(m),
            _ => None,
        }) else {
            return false;
        };
        self.slots[i] = Slot::Ready(record);
        self.ready.push_back(i);
        true
    }

    /// A stage with a result: report it and unblock what reads it.
    fn done(&mut self, i: usize, outcome: Outcome, manifest: autoscale_cache::Manifest) {
        let duration_ms = match outcome {
            Outcome::Executed => manifest.timings.duration_ms,
            _ => 0,
        };
        self.report.finish(
            &self.pipeline.stages[i].id,
            outcome,
            Some(manifest.key),
            duration_ms,
            None,
            None,
        );
        self.slots[i] = Slot::Done(manifest);
        for &d in &self.dependents[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 {
                self.resolve.push_back(d);
            }
        }
    }

    /// A stage that failed (or was interrupted): report it, skip what depends on it, and stop
    /// launching unless `--keep-going`.
    fn fail(
        &mut self,
        i: usize,
        outcome: Outcome,
        error: Failure,
        log: Option<std::path::PathBuf>,
    ) {
        self.slots[i] = Slot::Failed;
        let id = &self.pipeline.stages[i].id;
        self.report.finish(id, outcome, None, 0, Some(error), log);
        let mut stack = self.dependents[i].clone();
        while let Some(d) = stack.pop() {
            if matches!(self.slots[d], Slot::Blocked | Slot::Ready(_)) {
                self.slots[d] = Slot::Skipped;
                self.report.finish(
                    &self.pipeline.stages[d].id,
                    Outcome::Skipped,
                    None,
                    0,
                    Some(format!("`{id}` failed").into()),
                    None,
                );
                stack.extend(self.dependents[d].iter().copied());
            }
        }
        if !self.options.keep_going {
            self.stop_launching = true;
        }
    }

    /// Gives back what a stage that ended held.
    fn release(&mut self, i: usize) {
        if let Some((cpus, gpus, memory)) = self.held.remove(&i) {
            self.free_cpus += cpus;
            self.free_gpus.extend(gpus);
            self.free_gpus.sort_unstable();
            self.free_memory += memory;
        }
    }

    fn into_pass(self) -> Pass {
        let failed = self.slots.iter().any(|s| matches!(s, Slot::Failed));
        Pass {
            done: self
                .slots
                .into_iter()
                .map(|s| if let Slot::Done(m) = s { Some(m) } else { None })
                .collect(),
            stopped: self.report.summary.interrupted || (failed && !self.options.keep_going),
        }
    }
}
