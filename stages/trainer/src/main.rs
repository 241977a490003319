//! `autoscale-train`: the worker the `train` and `eval` kinds start, one process per job, and the
//! only binary that loads libtorch.
//!
//! - `autoscale-train job JOB.json --identity ID` runs one job, writing one JSON message per line
//!   on stdout (progress, then the result or the error) and its log on stderr. It refuses a job
//!   from an `autoscale` that expects another trainer identity.
//! - `autoscale-train doctor` says what libtorch it runs on, as JSON (`autoscale doctor` asks it).
//! - `autoscale-train identity` prints its identity.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use autoscale_errors::Hint;
use autoscale_train::{ChildMessage, Job, JobHooks, TrainError};
use clap::{Parser, Subcommand};

/// The trainer of autoscale's `train` and `eval` stages (libtorch).
#[derive(Debug, Parser)]
#[command(name = "autoscale-train", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one training or evaluation job (the `train` and `eval` kinds start this).
    Job {
        /// The job file the kind wrote.
        job: PathBuf,
        /// The trainer identity the calling `autoscale` keys the stage on.
        #[arg(long)]
        identity: Option<String>,
    },
    /// The torch version, the CUDA devices seen, where libtorch was found, as JSON
    /// (`autoscale doctor` renders it).
    Doctor,
    /// Print this trainer's identity (its code digest and the libtorch it links).
    Identity,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Job { job, identity } => run(&job, identity.as_deref()),
        Command::Doctor => {
            doctor();
            ExitCode::SUCCESS
        }
        Command::Identity => {
            println!("{}", autoscale_trainer::identity());
            ExitCode::SUCCESS
        }
    }
}

fn say(m: &ChildMessage) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is gone; the death signal ends this process.
    let _ = writeln!(out, "{}", serde_json::to_string(m).unwrap_or_default());
    let _ = out.flush();
}

fn run(job: &std::path::Path, expected: Option<&str>) -> ExitCode {
    autoscale_train::die_with_parent();
    let mine = autoscale_trainer::identity();
    let result = match expected {
        Some(expected) if expected != mine => Err(TrainError::Child {
            message: format!(
                "this trainer is `{mine}` but autoscale keys the stage on `{expected}`: \
                 the two binaries were built from different code or against another libtorch"
            ),
            hint: Some(autoscale_train::BUILD_HINT.into()),
        }),
        _ => Job::read(job).and_then(|job| {
            let cancel = AtomicBool::new(false);
            let progress = |v: serde_json::Value| say(&ChildMessage::Progress(v));
            let log = |line: &str| eprintln!("{line}");
            autoscale_trainer::run_job(
                &job,
                &JobHooks {
                    progress: &progress,
                    log: &log,
                    cancel: &cancel,
                },
            )
        }),
    };
    match result {
        Ok(value) => {
            say(&ChildMessage::Done(value));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.message());
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            say(&ChildMessage::failure(&e));
            ExitCode::from(1)
        }
    }
}

/// One JSON object: what `autoscale doctor` renders.
fn doctor() {
    let mut value = serde_json::to_value(autoscale_trainer::torch_info()).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("identity".into(), autoscale_trainer::identity().into());
    }
    println!("{value}");
}
