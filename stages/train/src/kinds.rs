//! The `train` and `eval` stage kinds. They resolve a job from the stage's params and inputs and
//! run it in the trainer binary (`autoscale-train job JOB.json`), the one program that links
//! libtorch: `autoscale` itself never loads it. A CUDA context cannot be re-pinned inside a
//! process either, so each training gets a process of its own with `CUDA_VISIBLE_DEVICES` set to
//! the devices the engine assigned.
//!
//! The child writes one JSON message per line on its stdout (`{"progress": {...}}`, then
//! `{"done": {...}}` or `{"error": {"message": ..., "hint": ...}}`), which the kind turns into
//! progress events and the stage's result; its stderr is the stage's log. It runs in a process
//! group of its own, so cancelling the stage stops it (SIGTERM, then SIGKILL), and it asks the
//! kernel to kill it if `autoscale` dies.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use autoscale_engine::{
    DeviceClass, Implementation, InputPath, ParamSpec, ParamType, StageContext, StageError,
    StageKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::TrainError;
use crate::spec::{self, DeviceRequest, Job};
use autoscale_errors::Hint;

/// The trainer binary's subcommand that runs a job: `autoscale-train job JOB.json --identity ID`.
pub const CHILD_SUBCOMMAND: &str = "job";
/// Set for the child: the pid it must die with.
pub const PARENT_ENV: &str = "AUTOSCALE_TRAIN_PARENT";

/// How a kind runs its job: `worker job JOB.json --identity ID`, in its own process group,
/// pinned to the stage's devices. Without a worker the kinds still check params and plan (so
/// `status`, `dag` and remote hits work on a machine with no trainer); running one fails with
/// the build command as the hint.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub worker: Option<PathBuf>,
}

/// One line of the child's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildMessage {
    Progress(Value),
    Done(Value),
    Error {
        message: String,
        hint: Option<String>,
    },
}

impl ChildMessage {
    pub fn failure(e: &TrainError) -> Self {
        ChildMessage::Error {
            message: e.message(),
            hint: e.hint(),
        }
    }
}

/// How long a stopped training gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

// Shared by `train` and `eval`.
const THREADS: ParamSpec = ParamSpec::optional(
    "threads",
    ParamType::Int,
    "CPU threads [default: every core]",
);
const VAL_FRACTION: ParamSpec = ParamSpec::optional(
    "val_fraction",
    ParamType::Float,
    "JSONL data: held-out share of each domain's bytes [default: 0.1]",
);
const VAL_DOCS: ParamSpec = ParamSpec::optional(
    "val_docs",
    ParamType::Int,
    "JSONL data: at most this many held-out documents [default: 50]",
);

