//! Everything the user sees: errors (`error:` / `caused by:` / `hint:`), run progress (a bar on a
//! terminal, plain lines otherwise, JSON lines with `--json`), and the reports of each command.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use autoscale_cache::{ActionSummary, GcReport, Manifest, RemoteWarning, SyncReport, VerifyReport};
use autoscale_engine::{
    ConfigError, ConfigErrors, EngineError, Event, Explanation, KindRegistry, Outcome, RunSummary,
    StageState, StageStatus,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::exit;
use autoscale_errors::Hint;

pub fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUTOSCALE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only for a terminal: a log file or a pipe gets plain `key=value` fields.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Why a command failed, and how to say so.
#[derive(Debug)]
pub enum Failure {
    Config(ConfigErrors),
    Usage {
        message: String,
        hint: String,
    },
    Runtime {
        message: String,
        causes: Vec<String>,
        hint: Option<String>,
        code: u8,
    },
}

impl Failure {
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Failure::Usage {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// Something here is broken (not the user's input): exit 1, with a hint.
    pub fn broken(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Failure::Runtime {
            message: message.into(),
            causes: Vec::new(),
            hint: Some(hint.into()),
            code: exit::STAGE_FAILED,
        }
    }

    /// Something failed at run time (exit 1): the error, its causes and its hint.
    pub fn runtime(e: impl Hint) -> Self {
        let mut chain = autoscale_errors::chain(&e).into_iter();
        Failure::Runtime {
            message: chain.next().unwrap_or_default(),
            causes: chain.collect(),
            hint: e.hint(),
            code: exit::STAGE_FAILED,
        }
    }

    pub fn engine(e: EngineError) -> Self {
        match e {
            EngineError::Config(c) => Failure::Config(c),
            EngineError::UnknownStage { ref id, ref hint } => Failure::usage(
                format!("no stage `{id}` in the pipeline"),
                hint.clone()
                    .unwrap_or_else(|| "`autoscale status FILE` lists the stages".into()),
            ),
            EngineError::Resources { message, hint } => Failure::Runtime {
                message,
                causes: Vec::new(),
                hint: Some(hint),
                code: exit::BAD_INPUT,
            },
            other => Failure::runtime(other),
        }
    }

    pub fn hint(self, hint: String) -> Self {
        match self {
            Failure::Runtime {
                message,
                causes,
                code,
                ..
            } => Failure::Runtime {
                message,
                causes,
                hint: Some(hint),
                code,
            },
            other => other,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) | Failure::Usage { .. } => exit::BAD_INPUT,
            Failure::Runtime { code, .. } => *code,
        }
    }
}

/// Renders a config error the way compilers do: message, location, the source line, a caret,
/// and the hint.
pub fn config_error_text(e: &ConfigError) -> String {
    let mut out = format!("error: {}\n", e.message);
    if let Some(loc) = &e.location {
        out.push_str(&format!("  --> {loc}\n"));
        if let Some((line, column, src)) = e.source_line() {
            let gutter = line.to_string().len();
            let pad = " ".repeat(gutter);
            out.push_str(&format!(
                "{pad} |\n{line} | {src}\n{pad} | {}^\n",
                " ".repeat(column.saturating_sub(1) as usize)
            ));
        }
    }
    if let Some(hint) = &e.hint {
        out.push_str(&format!("hint: {hint}\n"));
    }
    out
}

pub fn print_failure(failure: &Failure, json: bool) {
    let mut err = std::io::stderr().lock();
    match failure {
        Failure::Config(errors) => {
            if json {
                for e in &errors.0 {
                    let line = json!({"event": "error", "message": e.message, "location": e.location.as_ref().map(|l| l.to_string()), "hint": e.hint});
                    let _ = writeln!(std::io::stdout(), "{line}");
                }
            }
            for e in &errors.0 {
                let _ = write!(err, "{}", config_error_text(e));
            }
            if errors.0.len() > 1 {
                let _ = writeln!(err, "{} problems; nothing was run", errors.0.len());
            }
        }
        Failure::Usage { message, hint } => {
            if json {
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    json!({"event": "error", "message": message, "hint": hint})
                );
            }
            let _ = writeln!(err, "error: {message}\nhint: {hint}");
        }
        Failure::Runtime {
            message,
            causes,
            hint,
            ..
        } => {
            if json {
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    json!({"event": "error", "message": message, "causes": causes, "hint": hint})
                );
            }
            let _ = writeln!(err, "error: {message}");
            for c in causes {
                let _ = writeln!(err, "caused by: {c}");
            }
            if let Some(h) = hint {
                let _ = writeln!(err, "hint: {h}");
            }
        }
    }
}

