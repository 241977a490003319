//! The `autoscale` command line: parses arguments, calls the engine, renders what it returns.
//! It is the only place that prints.

mod cli;
mod mix;
mod render;
mod slurm;
mod trainer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use autoscale_cache::{ActionKey, Cache, GcOptions, Remote, RemoteConfig, RemoteError};
use autoscale_engine::stamp::{self, Invocation, Stamp};
use autoscale_engine::{
    Engine, Event, GpuSpec, KindRegistry, Overrides, Pipeline, RunOptions, StageState,
};
use clap::Parser;

use autoscale_errors::Hint;
use cli::{CacheCommand, Cli, Command, DagFormat, PipelineArgs};
use render::{Failure, Reporter};

// Parsing and planning thousands of stages is allocation-bound; mimalloc makes a no-op run of
// 1,000 stages about 15% faster (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// The global flags that say where the cache is and which remote stands behind it.
struct CacheArgs {
    dir: Option<PathBuf>,
    remote: Option<String>,
    remote_mode: Option<autoscale_cache::RemoteMode>,
}

fn open_engine(args: &CacheArgs) -> Result<Engine, Failure> {
    open_engine_at(args, None, trainer::stage_kinds())
}

/// Opens the cache, with the remote cache that the flags, the environment, `./autoscale.toml`
/// or `<pipeline root>/autoscale.toml` name (the first that sets a field wins).
fn open_engine_at(
    args: &CacheArgs,
    pipeline_root: Option<&Path>,
    kinds: KindRegistry,
) -> Result<Engine, Failure> {
    let dir = args.dir.clone().unwrap_or_else(default_cache_dir);
    let mut cache = Cache::open(&dir).map_err(|e| {
        Failure::runtime(e).hint(format!(
            "the cache is at `{}`; set --cache-dir or AUTOSCALE_CACHE_DIR",
            dir.display()
        ))
    })?;
    let config = remote_config(args, pipeline_root).map_err(remote_failure)?;
    if let Some(remote) = Remote::open(&config).map_err(remote_failure)? {
        tracing::info!(remote = %remote.location(), mode = %remote.mode(), origin = ?config.origin, "remote cache");
        cache = cache.with_remote(remote);
    }
    Ok(Engine::new(cache, kinds))
}

fn remote_config(
    args: &CacheArgs,
    pipeline_root: Option<&Path>,
) -> Result<RemoteConfig, RemoteError> {
    let flags = RemoteConfig {
        origin: args.remote.as_ref().map(|_| "--remote".to_string()),
        url: args.remote.clone(),
        mode: args.remote_mode,
        ..Default::default()
    };
    let mut config = flags.or(RemoteConfig::from_env()?);
    let mut seen = Vec::new();
    let cwd = std::env::current_dir().unwrap_or_default();
    for dir in std::iter::once(cwd.as_path()).chain(pipeline_root) {
        let file = std::path::absolute(dir.join(autoscale_cache::remote::CONFIG_FILE))
            .unwrap_or_else(|_| dir.join(autoscale_cache::remote::CONFIG_FILE));
        let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
        if seen.contains(&canonical) {
            continue;
        }
        if let Some(layer) = RemoteConfig::from_file(&file)? {
            config = config.or(layer);
        }
        seen.push(canonical);
    }
    Ok(config)
}

fn remote_failure(e: RemoteError) -> Failure {
    let hint = e.hint();
    match hint {
        Some(hint) => Failure::usage(autoscale_errors::one_line(&e), hint),
        None => Failure::runtime(e),
    }
}

/// Loads the pipeline, then opens the engine: the pipeline's root may hold `autoscale.toml`.
fn open_with_pipeline(args: &CacheArgs, p: &PipelineArgs) -> Result<(Engine, Pipeline), Failure> {
    let kinds = trainer::stage_kinds();
    let pipeline = Pipeline::load(&p.file, &overrides(p), &kinds).map_err(Failure::Config)?;
    let engine = open_engine_at(args, Some(&pipeline.root), kinds)?;
    Ok((engine, pipeline))
}

fn overrides(args: &PipelineArgs) -> Overrides {
    Overrides {
        overlays: args.with.clone(),
        sets: args.set.clone(),
    }
}

fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let json = cli.json;
    let cache_args = CacheArgs {
        dir: cli.cache_dir,
        remote: cli.remote,
        remote_mode: cli.remote_mode.map(Into::into),
    };
    dispatch_command(cli.command, &cache_args, json, cli.verbose)
}