const TRAIN_PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "model",
        ParamType::String,
        "gpt2-tiny (default), gpt2, gpt2-medium, gpt2-large, bert-tiny or bert-base",
    ),
    ParamSpec::optional(
        "model_overrides",
        ParamType::Map,
        "shape overrides of the preset: n_layer, n_embd, n_head, n_positions",
    ),
    ParamSpec::optional(
        "tokens",
        ParamType::Map,
        "training tokens per domain for one pass (wins over `weights`)",
    ),
    ParamSpec::optional(
        "weights",
        ParamType::Map,
        "mixture weights per domain, with `total_tokens` (or a `weights` input)",
    ),
    ParamSpec::optional(
        "total_tokens",
        ParamType::Float,
        "training tokens of one pass, split by `weights`",
    ),
    ParamSpec::optional(
        "epochs",
        ParamType::Int,
        "passes over the drawn selection; every pass counts as budget [default: 1]",
    ),
    ParamSpec::optional(
        "seq_len",
        ParamType::Int,
        "tokens per sequence [default: the preset's context]",
    ),
    ParamSpec::optional(
        "batch_size",
        ParamType::Int,
        "sequences per micro-batch [default: 8]",
    ),
    ParamSpec::optional(
        "grad_accum",
        ParamType::Int,
        "micro-batches per optimizer step [default: 1]",
    ),
    ParamSpec::optional(
        "replicas",
        ParamType::Int,
        "data-parallel model replicas in the one process, each taking its share of every micro-batch (`batch_size` is the global micro-batch); gradients are summed every step, so the training is that of one replica up to float rounding; on CUDA they go round-robin over the stage's devices [default: one per device; 1 on the CPU]",
    ),
    ParamSpec::optional(
        "lr",
        ParamType::Float,
        "peak learning rate (AdamW) [default: 2e-4]",
    ),
    ParamSpec::optional(
        "min_lr",
        ParamType::Float,
        "learning rate at the end of decay [default: 0]",
    ),
    ParamSpec::optional(
        "warmup",
        ParamType::Float,
        "fraction of steps warming up [default: 0.1]",
    ),
    ParamSpec::optional(
        "schedule",
        ParamType::String,
        "linear (default) or cosine decay",
    ),
    ParamSpec::optional(
        "weight_decay",
        ParamType::Float,
        "AdamW weight decay [default: 0.01]",
    ),
    ParamSpec::optional(
        "grad_clip",
        ParamType::Float,
        "max gradient norm, 0 for none [default: 1.0]",
    ),
    ParamSpec::optional(
        "dropout",
        ParamType::Float,
        "dropout probability [default: 0]",
    ),
    ParamSpec::optional(
        "seed",
        ParamType::Int,
        "seeds the init, the data draw and BERT's masks [default: 0]",
    ),
    ParamSpec::optional(
        "data_seed",
        ParamType::Int,
        "seeds the data draw alone, so runs can share an init and differ in data [default: seed]",
    ),
    ParamSpec::optional(
        "eval_domains",
        ParamType::List,
        "domains to validate on [default: every domain of the data]",
    ),
    ParamSpec::optional(
        "eval_tokens",
        ParamType::Int,
        "held-out tokens per domain at the end [default: 16384]",
    ),
    ParamSpec::optional(
        "curve_tokens",
        ParamType::Int,
        "held-out tokens per domain per curve point [default: 2048]",
    ),
    ParamSpec::optional(
        "eval_every",
        ParamType::Int,
        "steps between curve points, 0 for none [default: a tenth of the run]",
    ),
    ParamSpec::optional(
        "checkpoint_every",
        ParamType::Int,
        "steps between checkpoints [default: a twentieth of the run]",
    ),
    ParamSpec::optional(
        "checkpoint_minutes",
        ParamType::Float,
        "also checkpoint after this long [default: 30]",
    ),
    ParamSpec::optional(
        "log_every",
        ParamType::Int,
        "steps between progress events [default: a hundredth of the run]",
    ),
    THREADS,
    VAL_FRACTION,
    VAL_DOCS,
    ParamSpec::optional(
        "run",
        ParamType::Any,
        "informational (DDO fan-out): the run's id",
    ),
    ParamSpec::optional(
        "perturbed",
        ParamType::Any,
        "informational (DDO fan-out): the perturbed domain",
    ),
    ParamSpec::optional(
        "multiplier",
        ParamType::Any,
        "informational (DDO fan-out): its multiplier",
    ),
];

const EVAL_PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "domains",
        ParamType::List,
        "domains to evaluate [default: every domain of the data]",
    ),
    ParamSpec::optional(
        "eval_tokens",
        ParamType::Int,
        "held-out tokens per domain [default: 16384]",
    ),
    ParamSpec::optional(
        "batch_size",
        ParamType::Int,
        "sequences per batch [default: 8]",
    ),
    ParamSpec::optional(
        "seq_len",
        ParamType::Int,
        "tokens per sequence [default: the training's]",
    ),
    THREADS,
    VAL_FRACTION,
    VAL_DOCS,
];

/// `train`: trains a GPT-2 or BERT preset on a domain mixture and validates it per domain.
pub struct TrainKind {
    launcher: Launcher,
}