/// Renders engine events while a pipeline runs.
pub struct Reporter {
    json: bool,
    verbose: u8,
    bar: Option<ProgressBar>,
    out: Mutex<()>,
}

impl Reporter {
    pub fn new(json: bool, verbose: u8, stages: usize) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(stages as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            json,
            verbose,
            bar,
            out: Mutex::new(()),
        }
    }

    fn line(&self, text: &str) {
        let _guard = self.out.lock();
        match &self.bar {
            Some(bar) => bar.println(text),
            None => {
                let _ = writeln!(std::io::stderr(), "{text}");
            }
        }
    }

    pub fn event(&self, event: Event) {
        if self.json {
            let _guard = self.out.lock();
            if let Ok(line) = serde_json::to_string(&event) {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
            return;
        }
        match event {
            Event::Plan { .. } => {}
            Event::Started {
                stage,
                devices,
                attempt,
                ..
            } => {
                let on = match devices {
                    Some(d) => format!(" on GPU {}", autoscale_engine::Device::visible(&d)),
                    None => String::new(),
                };
                let again = if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("running {stage}{on}"));
                }
                if self.verbose > 0 || self.bar.is_none() {
                    self.line(&format!("  started   {stage}{on}{again}"));
                }
            }
            Event::Waiting { stage, holder } => {
                let who = holder
                    .map(|h| {
                        format!(
                            " (held by pid {} on {} since {})",
                            h.pid, h.host, h.since_unix
                        )
                    })
                    .unwrap_or_default();
                self.line(&format!(
                    "  waiting   {stage}: another autoscale is computing it{who}"
                ));
            }
            Event::Progress { stage, data } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("{stage}: {data}"));
                }
            }
            Event::Warning { stage, message } => {
                let at = stage.map(|s| format!("{s}: ")).unwrap_or_default();
                self.line(&format!("warning: {at}{message}"));
            }
            Event::Finished {
                stage,
                outcome,
                duration_ms,
                error,
                hint,
                log,
                ..
            } => {
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                }
                match outcome {
                    Outcome::Executed => self.line(&format!(
                        "  executed  {stage}  ({:.2}s)",
                        duration_ms as f64 / 1000.0
                    )),
                    Outcome::Cached if self.verbose > 0 => {
                        self.line(&format!("  cached    {stage}"))
                    }
                    Outcome::Cached => {}
                    Outcome::Failed => {
                        let mut text =
                            format!("  FAILED    {stage}: {}", error.unwrap_or_default());
                        if let Some(hint) = hint {
                            text.push_str(&format!("\n  hint: {hint}"));
                        }
                        if let Some(log) = log {
                            text.push_str(&format!("\n  full log: {}", log.display()));
                        }
                        self.line(&text);
                    }
                    Outcome::Skipped => {
                        let why = error.map(|e| format!(" ({e})")).unwrap_or_default();
                        self.line(&format!("  skipped   {stage}{why}"));
                    }
                    Outcome::Interrupted => self.line(&format!("  stopped   {stage}")),
                }
            }
        }
    }

    pub fn finish(&self, summary: &RunSummary) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.json {
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                json!({"event": "summary", "summary": summary})
            );
            return;
        }
        let total =
            summary.executed + summary.cached + summary.failed + summary.skipped + summary.stopped;
        let stopped = if summary.stopped > 0 {
            format!(", {} stopped", summary.stopped)
        } else {
            String::new()
        };
        let mut text = format!(
            "{total} stages: {} executed, {} cached, {} failed, {} skipped{stopped} in {:.2}s",
            summary.executed,
            summary.cached,
            summary.failed,
            summary.skipped,
            summary.duration_ms as f64 / 1000.0
        );
        if summary.interrupted {
            text.push_str(" (interrupted; nothing half-done was cached, run again to resume)");
        }
        if summary.from_stamp {
            text.push_str(" (nothing changed since the last run: answered from its stamp)");
        }
        let _ = writeln!(std::io::stderr(), "{text}");
    }
}