fn dispatch_command(
    command: Command,
    cache_args: &CacheArgs,
    json: bool,
    verbose: u8,
) -> Result<u8, Failure> {
    match command {
        Command::Run(args) => run(args, cache_args, json, verbose),
        Command::Status(args) => {
            let invocation = invocation(&args.pipeline, &args.targets);
            let gpus = gpu_spec(&args.gpus)?;
            if let Some(stamp) = Stamp::check(&cache_root(cache_args), &invocation, &identity())
                && stamp_gpus_match(&stamp, &gpus, None)
            {
                tracing::info!("no-op: answered from the stamp of the last run");
                render::print_stamped_status(&stamp, json);
                return Ok(exit::OK);
            }
            let (engine, pipeline) = open_with_pipeline(cache_args, &args.pipeline)?;
            // Keyed as `run` would key it: through Slurm, stages get the GPUs they ask for.
            let slurm = slurm_chosen(None, &pipeline.root)?;
            tell_gpus(&engine, &gpus, slurm.is_some());
            let pipeline = select(&engine, pipeline, &args.targets)?;
            let status = engine.status(&pipeline);
            render::print_remote_warnings(&engine.cache().take_remote_warnings());
            let status = status.map_err(Failure::engine)?;
            render::print_status(&pipeline.name, &status, json);
            Ok(exit::OK)
        }
        Command::Explain(args) => {
            let (engine, pipeline) = open_with_pipeline(cache_args, &args.pipeline)?;
            let explanation = engine.explain(&pipeline, &args.stage);
            render::print_remote_warnings(&engine.cache().take_remote_warnings());
            render::print_explanation(&explanation.map_err(Failure::engine)?, json);
            Ok(exit::OK)
        }
        Command::Show(args) => {
            let (engine, pipeline) = open_with_pipeline(cache_args, &args.pipeline)?;
            let found = engine.cached_manifest(&pipeline, &args.stage);
            render::print_remote_warnings(&engine.cache().take_remote_warnings());
            match found.map_err(Failure::engine)? {
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
        Command::Report(args) => {
            let (engine, pipeline) = open_with_pipeline(cache_args, &args)?;
            let expanded = engine.expanded(&pipeline).map_err(Failure::engine)?;
            let ids: Vec<&str> = expanded
                .stages
                .iter()
                .filter(|s| s.kind == "report")
                .map(|s| s.id.as_str())
                .collect();
            if ids.is_empty() {
                return Err(Failure::usage(
                    format!("{} has no stage of kind `report`", args.file.display()),
                    "add one: `- {id: report, kind: report, inputs: {runs: <target trainings>}}` (see `autoscale kinds`)",
                ));
            }
            let mut missing = Vec::new();
            for id in ids {
                match engine
                    .cached_manifest(&pipeline, id)
                    .map_err(Failure::engine)?
                {
                    Ok(manifest) => {
                        let dir = engine.cache().output_dir(&manifest.key);
                        render::print_report(id, &dir, json);
                    }
                    Err(_) => missing.push(id.to_string()),
                }
            }
            render::print_remote_warnings(&engine.cache().take_remote_warnings());
            if missing.is_empty() {
                Ok(exit::OK)
            } else {
                Err(Failure::usage(
                    format!(
                        "no report yet: `{}` has not run for the current params",
                        missing.join("`, `")
                    ),
                    format!("run `autoscale run {}` first", args.file.display()),
                ))
            }
        }
        Command::Dag(args) => {
            let (engine, pipeline) = open_with_pipeline(cache_args, &args.pipeline)?;
            let pipeline = engine.expanded(&pipeline).map_err(Failure::engine)?;
            let text = match args.format {
                DagFormat::Dot => autoscale_engine::graph::to_dot(&pipeline),
                DagFormat::Mermaid => autoscale_engine::graph::to_mermaid(&pipeline),
            };
            print!("{text}");
            Ok(exit::OK)
        }
        Command::Kinds => {
            let engine = open_engine(cache_args)?;
            render::print_kinds(engine.kinds(), json);
            Ok(exit::OK)
        }
        Command::Cache(cmd) => cache_command(cmd, cache_args, json),
        Command::Mix(args) => mix::run(args, json),
        Command::Doctor => trainer::doctor(json),
    }
}

/// What a no-op stamp must match beyond the files it stats: this binary's version and the
/// trainer identity compiled into it (the binary's own stat is checked too).
fn identity() -> String {
    format!(
        "autoscale {} {}",
        env!("CARGO_PKG_VERSION"),
        autoscale_train::TRAINER_IDENTITY
    )
}

fn cache_root(args: &CacheArgs) -> PathBuf {
    args.dir.clone().unwrap_or_else(default_cache_dir)
}

fn invocation(p: &PipelineArgs, targets: &[String]) -> Invocation {
    Invocation::new(&p.file, &p.with, &p.set, targets)
}

/// The stages `targets` name and what they need. A child of a run-time fan-out (`runs[a]`)
/// exists once its source is cached: those fan-outs are expanded first when a target needs one.
fn select(engine: &Engine, pipeline: Pipeline, targets: &[String]) -> Result<Pipeline, Failure> {
    match pipeline.select(targets) {
        Ok(selected) => Ok(selected),
        Err(e)
            if targets.iter().any(|t| t.contains('['))
                && !pipeline.fanout_placeholders().is_empty() =>
        {
            let mut expanded = pipeline;
            engine
                .expand_cached_fanouts(&mut expanded)
                .map_err(Failure::engine)?;
            expanded.select(targets).map_err(|_| Failure::engine(e))
        }
        Err(e) => Err(Failure::engine(e)),
    }
}

/// The Slurm executor, when `--executor`, `$AUTOSCALE_EXECUTOR` or `executor` in
/// `autoscale.toml` (here, then the pipeline root) names it: its settings and who named it.
/// `None` runs stages here. Reads files only; nothing is created or started.
fn slurm_chosen(
    flag: Option<cli::ExecutorArg>,
    pipeline_root: &Path,
) -> Result<Option<(slurm::ExecutorConfig, String)>, Failure> {
    let files: Vec<PathBuf> = [
        std::env::current_dir().unwrap_or_default(),
        pipeline_root.to_path_buf(),
    ]
    .iter()
    .map(|dir| dir.join(autoscale_cache::remote::CONFIG_FILE))
    .collect();
    let read = || slurm::ExecutorConfig::from_files(&files).map_err(config_failure);
    let (named, origin, config) = match flag {
        Some(e) => (e, "--executor slurm".to_string(), None),
        None => match std::env::var("AUTOSCALE_EXECUTOR")
            .ok()
            .filter(|v| !v.is_empty())
        {
            Some(v) => (
                parse_executor(&v, "$AUTOSCALE_EXECUTOR")?,
                "$AUTOSCALE_EXECUTOR".to_string(),
                None,
            ),
            None => {
                let config = read()?;
                let Some((v, file)) = &config.executor else {
                    return Ok(None);
                };
                let origin = file.display().to_string();
                (parse_executor(v, &origin)?, origin, Some(config))
            }
        },
    };
    if named != cli::ExecutorArg::Slurm {
        return Ok(None);
    }
    // The files are read once: above, unless the flag or the environment named the executor.
    let config = match config {
        Some(config) => config,
        None => read()?,
    };
    Ok(Some((config, origin)))
}

/// Starts the Slurm executor [`slurm_chosen`] found.
fn slurm_executor(
    (config, origin): (slurm::ExecutorConfig, String),
    args: &cli::RunArgs,
    cache_args: &CacheArgs,
) -> Result<Arc<dyn autoscale_engine::Executor>, Failure> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let node = slurm::NodeCommand {
        file: absolute(&args.pipeline.file),
        overlays: args.pipeline.with.iter().map(|p| absolute(p)).collect(),
        sets: args.pipeline.set.clone(),
        cache_dir: absolute(&cache_root(cache_args)),
        workdir: std::env::current_dir().unwrap_or_default(),
    };
    let executor = slurm::SlurmExecutor::new(config.slurm, node).map_err(|e| {
        Failure::usage(
            e,
            format!(
                "run on a machine with the Slurm client tools and a writable cache, or run here with `--executor local` (the Slurm executor was chosen by {origin})"
            ),
        )
    })?;
    Ok(Arc::new(executor))
}

fn parse_executor(value: &str, origin: &str) -> Result<cli::ExecutorArg, Failure> {
    match value {
        "local" => Ok(cli::ExecutorArg::Local),
        "slurm" => Ok(cli::ExecutorArg::Slurm),
        other => Err(Failure::usage(
            format!("{origin}: unknown executor `{other}`"),
            "write `local` or `slurm`",
        )),
    }
}

fn config_failure(message: String) -> Failure {
    Failure::usage(message, "see \"Running on a Slurm cluster\" in the README")
}

/// `--gpus`, parsed.
fn gpu_spec(arg: &Option<String>) -> Result<GpuSpec, Failure> {
    match arg {
        Some(spec) => GpuSpec::parse(spec).map_err(|e| {
            Failure::usage(
                format!("--gpus {spec}: {e}"),
                "write `--gpus 0,1,3`, `--gpus none` or `--gpus auto`",
            )
        }),
        None => Ok(GpuSpec::Auto),
    }
}

/// Tells the engine, for keys computed outside a run (`status`, `--dry-run`), whether stages
/// asking for GPUs would get them: yes through an executor that places GPU requests; else as
/// `--gpus` says, `auto` left for the engine to resolve only if a key needs it.
fn tell_gpus(engine: &Engine, gpus: &GpuSpec, elsewhere: bool) {
    if elsewhere {
        engine.set_gpus(true);
    } else if *gpus != GpuSpec::Auto {
        engine.set_gpus(!gpus.resolve().is_empty());
    }
}

/// Whether a stamp whose keys depended on the presence of GPUs (`train` asking for them) was
/// made with GPUs as present as they are now: through Slurm (`flag`, else the environment or
/// `autoscale.toml`) always, else as `--gpus` says. A stamp whose keys did not always matches.
fn stamp_gpus_match(stamp: &Stamp, gpus: &GpuSpec, flag: Option<cli::ExecutorArg>) -> bool {
    let Some(present) = stamp.gpus_present else {
        return true;
    };
    // A stamp from before the root was recorded, or a config that does not read: the full path.
    let Some(Ok(slurm)) = stamp.root.as_deref().map(|root| slurm_chosen(flag, root)) else {
        return false;
    };
    // Resolved only when a key depended on it and Slurm is not used: `auto` may ask `nvidia-smi`.
    present == (slurm.is_some() || !gpus.resolve().is_empty())
}

fn run(args: cli::RunArgs, cache_args: &CacheArgs, json: bool, verbose: u8) -> Result<u8, Failure> {
    let invocation = invocation(&args.pipeline, &args.targets);
    let root = cache_root(cache_args);
    let gpus = gpu_spec(&args.gpus)?;
    if !args.dry_run
        && let Some(stamp) = Stamp::check(&root, &invocation, &identity())
        && stamp.gpus == args.gpus
        && stamp_gpus_match(&stamp, &gpus, args.executor)
    {
        // Nothing moved since the last run that ended all cached or executed: answer from its
        // stamp, without parsing the pipeline or computing a key.
        let started = std::time::Instant::now();
        let reporter = Reporter::new(json, verbose, stamp.stages.len());
        for message in &stamp.warnings {
            reporter.event(Event::Warning {
                stage: None,
                message: message.clone(),
            });
        }
        reporter.event(Event::Plan {
            pipeline: stamp.pipeline.clone(),
            stages: stamp.stages.len(),
        });
        for stage in &stamp.stages {
            reporter.event(Event::Finished {
                stage: stage.id.clone(),
                outcome: autoscale_engine::Outcome::Cached,
                key: Some(stage.key),
                duration_ms: 0,
                error: None,
                hint: None,
                log: None,
            });
        }
        reporter.finish(&autoscale_engine::RunSummary {
            cached: stamp.stages.len(),
            duration_ms: started.elapsed().as_millis() as u64,
            from_stamp: true,
            ..Default::default()
        });
        return Ok(exit::OK);
    }
    let (engine, pipeline) = open_with_pipeline(cache_args, &args.pipeline)?;
    let slurm = slurm_chosen(args.executor, &pipeline.root)?;
    let pipeline = select(&engine, pipeline, &args.targets)?;
    if args.dry_run {
        tell_gpus(&engine, &gpus, slurm.is_some());
        let status = engine.status(&pipeline).map_err(Failure::engine)?;
        render::print_status(&pipeline.name, &status, json);
        render::print_remote_warnings(&engine.cache().take_remote_warnings());
        return Ok(exit::OK);
    }
    let executor = slurm
        .map(|chosen| slurm_executor(chosen, &args, cache_args))
        .transpose()?;
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
        executor,
    };
    let reporter = Reporter::new(json, verbose, pipeline.stages.len());
    // Remote problems (down, slow, a bad entry) are shown as warnings as they happen.
    let remote_warnings = || {
        for w in engine.cache().take_remote_warnings() {
            reporter.event(Event::Warning {
                stage: None,
                message: format!("remote cache: {w}"),
            });
        }
    };
    // What the stamp of this run records: the stats before it, the stages' keys as they finish,
    // the warnings given before the plan.
    let before = stamp::Before::take(&invocation, &pipeline);
    let finished = std::sync::Mutex::new((Vec::new(), Vec::new(), false));
    let result = engine.run(&pipeline, &options, &|e| {
        if let Ok(mut seen) = finished.lock() {
            let (stages, warnings, planned) = &mut *seen;
            match &e {
                Event::Plan { .. } => *planned = true,
                Event::Warning { message, .. } if !*planned => warnings.push(message.clone()),
                Event::Finished {
                    stage,
                    key: Some(key),
                    ..
                } => stages.push((stage.clone(), *key)),
                _ => {}
            }
        }
        reporter.event(e);
        remote_warnings();
    });
    remote_warnings();
    let summary = result.map_err(Failure::engine)?;
    reporter.finish(&summary);
    let all_done = summary.failed == 0 && summary.skipped == 0 && !summary.interrupted;
    match (before, finished.into_inner()) {
        (Some(before), Ok((stages, warnings, _))) if all_done => {
            let kind_of = |id: &str| {
                let template = id.split('[').next().unwrap_or(id);
                pipeline
                    .stage(id)
                    .or_else(|| pipeline.stage(template))
                    .map(|s| s.kind.clone())
                    .unwrap_or_default()
            };
            let stages = stages
                .into_iter()
                .map(|(id, key)| {
                    let kind = kind_of(&id);
                    (id, kind, key)
                })
                .collect();
            let record = stamp::RunRecord {
                pipeline: pipeline.name.clone(),
                gpus: args.gpus.clone(),
                gpus_present: engine.gpus_asked(),
                root: pipeline.root.clone(),
                stages,
                warnings,
            };
            before.write(engine.cache(), &invocation, &identity(), record);
        }
        _ => stamp::forget(&root, &invocation),
    }
    Ok(if summary.interrupted {
        exit::INTERRUPTED
    } else if summary.failed > 0 {
        exit::STAGE_FAILED
    } else {
        exit::OK
    })
}