impl TrainKind {
    pub fn new(launcher: Launcher) -> Self {
        Self { launcher }
    }
}

/// `eval`: scores a trained model on any domains' held-out sets.
pub struct EvalKind {
    launcher: Launcher,
}

impl EvalKind {
    pub fn new(launcher: Launcher) -> Self {
        Self { launcher }
    }
}

fn device(ctx: &StageContext<'_>) -> DeviceRequest {
    match &ctx.devices {
        Some(d) if !d.is_empty() => DeviceRequest::Cuda,
        _ => DeviceRequest::Cpu,
    }
}

fn one_input(
    ctx: &StageContext<'_>,
    name: &'static str,
    what: &str,
) -> Result<PathBuf, TrainError> {
    match ctx.inputs.get(name) {
        Some(InputPath::One(p)) => Ok(p.clone()),
        Some(InputPath::Many(_)) => Err(TrainError::Input {
            input: name,
            message: "is a fanned-out stage; it must be one path".into(),
            hint: Some(format!("reference one member: `{name}: stage[child]`")),
        }),
        None => Err(TrainError::Input {
            input: name,
            message: "is missing".into(),
            hint: Some(format!("add `inputs: {{{name}: ...}}`: {what}")),
        }),
    }
}

/// A weights input: a stage directory holding `weights.json`, or the file itself.
fn weights_input(ctx: &StageContext<'_>) -> Result<Option<PathBuf>, TrainError> {
    if !ctx.inputs.contains_key("weights") {
        return Ok(None);
    }
    let path = one_input(ctx, "weights", "a weights.json")?;
    Ok(Some(if path.is_dir() {
        path.join("weights.json")
    } else {
        path
    }))
}

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    fn implementation(&self) -> Implementation {
        crate::train_implementation()
    }

    fn device_identity(&self, class: DeviceClass) -> Option<&'static str> {
        Some(crate::device_identity(class))
    }

    fn summary(&self) -> &'static str {
        "trains GPT-2/BERT (libtorch) on a domain mixture; writes eval.json and a Hugging Face model/ (inputs: data, optional weights)"
    }

    fn params(&self) -> &[ParamSpec] {
        TRAIN_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        // The mixture may come from a `weights` input, which is not known here.
        let mut p = params.clone();
        if spec::mixture(params, None).ok().flatten().is_none() && !p.contains_key("weights") {
            p.insert("tokens".into(), serde_json::json!({"_": 1}));
        }
        if p.contains_key("weights") && !p.contains_key("total_tokens") {
            p.insert("total_tokens".into(), serde_json::json!(1));
        }
        spec::train_spec(
            &p,
            PathBuf::new(),
            None,
            PathBuf::new(),
            PathBuf::new(),
            DeviceRequest::Cpu,
        )
        .map(|_| ())
        .map_err(|e| match e.hint() {
            Some(h) => format!("{e} ({h})"),
            None => e.to_string(),
        })
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let data = one_input(ctx, "data", "token shards or a JSONL corpus directory")?;
        let weights = weights_input(ctx)?;
        let spec = spec::train_spec(
            ctx.params,
            data,
            weights.as_deref(),
            ctx.out_dir.clone(),
            ctx.scratch_dir.clone(),
            device(ctx),
        )?;
        launch(&self.launcher, &Job::Train(Box::new(spec)), ctx)
    }
}

impl StageKind for EvalKind {
    fn name(&self) -> &'static str {
        "eval"
    }

    fn implementation(&self) -> Implementation {
        crate::eval_implementation()
    }

    fn device_identity(&self, class: DeviceClass) -> Option<&'static str> {
        Some(crate::device_identity(class))
    }

    fn summary(&self) -> &'static str {
        "scores a trained model (input `model`: a train stage) on held-out domains (input `data`); writes eval.json"
    }

    fn params(&self) -> &[ParamSpec] {
        EVAL_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        spec::eval_spec(
            params,
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            DeviceRequest::Cpu,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let data = one_input(ctx, "data", "token shards or a JSONL corpus directory")?;
        let model = one_input(ctx, "model", "a train stage (its model/ directory)")?;
        let model_dir = if model.join("model").join("autoscale.json").is_file() {
            model.join("model")
        } else {
            model
        };
        let spec = spec::eval_spec(
            ctx.params,
            data,
            model_dir,
            ctx.out_dir.clone(),
            device(ctx),
        )?;
        launch(&self.launcher, &Job::Eval(Box::new(spec)), ctx)
    }
}