/// `status` answered from a no-op stamp: every stage cached.
pub fn print_stamped_status(stamp: &autoscale_engine::stamp::Stamp, json: bool) {
    let status: Vec<StageStatus> = stamp
        .stages
        .iter()
        .map(|s| StageStatus {
            stage: s.id.clone(),
            kind: s.kind.clone(),
            state: StageState::Cached {
                key: s.key,
                remote: false,
            },
        })
        .collect();
    print_status(&stamp.pipeline, &status, json);
}

pub fn print_status(pipeline: &str, status: &[StageStatus], json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        for s in status {
            if let Ok(line) = serde_json::to_string(s) {
                let _ = writeln!(out, "{line}");
            }
        }
        return;
    }
    let width = status
        .iter()
        .map(|s| s.stage.len())
        .max()
        .unwrap_or(5)
        .min(48);
    let (mut cached, mut run, mut waiting, mut remote) = (0, 0, 0, 0);
    for s in status {
        let (word, why) = match &s.state {
            StageState::Cached { remote: true, .. } => {
                cached += 1;
                remote += 1;
                (
                    "remote",
                    "in the remote cache: a run downloads it".to_string(),
                )
            }
            StageState::Cached { .. } => {
                cached += 1;
                ("cached", String::new())
            }
            StageState::WillRun { reasons, .. } => {
                run += 1;
                ("run", reasons.join("; "))
            }
            StageState::Waiting { on } => {
                waiting += 1;
                ("run", format!("waits on `{on}`"))
            }
        };
        let _ = writeln!(out, "{word:<7} {:<width$}  {why}", s.stage);
    }
    let from_remote = if remote > 0 {
        format!(" ({remote} of them in the remote cache)")
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "{}: {} stages, {cached} cached{from_remote}, {} to run ({waiting} of them wait on an upstream result)",
        pipeline,
        status.len(),
        run + waiting
    );
}

pub fn print_explanation(e: &Explanation, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let state = match &e.state {
        StageState::Cached { key, remote: false } => format!("cached under key {key}"),
        StageState::Cached { key, remote: true } => {
            format!("in the remote cache under key {key}")
        }
        StageState::WillRun { key, .. } => format!("will run; its key is {key}"),
        StageState::Waiting { on } => format!("will run; its key is unknown until `{on}` has run"),
    };
    let _ = writeln!(out, "stage {}: {state}", e.stage);
    let _ = writeln!(
        out,
        "\nkey record:\n{}",
        serde_json::to_string_pretty(&e.record).unwrap_or_default()
    );
    match &e.previous_key {
        None => {
            let _ = writeln!(
                out,
                "\nno earlier run of this stage is recorded in this cache"
            );
        }
        Some(k) => {
            let _ = writeln!(out, "\nlast run: key {k}");
            if e.previous_record.is_none() {
                let _ = writeln!(out, "  (its result is no longer in the cache)");
            } else if e.changes.is_empty() {
                let _ = writeln!(out, "  no difference");
            }
            for c in &e.changes {
                let _ = writeln!(out, "  {c}");
            }
        }
    }
}

/// `autoscale report`: a report stage's HTML and markdown, and its folder.
pub fn print_report(stage: &str, dir: &Path, json: bool) {
    let mut out = std::io::stdout().lock();
    let (html, md) = (dir.join("report.html"), dir.join("report.md"));
    if json {
        let line = json!({"stage": stage, "dir": dir, "html": html, "markdown": md});
        let _ = writeln!(out, "{line}");
    } else {
        let _ = writeln!(out, "{stage}: {}", html.display());
        let _ = writeln!(out, "  markdown  {}", md.display());
        let _ = writeln!(out, "  plots     {}", dir.display());
    }
}