fn cache_command(cmd: CacheCommand, cache_args: &CacheArgs, json: bool) -> Result<u8, Failure> {
    if let CacheCommand::Push(args) = &cmd {
        return cache_push(&args.pipelines, cache_args, json);
    }
    if let CacheCommand::Pull(args) = &cmd {
        return cache_pull(args.file.as_deref(), cache_args, json);
    }
    let engine = open_engine(cache_args)?;
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
        CacheCommand::Push(_) | CacheCommand::Pull(_) => Ok(exit::OK),
    }
}

// --- remote cache (issue 7): `cache push` and `cache pull` ---

/// Opens the engine for `cache push`/`pull` over these pipelines (the first one's root may
/// hold `autoscale.toml`), with the keys they reference now.
fn engine_for_pipelines(
    files: &[PathBuf],
    cache_args: &CacheArgs,
) -> Result<(Engine, Option<Vec<ActionKey>>), Failure> {
    let kinds = trainer::stage_kinds();
    let mut pipelines = Vec::new();
    for file in files {
        pipelines
            .push(Pipeline::load(file, &Overrides::default(), &kinds).map_err(Failure::Config)?);
    }
    let engine = open_engine_at(
        cache_args,
        pipelines.first().map(|p| p.root.as_path()),
        kinds,
    )?;
    if pipelines.is_empty() {
        return Ok((engine, None));
    }
    let mut keys = Vec::new();
    for pipeline in &pipelines {
        keys.extend(engine.live_keys(pipeline).map_err(Failure::engine)?);
    }
    keys.sort();
    keys.dedup();
    Ok((engine, Some(keys)))
}