fn launch(launcher: &Launcher, job: &Job, ctx: &StageContext<'_>) -> Result<Value, StageError> {
    std::fs::create_dir_all(&ctx.out_dir)
        .map_err(|e| TrainError::io("create the output directory", &ctx.out_dir, e))?;
    std::fs::create_dir_all(&ctx.scratch_dir)
        .map_err(|e| TrainError::io("create the scratch directory", &ctx.scratch_dir, e))?;
    match &launcher.worker {
        // Checked here: behind `setpriv`, a missing program is only an exit status 127.
        Some(exe) if !exe.is_file() => Err(TrainError::Child {
            message: format!("cannot start the trainer `{}`: no such file", exe.display()),
            hint: Some(format!(
                "set ${} to the `{}` binary, or {}",
                crate::TRAINER_ENV,
                crate::TRAINER_BINARY,
                crate::BUILD_HINT
            )),
        }
        .into()),
        Some(exe) => Ok(run_child(exe, job, ctx)?),
        None => Err(TrainError::Child {
            message: format!(
                "no trainer binary: `{}` is not next to autoscale and ${} is not set",
                crate::TRAINER_BINARY,
                crate::TRAINER_ENV
            ),
            hint: Some(crate::BUILD_HINT.into()),
        }
        .into()),
    }
}

enum Line {
    Message(ChildMessage),
    Text(String),
}