pub fn print_show(stage: &str, dir: &Path, m: &Manifest, log: Option<&[u8]>, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let files: Vec<_> = m.files.iter().map(|f| json!({"path": f.path, "abs_path": dir.join(&f.path), "digest": f.digest, "size": f.size})).collect();
        let line = json!({"stage": stage, "key": m.key, "dir": dir, "tree": m.tree, "files": files, "metadata": m.metadata_value(), "timings": m.timings});
        let _ = writeln!(out, "{line}");
        return;
    }
    let _ = writeln!(
        out,
        "stage {stage}\nkey   {}\ndir   {}\nran   {:.2}s",
        m.key,
        dir.display(),
        m.timings.duration_ms as f64 / 1000.0
    );
    let _ = writeln!(out, "files:");
    for f in &m.files {
        let _ = writeln!(
            out,
            "  {:>10}  {}",
            human_bytes(f.size),
            dir.join(&f.path).display()
        );
    }
    let _ = writeln!(
        out,
        "metadata: {}",
        serde_json::to_string_pretty(&m.metadata_value()).unwrap_or_default()
    );
    if let Some(log) = log {
        let text = String::from_utf8_lossy(log);
        let lines: Vec<&str> = text.lines().collect();
        let _ = writeln!(out, "log (last {} lines):", lines.len().min(20));
        for l in &lines[lines.len().saturating_sub(20)..] {
            let _ = writeln!(out, "  {l}");
        }
    }
}

/// What a trainer of one's own fulfils to stand in for the `train` kind: a `command` stage fanned
/// out of `ddo_plan` (proxies) or given a mixture input (targets). README, "Bring your own trainer".
const TRAINER_CONTRACT: &[(&str, &str, &str)] = &[
    (
        "receives",
        "params.tokens",
        "the mixture as {domain: training tokens} (DDO's proxy runs)",
    ),
    (
        "receives",
        "params.total_tokens",
        "the token budget, with weights as `params.weights` or a `weights` input (a mixture stage: weights.json {\"weights\": {domain: share}})",
    ),
    (
        "receives",
        "params.seed",
        "the training seed (DDO's base replicates differ in it; `params.data_seed` when only the data is redrawn)",
    ),
    (
        "receives",
        "inputs.data",
        "the training data: a `shard` stage (manifest.json + Arrow IPC shards) or any stage you name",
    ),
    (
        "receives",
        "AUTOSCALE_PARAMS_JSON",
        "every param as one JSON object; scalars also as AUTOSCALE_PARAM_<NAME>",
    ),
    (
        "receives",
        "CUDA_VISIBLE_DEVICES",
        "the GPUs the engine assigned (`resources: {gpus: N}`); empty: the CPU",
    ),
    (
        "receives",
        "AUTOSCALE_SCRATCH",
        "a folder kept across a killed run of the same key: checkpoints to resume from",
    ),
    (
        "writes",
        "$AUTOSCALE_OUT/eval.json",
        "{\"domains\": {domain: {\"loss\": nats per token, \"ppl\": e^loss}}}, what `ddo` and `report` read",
    ),
    (
        "writes",
        "eval.json `curve`",
        "optional: [{\"step\": n, \"mean_loss\": x}], for the report's steps-to-loss speed-up",
    ),
];

pub fn print_kinds(kinds: &KindRegistry, json: bool) {
    print_kind_list(kinds, json);
    let mut out = std::io::stdout().lock();
    if json {
        let items: Vec<_> = TRAINER_CONTRACT
            .iter()
            .map(|(dir, name, help)| json!({"direction": dir, "name": name, "help": help}))
            .collect();
        let _ = writeln!(
            out,
            "{}",
            json!({"contract": "trainer", "summary": "what a `command` stage fulfils to train in place of the `train` kind", "items": items})
        );
        return;
    }
    let _ = writeln!(
        out,
        "\nA trainer of your own (a `command` stage in place of `train`; example: examples/trainers/hf_clm.py)"
    );
    for (dir, name, help) in TRAINER_CONTRACT {
        let _ = writeln!(out, "  {dir:<9} {name:<26} {help}");
    }
}