fn cache_push(files: &[PathBuf], cache_args: &CacheArgs, json: bool) -> Result<u8, Failure> {
    let (engine, keys) = engine_for_pipelines(files, cache_args)?;
    let report = engine.cache().push(keys.as_deref());
    render::print_remote_warnings(&engine.cache().take_remote_warnings());
    let report = report.map_err(cache_failure)?;
    render::print_sync(&report, "push", json);
    Ok(if report.problems.is_empty() {
        exit::OK
    } else {
        exit::STAGE_FAILED
    })
}

fn cache_pull(file: Option<&Path>, cache_args: &CacheArgs, json: bool) -> Result<u8, Failure> {
    let files: Vec<PathBuf> = file.map(Path::to_path_buf).into_iter().collect();
    let (engine, keys) = engine_for_pipelines(&files, cache_args)?;
    let report = engine.cache().pull(keys.as_deref());
    render::print_remote_warnings(&engine.cache().take_remote_warnings());
    let report = report.map_err(cache_failure)?;
    render::print_sync(&report, "pull", json);
    Ok(if report.problems.is_empty() {
        exit::OK
    } else {
        exit::STAGE_FAILED
    })
}

fn cache_failure(e: autoscale_cache::CacheError) -> Failure {
    match e {
        autoscale_cache::CacheError::Remote(
            e @ (RemoteError::NotConfigured | RemoteError::ReadOnly { .. }),
        ) => remote_failure(e),
        other => Failure::runtime(other),
    }
}

// --- end remote cache ---
