//! The `autoscale` command line: parses arguments, calls the engine, renders what it returns.
//! It is the only place that prints.

mod cli;
mod mix;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use autoscale_cache::{ActionKey, Cache, GcOptions};
use autoscale_engine::{Engine, GpuSpec, Overrides, Pipeline, RunOptions, StageState};
use clap::Parser;

use cli::{CacheCommand, Cli, Command, DagFormat, PipelineArgs};
use render::{Failure, Reporter};

/// Exit statuses, documented in the README.
pub mod exit {
    pub const OK: u8 = 0;
    pub const STAGE_FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const INTERRUPTED: u8 = 130;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    render::init_tracing(cli.verbose);
    let json = cli.json;
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            render::print_failure(&failure, json);
            ExitCode::from(failure.exit_code())
        }
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("autoscale");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("autoscale"),
        None => PathBuf::from(".autoscale-cache"),
    }
}

fn open_engine(cache_dir: Option<PathBuf>) -> Result<Engine, Failure> {
    let dir = cache_dir.unwrap_or_else(default_cache_dir);
    let cache = Cache::open(&dir).map_err(|e| {
        Failure::runtime(e).hint(format!(
            "the cache is at `{}`; set --cache-dir or AUTOSCALE_CACHE_DIR",
            dir.display()
        ))
    })?;
    Ok(Engine::new(cache, autoscale_stages::builtin_kinds()))
}

fn load(engine: &Engine, args: &PipelineArgs) -> Result<Pipeline, Failure> {
    let overrides = Overrides {
        overlays: args.with.clone(),
        sets: args.set.clone(),
    };
    engine.load(&args.file, &overrides).map_err(Failure::Config)
}

fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let json = cli.json;
    match cli.command {
        Command::Run(args) => {
            let engine = open_engine(cli.cache_dir)?;
            let pipeline = load(&engine, &args.pipeline)?;
            if args.dry_run {
                let status = engine.status(&pipeline).map_err(Failure::engine)?;
                render::print_status(&pipeline, &status, json);
                return Ok(exit::OK);
            }
            let gpus = match &args.gpus {
                Some(spec) => GpuSpec::parse(spec).map_err(|e| {
                    Failure::usage(
                        format!("--gpus {spec}: {e}"),
                        "write `--gpus 0,1,3`, `--gpus none` or `--gpus auto`",
                    )
                })?,
                None => GpuSpec::Auto,
            };
            let cancel = Arc::new(AtomicBool::new(false));
            let flag = cancel.clone();
            let _ = ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    // A second Ctrl-C: the user means it.
                    std::process::exit(i32::from(exit::INTERRUPTED));
                }
            });
            let options = RunOptions {
                jobs: args.jobs.unwrap_or_else(|| RunOptions::default().jobs),
                gpus,
                keep_going: args.keep_going,
                cancel,
            };
            let reporter = Reporter::new(json, cli.verbose, pipeline.stages.len());
            let summary = engine
                .run(&pipeline, &options, &|e| reporter.event(e))
                .map_err(Failure::engine)?;
            reporter.finish(&summary);
            Ok(if summary.interrupted {
                exit::INTERRUPTED
            } else if summary.failed > 0 {
                exit::STAGE_FAILED
            } else {
                exit::OK
            })
        }
        Command::Status(args) => {
            let engine = open_engine(cli.cache_dir)?;
            let pipeline = load(&engine, &args)?;
            let status = engine.status(&pipeline).map_err(Failure::engine)?;
            render::print_status(&pipeline, &status, json);
            Ok(exit::OK)
        }
        Command::Explain(args) => {
            let engine = open_engine(cli.cache_dir)?;
            let pipeline = load(&engine, &args.pipeline)?;
            let explanation = engine
                .explain(&pipeline, &args.stage)
                .map_err(Failure::engine)?;
            render::print_explanation(&explanation, json);
            Ok(exit::OK)
        }
        Command::Show(args) => {
            let engine = open_engine(cli.cache_dir)?;
            let pipeline = load(&engine, &args.pipeline)?;
            match engine
                .cached_manifest(&pipeline, &args.stage)
                .map_err(Failure::engine)?
            {
                Ok(manifest) => {
                    let dir = engine.cache().output_dir(&manifest.key);
                    let log = manifest.log.and_then(|d| engine.cache().read_blob(&d).ok());
                    render::print_show(&args.stage, &dir, &manifest, log.as_deref(), json);
                    Ok(exit::OK)
                }
                Err(state) => {
                    let why = match state {
                        StageState::Waiting { on } => format!("it waits on `{on}`"),
                        StageState::WillRun { reasons, .. } => {
                            format!("it will run: {}", reasons.join("; "))
                        }
                        StageState::Cached { .. } => "its result was removed from the cache".into(),
                    };
                    Err(Failure::usage(
                        format!(
                            "stage `{}` has no cached result for its current key: {why}",
                            args.stage
                        ),
                        format!("run `autoscale run {}` first", args.pipeline.file.display()),
                    ))
                }
            }
        }
        Command::Dag(args) => {
            let engine = open_engine(cli.cache_dir)?;
            let pipeline = engine
                .expanded(&load(&engine, &args.pipeline)?)
                .map_err(Failure::engine)?;
            let text = match args.format {
                DagFormat::Dot => autoscale_engine::graph::to_dot(&pipeline),
                DagFormat::Mermaid => autoscale_engine::graph::to_mermaid(&pipeline),
            };
            print!("{text}");
            Ok(exit::OK)
        }
        Command::Kinds => {
            let engine = open_engine(cli.cache_dir)?;
            render::print_kinds(engine.kinds(), json);
            Ok(exit::OK)
        }
        Command::Cache(cmd) => cache_command(cmd, cli.cache_dir, json),
        Command::Mix(args) => mix::run(args, json),
    }
}

fn cache_command(cmd: CacheCommand, cache_dir: Option<PathBuf>, json: bool) -> Result<u8, Failure> {
    let engine = open_engine(cache_dir)?;
    let cache = engine.cache();
    match cmd {
        CacheCommand::Ls => {
            let list = cache.list().map_err(Failure::runtime)?;
            render::print_cache_list(&list, json);
            Ok(exit::OK)
        }
        CacheCommand::Verify => {
            let report = cache.verify().map_err(Failure::runtime)?;
            render::print_verify(&report, json);
            Ok(if report.problems.is_empty() {
                exit::OK
            } else {
                exit::STAGE_FAILED
            })
        }
        CacheCommand::Gc(args) => {
            let keep = if args.pipelines.is_empty() {
                None
            } else {
                let mut keep: std::collections::HashSet<ActionKey> = Default::default();
                for file in &args.pipelines {
                    let pipeline = engine
                        .load(file, &Overrides::default())
                        .map_err(Failure::Config)?;
                    keep.extend(engine.live_keys(&pipeline).map_err(Failure::engine)?);
                }
                Some(keep)
            };
            let max_bytes = match &args.max_size {
                Some(text) => Some(cli::parse_size(text).ok_or_else(|| {
                    Failure::usage(
                        format!("cannot read size `{text}`"),
                        "write a size such as `500MiB` or `20GiB`",
                    )
                })?),
                None => None,
            };
            let report = cache
                .gc(&GcOptions {
                    keep,
                    max_bytes,
                    dry_run: args.dry_run,
                })
                .map_err(Failure::runtime)?;
            render::print_gc(&report, args.dry_run, json);
            Ok(exit::OK)
        }
    }
}