fn run_child(exe: &Path, job: &Job, ctx: &StageContext<'_>) -> Result<Value, TrainError> {
    let job_path = ctx.scratch_dir.join("job.json");
    let text = serde_json::to_string_pretty(job).unwrap_or_default();
    std::fs::write(&job_path, text).map_err(|e| TrainError::io("write the job", &job_path, e))?;
    let log = std::fs::File::create(&ctx.log_path)
        .map_err(|e| TrainError::io("create the log", &ctx.log_path, e))?;
    let mut log_extra = log
        .try_clone()
        .map_err(|e| TrainError::io("open the log", &ctx.log_path, e))?;
    let devices = ctx
        .devices
        .as_ref()
        .map(|d| autoscale_engine::Device::visible(d))
        .unwrap_or_default();
    let mut command = autoscale_engine::process::group_command(exe);
    command
        .arg(CHILD_SUBCOMMAND)
        .arg(&job_path)
        .arg("--identity")
        .arg(crate::TRAINER_IDENTITY)
        .current_dir(&ctx.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .env("CUDA_VISIBLE_DEVICES", &devices)
        .env(PARENT_ENV, std::process::id().to_string());
    for (k, v) in ctx.env {
        command.env(k, v);
    }
    // A group of its own, so stopping the stage stops everything it started. The parent-death
    // signal reaches the trainer only; the watcher takes its whole group (data workers
    // included) down with the engine. Unwatched once the group is reaped.
    let (mut child, pgid, _watched) = autoscale_engine::process::spawn_watched(&mut command)
        .map_err(|e| TrainError::Child {
            message: format!("cannot start `{}`: {e}", exe.display()),
            // `Other` is the watcher being gone, said in the message; else the binary is at fault.
            hint: (e.kind() != std::io::ErrorKind::Other).then(|| {
                format!(
                    "the train kind runs the trainer binary; set ${} to it, or {}",
                    crate::TRAINER_ENV,
                    crate::BUILD_HINT
                )
            }),
        })?;
    ctx.started_group(pgid);
    let Some(stdout) = child.stdout.take() else {
        autoscale_engine::process::stop_group(pgid, &mut child, std::time::Duration::ZERO);
        return Err(TrainError::Child {
            message: "no pipe to the training process".into(),
            hint: None,
        });
    };
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let parsed = match serde_json::from_str::<ChildMessage>(&line) {
                Ok(m) => Line::Message(m),
                Err(_) => Line::Text(line),
            };
            if tx.send(parsed).is_err() {
                break;
            }
        }
    });
    let mut done = None;
    let mut failure = None;
    let mut handle = |line: Line| match line {
        Line::Message(ChildMessage::Progress(v)) => (ctx.progress)(v),
        Line::Message(ChildMessage::Done(v)) => done = Some(v),
        Line::Message(ChildMessage::Error { message, hint }) => failure = Some((message, hint)),
        Line::Text(text) => {
            let _ = writeln!(log_extra, "{text}");
        }
    };
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => handle(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed: the child is exiting.
                match child.wait() {
                    Ok(status) => break status,
                    Err(e) => {
                        return Err(TrainError::Child {
                            message: format!("lost track of the training process: {e}"),
                            hint: None,
                        });
                    }
                }
            }
        }
        if ctx.cancelled() {
            autoscale_engine::process::stop_group(pgid, &mut child, GRACE);
            return Err(TrainError::Cancelled);
        }
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
    };
    // Nothing the trainer started may write after its outputs are hashed.
    if let Err(e) =
        autoscale_engine::process::reap_group(pgid, autoscale_engine::process::GROUP_DEADLINE)
    {
        return Err(TrainError::Child {
            message: e,
            hint: Some("the outputs were not stored".into()),
        });
    }
    let _ = reader.join();
    while let Ok(line) = rx.try_recv() {
        handle(line);
    }
    if let Some((message, hint)) = failure {
        return Err(TrainError::Child { message, hint });
    }
    match (status.success(), done) {
        (true, Some(result)) => Ok(result),
        (true, None) => Err(TrainError::Child {
            message: "it exited without a result".into(),
            hint: Some("its log is kept; see below".into()),
        }),
        (false, _) => {
            use std::os::unix::process::ExitStatusExt;
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(signal)) => format!("signal {signal}"),
                _ => "an unknown status".to_string(),
            };
            Err(TrainError::Child {
                message: format!("it died with {how}"),
                hint: Some("its log is kept; a rerun resumes from the last checkpoint".into()),
            })
        }
    }
}

/// For the child: dies with its parent, so a killed `autoscale` leaves no training behind.
pub fn die_with_parent() {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // The parent may have died before the call above.
    if let Some(expected) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    {
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        if parent != expected {
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_accepts_a_mixture_from_an_input_and_refuses_bad_params() {
        let kind = TrainKind::new(Launcher { worker: None });
        let p = |v: Value| v.as_object().cloned().unwrap();
        assert!(kind.check(&p(json!({}))).is_ok());
        assert!(kind.check(&p(json!({"weights": {"a": 1}}))).is_ok());
        let err = kind.check(&p(json!({"model": "gpt5"}))).unwrap_err();
        assert!(err.contains("gpt2-large"), "{err}");
        let err = kind.check(&p(json!({"schedule": "exp"}))).unwrap_err();
        assert!(err.contains("schedule"), "{err}");
        assert!(
            EvalKind::new(Launcher { worker: None })
                .check(&p(json!({"eval_tokens": 0})))
                .is_err()
        );
    }

    #[test]
    fn child_messages_are_one_json_object_per_line() {
        let m = ChildMessage::Progress(json!({"step": 3}));
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"progress":{"step":3}}"#
        );
        let e: ChildMessage =
            serde_json::from_str(r#"{"error": {"message": "m", "hint": null}}"#).unwrap();
        assert_eq!(
            e,
            ChildMessage::Error {
                message: "m".into(),
                hint: None
            }
        );
        assert!(serde_json::from_str::<ChildMessage>("step 3 loss 2.1").is_err());
    }
}
