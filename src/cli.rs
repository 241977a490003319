//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run declarative ML data pipelines as a DAG of cached stages.
#[derive(Debug, Parser)]
#[command(name = "autoscale", version, about, long_about = None)]
pub struct Cli {
    /// The cache directory [default: $XDG_CACHE_HOME/autoscale or ~/.cache/autoscale].
    #[arg(long, global = true, env = "AUTOSCALE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v: info, -vv: debug); also lists cached stages in `run`.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    // --- remote cache (issue 7) ---
    /// A team's remote cache: `s3://bucket/prefix`, `file:///shared/path` or a directory
    /// [else $AUTOSCALE_REMOTE, else `[remote] url` in ./autoscale.toml or the pipeline root's].
    #[arg(long, global = true, value_name = "URL")]
    pub remote: Option<String>,
    /// How the remote cache is used [else $AUTOSCALE_REMOTE_MODE, else autoscale.toml;
    /// default: read-write when a remote is named].
    #[arg(long, global = true, value_enum, value_name = "MODE")]
    pub remote_mode: Option<RemoteModeArg>,
    // --- end remote cache ---
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every stage whose result is not cached.
    Run(RunArgs),
    /// Show every stage, cached or going to run, and why.
    Status(StatusArgs),
    /// Show a stage's key record and its difference from the stage's last cached run.
    Explain(StageArgs),
    /// Show a cached stage's output paths and metadata.
    Show(StageArgs),
    /// Print the pipeline's DAG (Graphviz DOT, or Mermaid).
    Dag(DagArgs),
    /// Print where the pipeline's report is (the output of its `report` stages).
    Report(PipelineArgs),
    /// List the stage kinds and their params.
    Kinds,
    /// Inspect and clean the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Mixture math (DDO, the AutoScale predictor, baselines) on results from any trainer.
    Mix(crate::mix::MixArgs),
    /// Check the trainer: where `autoscale-train` is, its identity, its torch version, the CUDA
    /// devices it sees, where it found libtorch.
    Doctor,
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub file: PathBuf,
    /// Override a param: `name=value` (pipeline param) or `stage.name=value` (stage param).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Layer a YAML file of overrides (`params:` and `stages: {id: {params: ...}}`) on top.
    #[arg(long = "with", value_name = "FILE")]
    pub with: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Only these stages and what they need (a fanned-out stage's id names all its children).
    #[arg(value_name = "STAGE")]
    pub targets: Vec<String>,
    /// The CUDA devices a run would have, as `run --gpus` takes them: a `train` stage asking
    /// for GPUs is keyed `cuda` with some, `cpu` with none [default: auto].
    #[arg(long)]
    pub gpus: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Only these stages and what they need (a fanned-out stage's id names all its children):
    /// `autoscale run pipelines/gpt2_large.yaml shard` builds the shards and no training.
    #[arg(value_name = "STAGE")]
    pub targets: Vec<String>,
    /// CPU slots: at most this many single-CPU stages at once [default: the number of cores].
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// CUDA devices to hand out, one stage per device: `0,1,3`, `none` or `auto`.
    #[arg(long)]
    pub gpus: Option<String>,
    /// Go on with independent stages after a failure.
    #[arg(long)]
    pub keep_going: bool,
    /// Show what would run, and why, without running it.
    #[arg(long)]
    pub dry_run: bool,
    /// Where stages that are not cached run: `local` (here) or `slurm` (one sbatch job each)
    /// [else $AUTOSCALE_EXECUTOR, else `executor` in ./autoscale.toml or the pipeline root's].
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
}

/// `--executor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Run stages on this machine.
    Local,
    /// Submit each stage as a Slurm job (settings: `[slurm]` in autoscale.toml).
    Slurm,
}

#[derive(Debug, Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The stage id (a fanned-out stage: `train[uniform]`).
    pub stage: String,
}

/// `--remote-mode`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RemoteModeArg {
    /// Download remote hits; upload nothing.
    ReadOnly,
    /// Download remote hits and upload what runs here.
    ReadWrite,
    /// Ignore the remote cache.
    Off,
}

impl From<RemoteModeArg> for autoscale_cache::RemoteMode {
    fn from(mode: RemoteModeArg) -> Self {
        match mode {
            RemoteModeArg::ReadOnly => Self::ReadOnly,
            RemoteModeArg::ReadWrite => Self::ReadWrite,
            RemoteModeArg::Off => Self::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Dot,
    Mermaid,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
    pub format: DagFormat,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached stage results, most recently used first.
    Ls,
    /// Re-hash every blob and check every output tree.
    Verify,
    /// Remove what the given pipelines do not reference, and cap the size.
    Gc(GcArgs),
    /// Upload local results to the remote cache: all of them, or what the pipelines reference.
    Push(PushArgs),
    /// Download from the remote cache what a pipeline references, or everything it holds.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Push only what these pipelines reference now (none given: every local result).
    pub pipelines: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Pull only what this pipeline references (none given: every remote result).
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep only what these pipelines reference now (none given: keep every result).
    pub pipelines: Vec<PathBuf>,
    /// Then drop least-recently-used results until the cache fits, e.g. `20GiB`.
    #[arg(long)]
    pub max_size: Option<String>,
    /// Say what would go, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `500MiB`, `20GiB`, `1000` (bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((num * factor) as u64)
}