fn print_kind_list(kinds: &KindRegistry, json: bool) {
    let mut out = std::io::stdout().lock();
    for name in kinds.names() {
        let Some(kind) = kinds.get(name) else {
            continue;
        };
        if json {
            let params: Vec<_> = kind.params().iter().map(|p| json!({"name": p.name, "type": p.ty.name(), "required": p.required, "help": p.help})).collect();
            let _ = writeln!(
                out,
                "{}",
                json!({"kind": name, "version": kind.implementation().version, "libraries": kind.implementation().libraries(), "summary": kind.summary(), "params": params})
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{name} (v{}): {}",
            kind.implementation().version,
            kind.summary()
        );
        for p in kind.params() {
            let req = if p.required { "required" } else { "optional" };
            let _ = writeln!(
                out,
                "  {:<16} {:<7} {req:<9} {}",
                p.name,
                p.ty.name(),
                p.help
            );
        }
    }
}

pub fn print_cache_list(list: &[ActionSummary], json: bool) {
    let mut out = std::io::stdout().lock();
    for a in list {
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(a).unwrap_or_default());
        } else {
            let who = format!(
                "{}/{}",
                a.metadata["pipeline"].as_str().unwrap_or("?"),
                a.metadata["stage"].as_str().unwrap_or("?")
            );
            let _ = writeln!(
                out,
                "{}  {:>10}  {:>5} files  {who}",
                a.key.short(),
                human_bytes(a.bytes),
                a.files
            );
        }
    }
    if !json {
        let _ = writeln!(
            out,
            "{} cached results, {}",
            list.len(),
            human_bytes(list.iter().fold(0u64, |n, a| n.saturating_add(a.bytes)))
        );
    }
}

pub fn print_verify(r: &VerifyReport, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    for p in &r.problems {
        let _ = writeln!(out, "problem: {}: {}", p.path.display(), p.problem);
    }
    for s in &r.stale_staging {
        let _ = writeln!(
            out,
            "stale: {} (left by a killed run; `autoscale cache gc` removes it)",
            s.display()
        );
    }
    let verdict = if r.problems.is_empty() {
        "ok"
    } else {
        "PROBLEMS FOUND"
    };
    let _ = writeln!(
        out,
        "{verdict}: {} results, {} blobs checked, {} problems",
        r.actions,
        r.blobs,
        r.problems.len()
    );
}

pub fn print_gc(r: &GcReport, dry_run: bool, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", json!({"dry_run": dry_run, "report": r}));
        return;
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    let _ = writeln!(
        out,
        "{verb} {} results and {} blobs ({}); {} kept",
        r.actions_removed,
        r.blobs_removed,
        human_bytes(r.bytes_freed),
        human_bytes(r.bytes_kept)
    );
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

// --- remote cache (issue 7) ---

/// Remote problems the command went on past; on stderr, so `--json` output stays one kind of
/// object per line.
pub fn print_remote_warnings(warnings: &[RemoteWarning]) {
    let mut err = std::io::stderr().lock();
    for w in warnings {
        let _ = writeln!(err, "warning: remote cache: {w}");
    }
}

pub fn print_sync(r: &SyncReport, verb: &str, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", json!({"event": verb, "report": r}));
        return;
    }
    for p in &r.problems {
        let key = p
            .key
            .map(|k| format!("{}: ", k.short()))
            .unwrap_or_default();
        let _ = writeln!(out, "problem: {key}{}", p.message);
    }
    let (done, there, source) = match verb {
        "push" => ("pushed", "already in the remote", "not in the local cache"),
        _ => ("pulled", "already local", "not in the remote cache"),
    };
    let _ = writeln!(
        out,
        "{done} {} results ({}); {} {there}; {} {source}; {} problems",
        r.transferred,
        human_bytes(r.bytes),
        r.present,
        r.absent,
        r.problems.len()
    );
}

// --- end remote cache ---
