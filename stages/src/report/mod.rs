//! `report`: the AutoScale comparison at the target scale, in process. It reads the target
//! trainings' `eval.json` (a fan-out group, one child per mixture and seed) and whatever
//! weights the pipeline hands it besides (DDO reports, the prediction, baselines), and writes
//! what a reader needs to judge the method: the headline comparison with seed noise, the
//! paper's speed-up metric, per-domain losses, the weights, and plots of the DDO fits, the
//! weights and the validation curves.
//!
//! | writes | what |
//! |---|---|
//! | `report.md`, `report.html` | the report; the HTML page inlines its plots |
//! | `results.json` | every number in the report, for scripts |
//! | `fits`, `weights`, `curves` (`.svg` and `.png`) | the plots, each when its data is there |
//!
//! Mixtures are named by the runs' child ids, `<stage>[<mixture>,<seed>]`, and a context
//! input's name is the mixture it describes: input `predict` gives the weights that runs
//! `target[predict,*]` trained on.

mod document;
mod plots;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use autoscale_engine::{
    Implementation, InputPath, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
use autoscale_mixture::{DdoReport, Prediction};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::font::FontError;
use crate::learning::Learning;
use autoscale_errors::Hint;
use document::Document;

/// `report`: the target-scale comparison of the mixtures, with plots.
pub struct ReportKind;

const REPORT_PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "reference",
        ParamType::String,
        "the mixture the others are compared with and the speed-up is measured for [default: predict]",
    ),
    ParamSpec::optional(
        "names",
        ParamType::Map,
        "display names, mixture: name, over the defaults (predict: AutoScale, ddo_large, llama: LLaMA, ...)",
    ),
    ParamSpec::optional(
        "title",
        ParamType::String,
        "the report's heading [default: AutoScale report]",
    ),
];

/// The display names a pipeline gets without saying anything; `names` adds to and overrides
/// them.
const DEFAULT_NAMES: [(&str, &str); 6] = [
    ("predict", "AutoScale"),
    ("uniform", "uniform"),
    ("natural", "natural"),
    ("ddo_small", "DDO (smaller proxy scale)"),
    ("ddo_large", "DDO (larger proxy scale)"),
    ("llama", "LLaMA"),
];

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("`{name}` must be {expected}, not {value}")]
    Param {
        name: String,
        expected: &'static str,
        value: String,
    },
    #[error("stage `{stage}` has no input `runs`")]
    NoRuns { stage: String },
    #[error("input `runs` of `{stage}` is a single stage, not a fan-out group")]
    RunsNotFanned { stage: String },
    #[error("input `runs` of `{stage}` has no members")]
    EmptyRuns { stage: String },
    #[error("cannot read mixture and seed from run `{child}`")]
    RunId { child: String },
    #[error("runs `{first}` and `{second}` are both mixture `{mixture}` with seed `{seed}`")]
    DuplicateRun {
        first: String,
        second: String,
        mixture: String,
        seed: String,
    },
    #[error("run `{run}`: cannot read `{path}`: {source}")]
    Read {
        run: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run `{run}`: `{path}` is not an eval.json: {message}")]
    Eval {
        run: String,
        path: PathBuf,
        message: String,
    },
    #[error("run `{run}` is evaluated on [{found}], but run `{other}` on [{expected}]")]
    Domains {
        run: String,
        found: String,
        other: String,
        expected: String,
    },
    #[error("the reference mixture `{reference}` has no runs (the runs' mixtures: {mixtures})")]
    NoReference { reference: String, mixtures: String },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialise {file}: {message}")]
    Serialize { file: &'static str, message: String },
    #[error("cannot draw the `{plot}` plot: {message}")]
    Plot { plot: &'static str, message: String },
    #[error(transparent)]
    Font(#[from] FontError),
}

impl Hint for ReportError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Param { .. } => "`autoscale kinds` lists each kind's params".into(),
            Self::NoRuns { .. } | Self::RunsNotFanned { .. } | Self::EmptyRuns { .. } => {
                "`runs` names the target trainings, a stage with a `matrix: {mixture: [...], seed: [...]}`"
                    .into()
            }
            Self::RunId { .. } | Self::DuplicateRun { .. } => {
                "`runs` members must be `<stage>[<mixture>,<seed>]` (or `<stage>[<mixture>]` for one seed): a `matrix` with the axes `mixture` and `seed`, one run per pair"
                    .into()
            }
            Self::Read { .. } | Self::Eval { .. } => {
                r#"each run writes eval.json: {"domains": {"<domain>": {"loss": ..., "ppl": ...}}, "curve": [{"step": ..., "mean_loss": ...}]}; the curve is optional"#
                    .into()
            }
            Self::Domains { .. } => {
                "evaluate every target run on the same validation domains, so their means compare"
                    .into()
            }
            Self::NoReference { .. } => {
                "set the param `reference` to one of the runs' mixtures, or add its runs".into()
            }
            Self::Write { .. } => "is the disk full, or the cache directory read-only?".into(),
            Self::Plot { .. } | Self::Serialize { .. } | Self::Font(_) => return None,
        })
    }
}

impl From<ReportError> for StageError {
    fn from(e: ReportError) -> Self {
        StageError::Failed {
            hint: e.hint(),
            message: e.to_string(),
        }
    }
}

impl StageKind for ReportKind {
    fn name(&self) -> &'static str {
        "report"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::REPORT
    }

    fn summary(&self) -> &'static str {
        "compares the target runs' mixtures: seed-averaged losses, the speed-up, weights and plots"
    }

    fn params(&self) -> &[ParamSpec] {
        REPORT_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        ReportParams::parse(params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let params = ReportParams::parse(ctx.params)?;
        let runs = read_runs(ctx.stage_id, ctx.inputs)?;
        let context = read_context(ctx.inputs);
        if ctx.cancelled() {
            return Err(StageError::Cancelled);
        }
        let report = Report::build(&params, runs, context)?;
        let written = report.write(&ctx.out_dir)?;
        Ok(json!({
            "reference": report.reference,
            "mean_loss": report
                .mixtures
                .iter()
                .map(|(m, s)| (m.clone(), s.mean_loss.mean))
                .collect::<BTreeMap<_, _>>(),
            "speedups": report.speedups,
            "plots": written,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Params

#[derive(Debug, Clone)]
struct ReportParams {
    reference: String,
    names: BTreeMap<String, String>,
    title: String,
}

impl ReportParams {
    fn parse(params: &Map<String, Value>) -> Result<Self, ReportError> {
        let present = |name: &str| params.get(name).filter(|v| !v.is_null());
        let string = |name: &str| -> Result<Option<String>, ReportError> {
            present(name)
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or(ReportError::Param {
                        name: name.to_owned(),
                        expected: "a string",
                        value: v.to_string(),
                    })
                })
                .transpose()
        };
        let mut names: BTreeMap<String, String> = DEFAULT_NAMES
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(given) = present("names") {
            let map = given.as_object().ok_or(ReportError::Param {
                name: "names".into(),
                expected: "a map of mixture: display name",
                value: given.to_string(),
            })?;
            for (mixture, name) in map {
                let name = name.as_str().ok_or(ReportError::Param {
                    name: format!("names.{mixture}"),
                    expected: "a string",
                    value: name.to_string(),
                })?;
                names.insert(mixture.clone(), name.to_owned());
            }
        }
        Ok(Self {
            reference: string("reference")?.unwrap_or_else(|| "predict".into()),
            names,
            title: string("title")?.unwrap_or_else(|| "AutoScale report".into()),
        })
    }

    fn display(&self, mixture: &str) -> String {
        self.names
            .get(mixture)
            .cloned()
            .unwrap_or_else(|| mixture.to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

/// `eval.json` as either producer writes it: the libtorch trainer (with `curve`) or the n-gram
/// proxy (without). Summary fields are recomputed from `domains`, so both read the same way.
#[derive(Debug, Deserialize)]
struct EvalFile {
    domains: BTreeMap<String, EvalDomain>,
    #[serde(default)]
    curve: Option<Vec<EvalCurvePoint>>,
}

#[derive(Debug, Deserialize)]
struct EvalDomain {
    loss: Option<f64>,
    ppl: Option<f64>,
}

/// One validation point during training; `mean_loss` is over the curve's own (smaller)
/// evaluation set, so it is compared only with other curves, never with the final `domains`.
#[derive(Debug, Deserialize)]
struct EvalCurvePoint {
    step: u64,
    mean_loss: Option<f64>,
    #[serde(default)]
    domains: BTreeMap<String, f64>,
}

/// One target training, read.
#[derive(Debug, Clone)]
struct Run {
    child: String,
    seed: String,
    /// Validation loss (nats per token) and perplexity by domain.
    loss: BTreeMap<String, f64>,
    ppl: BTreeMap<String, f64>,
    /// `(step, mean validation loss)`, by step; empty when the trainer records none.
    curve: Vec<(u64, f64)>,
}

impl Run {
    fn mean_loss(&self) -> f64 {
        mean(self.loss.values().copied())
    }

    fn mean_ppl(&self) -> f64 {
        mean(self.ppl.values().copied())
    }

    fn worst_ppl(&self) -> f64 {
        self.ppl.values().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// `("predict", "0")` from `target[predict,0]`, `("predict", "-")` from `target[predict]`.
fn parse_run_id(child: &str) -> Option<(String, String)> {
    let (_, inner) = child.strip_suffix(']')?.rsplit_once('[')?;
    let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [mixture] if !mixture.is_empty() => Some(((*mixture).to_owned(), "-".to_owned())),
        [mixture, seed] if !mixture.is_empty() && !seed.is_empty() => {
            Some(((*mixture).to_owned(), (*seed).to_owned()))
        }
        _ => None,
    }
}

/// Every run of the `runs` group, by mixture, each mixture's runs by seed.
fn read_runs(
    stage: &str,
    inputs: &BTreeMap<String, InputPath>,
) -> Result<BTreeMap<String, Vec<Run>>, ReportError> {
    let members = match inputs.get("runs") {
        Some(InputPath::Many(members)) => members,
        Some(InputPath::One(_)) => {
            return Err(ReportError::RunsNotFanned {
                stage: stage.into(),
            });
        }
        None => {
            return Err(ReportError::NoRuns {
                stage: stage.into(),
            });
        }
    };
    if members.is_empty() {
        return Err(ReportError::EmptyRuns {
            stage: stage.into(),
        });
    }
    let mut by_mixture: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let mut first: Option<(String, Vec<String>)> = None;
    for (child, dir) in members {
        let (mixture, seed) = parse_run_id(child).ok_or_else(|| ReportError::RunId {
            child: child.clone(),
        })?;
        let runs = by_mixture.entry(mixture.clone()).or_default();
        if let Some(other) = runs.iter().find(|r| r.seed == seed) {
            return Err(ReportError::DuplicateRun {
                first: other.child.clone(),
                second: child.clone(),
                mixture,
                seed,
            });
        }
        let run = read_run(child, seed, dir)?;
        let domains: Vec<String> = run.loss.keys().cloned().collect();
        match &first {
            None => first = Some((child.clone(), domains)),
            Some((other, expected)) if *expected != domains => {
                return Err(ReportError::Domains {
                    run: child.clone(),
                    found: domains.join(", "),
                    other: other.clone(),
                    expected: expected.join(", "),
                });
            }
            Some(_) => {}
        }
        runs.push(run);
    }
    Ok(by_mixture)
}

fn read_run(child: &str, seed: String, dir: &Path) -> Result<Run, ReportError> {
    let path = dir.join("eval.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read {
        run: child.into(),
        path: path.clone(),
        source,
    })?;
    let bad = |message: String| ReportError::Eval {
        run: child.into(),
        path: path.clone(),
        message,
    };
    let eval: EvalFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if eval.domains.is_empty() {
        return Err(bad("`domains` is empty".into()));
    }
    let mut loss = BTreeMap::new();
    let mut ppl = BTreeMap::new();
    for (domain, m) in &eval.domains {
        let (l, p) = match (m.loss, m.ppl) {
            (Some(l), Some(p)) => (l, p),
            (Some(l), None) => (l, l.exp()),
            (None, Some(p)) => (p.ln(), p),
            (None, None) => {
                return Err(bad(format!(
                    "domain `{domain}` has neither `loss` nor `ppl`"
                )));
            }
        };
        if !(l.is_finite() && p.is_finite()) {
            return Err(bad(format!(
                "domain `{domain}` has a non-finite loss ({l}) or perplexity ({p}); did the training diverge?"
            )));
        }
        loss.insert(domain.clone(), l);
        ppl.insert(domain.clone(), p);
    }
    let mut curve = Vec::new();
    for point in eval.curve.unwrap_or_default() {
        let value = match point.mean_loss {
            Some(v) => v,
            None if !point.domains.is_empty() => mean(point.domains.values().copied()),
            None => {
                return Err(bad(format!(
                    "the curve point at step {} has neither `mean_loss` nor `domains`",
                    point.step
                )));
            }
        };
        if !value.is_finite() {
            return Err(bad(format!(
                "the curve's mean loss at step {} is {value}; did the training diverge?",
                point.step
            )));
        }
        curve.push((point.step, value));
    }
    curve.sort_by_key(|(step, _)| *step);
    curve.dedup_by_key(|(step, _)| *step);
    Ok(Run {
        child: child.into(),
        seed,
        loss,
        ppl,
        curve,
    })
}

// ---------------------------------------------------------------------------------------------
// Context inputs

/// A context input's `weights.json`, by what it holds.
#[derive(Debug, Clone)]
enum ContextDoc {
    /// A `ddo` stage: optimal weights at one proxy scale, with the per-domain fits.
    Ddo(Box<DdoReport>),
    /// A `predict` stage: the extrapolated weights at the target scale.
    Prediction(Box<Prediction>),
    /// Anything else with a top-level `weights` map: a `mixture` baseline, a hand-written file.
    Weights(BTreeMap<String, f64>),
}

impl ContextDoc {
    fn weights(&self) -> BTreeMap<String, f64> {
        match self {
            Self::Ddo(r) => r.weights.iter().map(|(d, w)| (d.to_owned(), w)).collect(),
            Self::Prediction(p) => p.weights.iter().map(|(d, w)| (d.to_owned(), w)).collect(),
            Self::Weights(w) => w.clone(),
        }
    }

    /// The total tokens the weights are meant for, when the document says.
    fn scale(&self) -> Option<f64> {
        match self {
            Self::Ddo(r) => r.scale_tokens,
            Self::Prediction(p) => Some(p.total_tokens),
            Self::Weights(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
struct ContextInput {
    /// The input's name, which is the mixture's name in the runs' ids.
    name: String,
    doc: ContextDoc,
    /// A `ddo` stage's `learning.json`: did its base runs learn?
    learning: Option<Learning>,
}

/// The context inputs, recognised by content, and a note for each input that is not one.
fn read_context(inputs: &BTreeMap<String, InputPath>) -> (Vec<ContextInput>, Vec<String>) {
    let mut found = Vec::new();
    let mut notes = Vec::new();
    for (name, input) in inputs {
        if name == "runs" {
            continue;
        }
        let path = match input {
            InputPath::One(path) if path.is_dir() => path.join("weights.json"),
            InputPath::One(path) => path.clone(),
            InputPath::Many(_) => {
                notes.push(format!(
                    "input `{name}` is a fan-out group, not a weights file; ignored"
                ));
                continue;
            }
        };
        let learning = path
            .parent()
            .map(|dir| dir.join("learning.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str(&text).ok());
        match read_context_doc(&path) {
            Ok(doc) => found.push(ContextInput {
                name: name.clone(),
                doc,
                learning,
            }),
            Err(why) => notes.push(format!("input `{name}`: {why}; ignored")),
        }
    }
    (found, notes)
}

fn read_context_doc(path: &Path) -> Result<ContextDoc, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}` ({e})", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|_| format!("`{}` is not JSON", path.display()))?;
    let is_ddo = value["domains"]
        .as_array()
        .and_then(|d| d.first())
        .is_some_and(|d| d.get("fit").is_some());
    let is_prediction = value.get("scales").is_some() && value.get("s").is_some();
    // A document that only looks like one of them is still read as plain weights below.
    if is_ddo && let Ok(report) = serde_json::from_value::<DdoReport>(value.clone()) {
        return Ok(ContextDoc::Ddo(Box::new(report)));
    }
    if is_prediction && let Ok(prediction) = serde_json::from_value::<Prediction>(value.clone()) {
        return Ok(ContextDoc::Prediction(Box::new(prediction)));
    }
    let weights = value["weights"]
        .as_object()
        .ok_or_else(|| format!("`{}` has no top-level `weights` map", path.display()))?;
    let weights: BTreeMap<String, f64> = weights
        .iter()
        .map(|(d, w)| w.as_f64().map(|w| (d.clone(), w)))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("`{}`: a weight is not a number", path.display()))?;
    Ok(ContextDoc::Weights(weights))
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Mean and sample standard deviation over seeds; `sd` is `None` with one seed, so a single
/// run never looks noise-free.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct MeanSd {
    mean: f64,
    sd: Option<f64>,
    n: usize,
}

impl MeanSd {
    fn of(values: &[f64]) -> Self {
        let n = values.len();
        let m = mean(values.iter().copied());
        let sd = (n > 1).then(|| {
            let ss: f64 = values.iter().map(|v| (v - m).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        });
        Self { mean: m, sd, n }
    }

    fn show(&self, digits: usize) -> String {
        match self.sd {
            Some(sd) => format!("{:.digits$} ± {sd:.digits$}", self.mean),
            None => format!("{:.digits$}", self.mean),
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// One mixture over its seeds.
#[derive(Debug, Clone, Serialize)]
struct MixtureSummary {
    name: String,
    runs: Vec<String>,
    seeds: Vec<String>,
    mean_loss: MeanSd,
    mean_ppl: MeanSd,
    worst_ppl: MeanSd,
    domain_loss: BTreeMap<String, MeanSd>,
    /// The seed-averaged validation curve, on the steps every seed evaluated at; `None` when
    /// a seed has no curve.
    #[serde(skip_serializing_if = "Option::is_none")]
    curve: Option<Vec<(u64, f64)>>,
    #[serde(skip)]
    seed_curves: Vec<Vec<(u64, f64)>>,
    /// Each seed's mean validation loss, in `seeds` order.
    #[serde(skip)]
    seed_mean_loss: Vec<f64>,
}

impl MixtureSummary {
    fn of(name: String, runs: &[Run]) -> Self {
        let stat = |f: fn(&Run) -> f64| MeanSd::of(&runs.iter().map(f).collect::<Vec<_>>());
        let domains: BTreeSet<&String> = runs.iter().flat_map(|r| r.loss.keys()).collect();
        let domain_loss = domains
            .into_iter()
            .map(|d| {
                let values: Vec<f64> = runs.iter().filter_map(|r| r.loss.get(d).copied()).collect();
                (d.clone(), MeanSd::of(&values))
            })
            .collect();
        let seed_curves: Vec<Vec<(u64, f64)>> = runs.iter().map(|r| r.curve.clone()).collect();
        Self {
            name,
            runs: runs.iter().map(|r| r.child.clone()).collect(),
            seeds: runs.iter().map(|r| r.seed.clone()).collect(),
            mean_loss: stat(Run::mean_loss),
            mean_ppl: stat(Run::mean_ppl),
            worst_ppl: stat(Run::worst_ppl),
            domain_loss,
            curve: average_curve(&seed_curves),
            seed_curves,
            seed_mean_loss: runs.iter().map(Run::mean_loss).collect(),
        }
    }
}

/// The point-wise mean of the seeds' curves over the steps all of them have; `None` when a
/// seed has no curve or they share no step.
fn average_curve(curves: &[Vec<(u64, f64)>]) -> Option<Vec<(u64, f64)>> {
    if curves.is_empty() || curves.iter().any(Vec::is_empty) {
        return None;
    }
    let mut sums: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for curve in curves {
        for (step, loss) in curve {
            let entry = sums.entry(*step).or_insert((0.0, 0));
            entry.0 += loss;
            entry.1 += 1;
        }
    }
    let averaged: Vec<(u64, f64)> = sums
        .into_iter()
        .filter(|(_, (_, n))| *n == curves.len())
        .map(|(step, (sum, n))| (step, sum / n as f64))
        .collect();
    (!averaged.is_empty()).then_some(averaged)
}

/// The paper's speed-up of the reference over one baseline: the steps the baseline needs to
/// reach the reference's final validation loss, over the reference's steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum SpeedUp {
    Reached {
        reference_loss: f64,
        reference_steps: u64,
        /// Linearly interpolated between the two evaluations that straddle the loss.
        baseline_steps: f64,
        speedup: f64,
        /// The baseline was already there at its first evaluation, so `baseline_steps` is
        /// an upper bound and `speedup` too.
        at_first_evaluation: bool,
    },
    NotReached {
        reference_loss: f64,
        reference_steps: u64,
        /// The baseline's last evaluated step; it needs more than this.
        baseline_steps_above: u64,
        speedup_above: f64,
    },
    Unavailable {
        reason: String,
    },
}

/// The step at which `curve` (sorted by step) first gets down to `target`, interpolating
/// linearly between evaluations; `Err(last step)` when it never does.
fn steps_to_reach(curve: &[(u64, f64)], target: f64) -> Result<(f64, bool), u64> {
    let mut previous: Option<(u64, f64)> = None;
    for &(step, loss) in curve {
        if loss <= target {
            return Ok(match previous {
                None => (step as f64, true),
                Some((s0, l0)) => {
                    let fraction = (l0 - target) / (l0 - loss);
                    (s0 as f64 + fraction * (step - s0) as f64, false)
                }
            });
        }
        previous = Some((step, loss));
    }
    Err(curve.last().map_or(0, |(step, _)| *step))
}

fn speedup(reference: &MixtureSummary, baseline: &MixtureSummary) -> SpeedUp {
    curve_speedup(
        (&reference.name, reference.curve.as_deref()),
        (&baseline.name, baseline.curve.as_deref()),
    )
}

/// [`speedup`] on (mixture name, validation curve) pairs; a missing or empty curve makes it
/// unavailable.
fn curve_speedup(
    (reference, ref_curve): (&str, Option<&[(u64, f64)]>),
    (baseline, base_curve): (&str, Option<&[(u64, f64)]>),
) -> SpeedUp {
    let unavailable = |who: &str| SpeedUp::Unavailable {
        reason: format!(
            "the runs of {who} record no validation curve (`curve` in eval.json; the n-gram proxy, for one, evaluates only at the end), so the steps to reach a loss cannot be read"
        ),
    };
    let Some(&(reference_steps, reference_loss)) = ref_curve.and_then(<[_]>::last) else {
        return unavailable(reference);
    };
    let Some(base_curve) = base_curve.filter(|c| !c.is_empty()) else {
        return unavailable(baseline);
    };
    if reference_steps == 0 {
        return SpeedUp::Unavailable {
            reason: format!("{reference}'s curve ends at step 0"),
        };
    }
    match steps_to_reach(base_curve, reference_loss) {
        Ok((steps, at_first_evaluation)) => SpeedUp::Reached {
            reference_loss,
            reference_steps,
            baseline_steps: steps,
            speedup: steps / reference_steps as f64,
            at_first_evaluation,
        },
        Err(last) => SpeedUp::NotReached {
            reference_loss,
            reference_steps,
            baseline_steps_above: last,
            speedup_above: last as f64 / reference_steps as f64,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The report

/// Everything the report says, computed before anything is written.
#[derive(Debug, Serialize)]
struct Report {
    title: String,
    reference: String,
    names: BTreeMap<String, String>,
    domains: Vec<String>,
    /// By mixture id; the reference is among them.
    mixtures: BTreeMap<String, MixtureSummary>,
    /// The reference against each other mixture, by mixture id.
    comparisons: BTreeMap<String, Comparison>,
    speedups: BTreeMap<String, SpeedUp>,
    /// The speed-up per seed pair and its spread, by mixture id.
    seed_speedups: BTreeMap<String, SeedSpeedUps>,
    /// One line that says whether the reference beat each baseline beyond seed noise.
    verdict: String,
    /// Every context input's weights, by its display name.
    weights: BTreeMap<String, BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_tokens: Option<f64>,
    notes: Vec<String>,
    #[serde(skip)]
    context: Vec<ContextInput>,
    /// Weight columns in reading order: (label, input index).
    #[serde(skip)]
    weight_columns: Vec<(String, usize)>,
}

/// The reference minus a baseline: negative is better for the reference.
#[derive(Debug, Clone, Serialize)]
struct Comparison {
    mean_loss_diff: f64,
    mean_ppl_diff: f64,
    mean_ppl_diff_percent: f64,
    worst_ppl_diff: f64,
    /// The loss difference is smaller than either side's seed sd.
    within_seed_noise: bool,
    /// Welch's t-test on the seeds' mean losses; `None` without two seeds on each side.
    #[serde(skip_serializing_if = "Option::is_none")]
    welch: Option<Welch>,
}

/// Welch's unequal-variance t-test of two samples: `t = (m1 - m2) / sqrt(s1²/n1 + s2²/n2)`,
/// Welch–Satterthwaite degrees of freedom, two-sided p-value from Student's t.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Welch {
    t: f64,
    df: f64,
    p: f64,
}

/// The p-value below which the report calls a difference significant.
const SIGNIFICANCE: f64 = 0.05;

impl Welch {
    fn of(a: &[f64], b: &[f64]) -> Option<Self> {
        use statrs::distribution::{ContinuousCDF, StudentsT};
        let (ma, mb) = (MeanSd::of(a), MeanSd::of(b));
        let (sa, sb) = (ma.sd?, mb.sd?);
        let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
        let se2 = va + vb;
        if !(se2 > 0.0 && se2.is_finite()) {
            // Both sides without spread: identical seeds, nothing to test.
            return None;
        }
        let t = (ma.mean - mb.mean) / se2.sqrt();
        let df = se2 * se2 / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
        let dist = StudentsT::new(0.0, 1.0, df).ok()?;
        let p = (2.0 * dist.cdf(-t.abs())).min(1.0);
        Some(Self { t, df, p })
    }

    fn significant(&self) -> bool {
        self.p < SIGNIFICANCE
    }
}

impl Comparison {
    fn of(reference: &MixtureSummary, baseline: &MixtureSummary) -> Self {
        let mean_loss_diff = reference.mean_loss.mean - baseline.mean_loss.mean;
        let mean_ppl_diff = reference.mean_ppl.mean - baseline.mean_ppl.mean;
        let noise = [reference.mean_loss.sd, baseline.mean_loss.sd]
            .into_iter()
            .flatten()
            .fold(0.0, f64::max);
        Self {
            mean_loss_diff,
            mean_ppl_diff,
            mean_ppl_diff_percent: 100.0 * mean_ppl_diff / baseline.mean_ppl.mean,
            worst_ppl_diff: reference.worst_ppl.mean - baseline.worst_ppl.mean,
            within_seed_noise: mean_loss_diff.abs() < noise,
            welch: Welch::of(&reference.seed_mean_loss, &baseline.seed_mean_loss),
        }
    }

    /// `p = 0.031 (Welch t = -3.10, df 3.9)`, or why there is no test.
    fn test_phrase(&self) -> String {
        match &self.welch {
            Some(w) => format!("p = {:.3} (Welch t = {:.2}, df {:.1})", w.p, w.t, w.df),
            None => "no significance test (fewer than two seeds on a side)".to_owned(),
        }
    }
}

/// The paper's speed-up computed per seed (the reference's seed k against the baseline's seed
/// k), so that its spread over seeds is known.
#[derive(Debug, Clone, Serialize)]
struct SeedSpeedUps {
    /// Seed -> that seed's speed-up.
    per_seed: BTreeMap<String, SpeedUp>,
    /// Mean and sd over the seeds where the baseline reached the reference's loss.
    reached: Option<MeanSd>,
    /// Seeds where the baseline never reached it within its run.
    not_reached: usize,
}

impl SeedSpeedUps {
    fn of(reference: &MixtureSummary, baseline: &MixtureSummary) -> Self {
        let mut per_seed = BTreeMap::new();
        for (i, seed) in reference.seeds.iter().enumerate() {
            let Some(j) = baseline.seeds.iter().position(|s| s == seed) else {
                continue;
            };
            per_seed.insert(
                seed.clone(),
                curve_speedup(
                    (&reference.name, Some(&reference.seed_curves[i])),
                    (&baseline.name, Some(&baseline.seed_curves[j])),
                ),
            );
        }
        let values: Vec<f64> = per_seed
            .values()
            .filter_map(|s| match s {
                SpeedUp::Reached { speedup, .. } => Some(*speedup),
                _ => None,
            })
            .collect();
        Self {
            reached: (!values.is_empty()).then(|| MeanSd::of(&values)),
            not_reached: per_seed
                .values()
                .filter(|s| matches!(s, SpeedUp::NotReached { .. }))
                .count(),
            per_seed,
        }
    }

    fn show(&self) -> String {
        let mut out = match &self.reached {
            Some(m) => format!("{}x over {} seed(s)", m.show(2), m.n),
            None => "n/a".to_owned(),
        };
        if self.not_reached > 0 {
            out.push_str(&format!(
                "; {} seed(s) never reached it (speed-up above their run's length)",
                self.not_reached
            ));
        }
        out
    }
}

impl Report {
    fn build(
        params: &ReportParams,
        runs: BTreeMap<String, Vec<Run>>,
        (context, notes): (Vec<ContextInput>, Vec<String>),
    ) -> Result<Self, ReportError> {
        if !runs.contains_key(&params.reference) {
            return Err(ReportError::NoReference {
                reference: params.reference.clone(),
                mixtures: runs
                    .keys()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let domains: Vec<String> = runs
            .values()
            .flatten()
            .next()
            .map(|r| r.loss.keys().cloned().collect())
            .unwrap_or_default();
        let mixtures: BTreeMap<String, MixtureSummary> = runs
            .iter()
            .map(|(m, runs)| (m.clone(), MixtureSummary::of(params.display(m), runs)))
            .collect();
        let reference = &mixtures[&params.reference];
        let mut comparisons = BTreeMap::new();
        let mut speedups = BTreeMap::new();
        let mut seed_speedups = BTreeMap::new();
        for (m, summary) in &mixtures {
            if *m != params.reference {
                comparisons.insert(m.clone(), Comparison::of(reference, summary));
                speedups.insert(m.clone(), speedup(reference, summary));
                seed_speedups.insert(m.clone(), SeedSpeedUps::of(reference, summary));
            }
        }
        let verdict = verdict(reference, &mixtures, &comparisons);
        // DDO scales smallest first, then predictions, then the rest by input name.
        let mut order: Vec<usize> = (0..context.len()).collect();
        order.sort_by(|&a, &b| {
            let rank = |c: &ContextInput| match c.doc {
                ContextDoc::Ddo(_) => 0,
                ContextDoc::Prediction(_) => 1,
                ContextDoc::Weights(_) => 2,
            };
            let (ca, cb) = (&context[a], &context[b]);
            rank(ca)
                .cmp(&rank(cb))
                .then(
                    ca.doc
                        .scale()
                        .unwrap_or(0.0)
                        .total_cmp(&cb.doc.scale().unwrap_or(0.0)),
                )
                .then(ca.name.cmp(&cb.name))
        });
        let mut weights = BTreeMap::new();
        let mut weight_columns = Vec::new();
        for i in order {
            let c = &context[i];
            let label = match c.doc.scale() {
                Some(tokens) => format!("{} @ {}", params.display(&c.name), tokens_label(tokens)),
                None => params.display(&c.name),
            };
            // The plain display name too, so scripts find `weights.AutoScale` without the scale.
            weights.insert(params.display(&c.name), c.doc.weights());
            weight_columns.push((label, i));
        }
        let target_tokens = context.iter().find_map(|c| match &c.doc {
            ContextDoc::Prediction(p) => Some(p.total_tokens),
            _ => None,
        });
        Ok(Self {
            title: params.title.clone(),
            reference: params.reference.clone(),
            names: params.names.clone(),
            domains,
            mixtures,
            comparisons,
            speedups,
            seed_speedups,
            verdict,
            weights,
            target_tokens,
            notes,
            context,
            weight_columns,
        })
    }

    /// The mixtures in reading order: the reference, then the others by mean loss.
    fn ordered(&self) -> Vec<(&String, &MixtureSummary)> {
        let mut rest: Vec<_> = self
            .mixtures
            .iter()
            .filter(|(m, _)| **m != self.reference)
            .collect();
        rest.sort_by(|a, b| a.1.mean_loss.mean.total_cmp(&b.1.mean_loss.mean));
        let mut all: Vec<_> = self
            .mixtures
            .iter()
            .filter(|(m, _)| **m == self.reference)
            .collect();
        all.extend(rest);
        all
    }

    /// Writes every file; returns the names of the plots drawn.
    fn write(&self, out_dir: &Path) -> Result<Vec<&'static str>, ReportError> {
        crate::font::ensure_registered()?;
        let mut figures: Vec<(&'static str, String, plots::Rendered)> = Vec::new();
        let ddo: Vec<(String, &DdoReport)> = self
            .weight_columns
            .iter()
            .filter_map(|(label, i)| match &self.context[*i].doc {
                ContextDoc::Ddo(r) => Some((label.clone(), r.as_ref())),
                _ => None,
            })
            .collect();
        if !ddo.is_empty() {
            let caption = "DDO's fits: each domain's objective ratio against the multiplier of its base tokens, at each proxy scale (dots: proxy runs; line: the fitted shifted power law (x + a)^(-b) + c; cross: the optimum)".to_owned();
            figures.push((
                "fits",
                caption,
                plots::render(&plots::FitsFigure { scales: &ddo })?,
            ));
        }
        if !self.weight_columns.is_empty() {
            let columns: Vec<(String, BTreeMap<String, f64>)> = self
                .weight_columns
                .iter()
                .map(|(label, i)| (label.clone(), self.context[*i].doc.weights()))
                .collect();
            let prediction = self.context.iter().find_map(|c| match &c.doc {
                ContextDoc::Prediction(p) => Some(p.as_ref()),
                _ => None,
            });
            let ddo_points: Vec<(f64, BTreeMap<String, f64>)> = ddo
                .iter()
                .filter_map(|(_, r)| {
                    let scale = r.scale_tokens?;
                    Some((
                        scale,
                        r.weights.iter().map(|(d, w)| (d.to_owned(), w)).collect(),
                    ))
                })
                .collect();
            let caption = if prediction.is_some() {
                "Mixture weights: top, each source's weights by domain; bottom, the predicted optimal weights along AutoScale's fitted path against the total tokens (dots: DDO's optima at the proxy scales; triangles: the prediction at the target)"
            } else {
                "Mixture weights of each source by domain"
            };
            figures.push((
                "weights",
                caption.to_owned(),
                plots::render(&plots::WeightsFigure {
                    domains: self.weight_domains(),
                    columns,
                    prediction,
                    ddo_points,
                })?,
            ));
        }
        let curves: Vec<plots::CurveSeries> = self
            .ordered()
            .into_iter()
            .filter(|(_, s)| s.seed_curves.iter().any(|c| !c.is_empty()))
            .map(|(_, s)| plots::CurveSeries {
                label: s.name.clone(),
                seeds: s.seed_curves.clone(),
                mean: s.curve.clone(),
            })
            .collect();
        if !curves.is_empty() {
            let reference = &self.mixtures[&self.reference];
            let reference_final = reference
                .curve
                .as_ref()
                .and_then(|c| c.last())
                .map(|(_, l)| (reference.name.clone(), *l));
            let caption = "Validation mean loss of the target trainings against the step (thick: the mean over seeds; thin: each seed; dashed: the reference's final loss, which the speed-up is measured to)".to_owned();
            figures.push((
                "curves",
                caption,
                plots::render(&plots::CurvesFigure {
                    series: curves,
                    reference_final,
                })?,
            ));
        }
        for (name, _, rendered) in &figures {
            write_file(
                &out_dir.join(format!("{name}.svg")),
                rendered.svg.as_bytes(),
            )?;
            write_file(&out_dir.join(format!("{name}.png")), &rendered.png)?;
        }
        let plot_names: Vec<&'static str> = figures.iter().map(|(n, _, _)| *n).collect();
        let doc = self.document(figures);
        write_file(&out_dir.join("report.md"), doc.markdown().as_bytes())?;
        write_file(&out_dir.join("report.html"), doc.html().as_bytes())?;
        let serialize_failed = |e: serde_json::Error| ReportError::Serialize {
            file: "results.json",
            message: e.to_string(),
        };
        let mut results = serde_json::to_value(self).map_err(serialize_failed)?;
        results["plots"] = json!(plot_names);
        let mut bytes = serde_json::to_vec_pretty(&results).map_err(serialize_failed)?;
        bytes.push(b'\n');
        write_file(&out_dir.join("results.json"), &bytes)?;
        Ok(plot_names)
    }

    /// The domains of the weights: the evaluation domains first, then any others.
    fn weight_domains(&self) -> Vec<String> {
        let mut domains = self.domains.clone();
        for (_, i) in &self.weight_columns {
            for d in self.context[*i].doc.weights().into_keys() {
                if !domains.contains(&d) {
                    domains.push(d);
                }
            }
        }
        domains
    }

    /// Per DDO scale, the base runs' held-out loss against each domain's unigram entropy.
    fn learning_section(&self, doc: &mut Document) {
        let scales: Vec<(&String, &Learning)> = self
            .weight_columns
            .iter()
            .filter_map(|(label, i)| self.context[*i].learning.as_ref().map(|l| (label, l)))
            .collect();
        if scales.is_empty() {
            return;
        }
        doc.heading(2, "Did the proxies learn?");
        doc.paragraph(format!(
            "DDO reads how the loss responds to each domain's data, which is noise until the proxies have learned more than token frequencies. The base runs' held-out loss (mean over base seeds, nats per token) against each domain's unigram entropy on its own training tokens; the check asks for a mean at least {} nats below.",
            crate::learning::REQUIRED_MARGIN
        ));
        let domains: BTreeSet<&String> =
            scales.iter().flat_map(|(_, l)| l.domains.keys()).collect();
        let mut header = vec!["domain".to_owned(), "unigram entropy".to_owned()];
        header.extend(
            scales
                .iter()
                .map(|(label, _)| format!("base loss, {label}")),
        );
        let mut rows: Vec<Vec<String>> = domains
            .iter()
            .map(|d| {
                let unigram = scales
                    .iter()
                    .find_map(|(_, l)| l.domains.get(*d))
                    .map_or("—".into(), |x| format!("{:.3}", x.unigram));
                let mut row = vec![(*d).clone(), unigram];
                row.extend(scales.iter().map(|(_, l)| {
                    l.domains
                        .get(*d)
                        .map_or("—".into(), |x| format!("{:.3}", x.loss))
                }));
                row
            })
            .collect();
        let mut mean_row = vec![
            "**mean**".to_owned(),
            format!("{:.3}", scales[0].1.unigram_mean),
        ];
        mean_row.extend(
            scales
                .iter()
                .map(|(_, l)| format!("{:.3} ({:+.3})", l.base_mean_loss, -l.margin)),
        );
        rows.push(mean_row);
        doc.table(header, rows);
        doc.bullets(
            scales
                .iter()
                .map(|(label, l)| format!("{label}: {}", l.summary()))
                .collect(),
        );
    }

    fn document(&self, figures: Vec<(&'static str, String, plots::Rendered)>) -> Document {
        let mut doc = Document::new(self.title.clone());
        let reference = &self.mixtures[&self.reference];
        let ordered = self.ordered();
        let n_runs: usize = self.mixtures.values().map(|s| s.runs.len()).sum();
        let mut intro = format!(
            "{n_runs} target runs: {} mixtures, evaluated on {} validation domains ({}). The reference is **{}** (`{}`).",
            self.mixtures.len(),
            self.domains.len(),
            self.domains.join(", "),
            reference.name,
            self.reference
        );
        if let Some(tokens) = self.target_tokens {
            intro.push_str(&format!(
                " AutoScale predicted its weights for {} training tokens.",
                tokens_label(tokens)
            ));
        }
        doc.paragraph(intro);
        doc.paragraph(format!("**Verdict.** {}", self.verdict));

        doc.heading(2, "Validation loss at the target scale");
        doc.paragraph(
            "Mean over domains of the per-domain validation loss (nats per token) and of the per-domain perplexity (DDO's default objective), and the worst domain's perplexity; mean ± sd over seeds.",
        );
        let rows = ordered
            .iter()
            .map(|(_, s)| {
                vec![
                    s.name.clone(),
                    s.seeds.len().to_string(),
                    s.mean_loss.show(4),
                    s.mean_ppl.show(3),
                    s.worst_ppl.show(2),
                ]
            })
            .collect();
        doc.table(
            ["mixture", "seeds", "mean loss", "mean ppl", "worst ppl"]
                .map(String::from)
                .to_vec(),
            rows,
        );

        doc.heading(2, format!("{} against each baseline", reference.name));
        let mut items = Vec::new();
        for (m, s) in ordered.iter().skip(1) {
            let c = &self.comparisons[*m];
            let verdict = if c.within_seed_noise {
                "within seed noise"
            } else if c.mean_loss_diff < 0.0 {
                "better"
            } else {
                "worse"
            };
            items.push(format!(
                "vs {}: mean loss {:+.4} nats ({} vs {}, {verdict}; {}); mean ppl {:+.3} ({:+.2}%); worst ppl {:+.2}; {}",
                s.name,
                c.mean_loss_diff,
                reference.mean_loss.show(4),
                s.mean_loss.show(4),
                c.test_phrase(),
                c.mean_ppl_diff,
                c.mean_ppl_diff_percent,
                c.worst_ppl_diff,
                speedup_phrase(&self.speedups[*m], &reference.name, &s.name),
            ));
        }
        doc.bullets(items);
        if let Some(uniform) = self
            .mixtures
            .get("uniform")
            .filter(|_| self.reference != "uniform")
        {
            let c = &self.comparisons["uniform"];
            if c.mean_loss_diff >= 0.0 {
                doc.paragraph(format!(
                    "**{} does not beat {} here**: its mean validation loss is {} against {}.",
                    reference.name,
                    uniform.name,
                    reference.mean_loss.show(4),
                    uniform.mean_loss.show(4)
                ));
            } else if c.within_seed_noise {
                doc.paragraph(format!(
                    "**{} beats {} by less than the seed noise**: {} against {}; more seeds would tell.",
                    reference.name,
                    uniform.name,
                    reference.mean_loss.show(4),
                    uniform.mean_loss.show(4)
                ));
            }
        }
        if ordered.iter().all(|(_, s)| s.seeds.len() < 2) {
            doc.paragraph("Each mixture has one seed, so there is no estimate of the seed noise.");
        }

        doc.heading(2, "Speed-up");
        if self
            .speedups
            .values()
            .all(|s| matches!(s, SpeedUp::Unavailable { .. }))
        {
            let reason = self
                .speedups
                .values()
                .find_map(|s| match s {
                    SpeedUp::Unavailable { reason } => Some(reason.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "there is no baseline to compare with".into());
            doc.paragraph(format!("Not available: {reason}."));
        } else {
            doc.paragraph(format!(
                "The paper's metric: the training steps a baseline needs to reach {}'s final validation mean loss, over {}'s steps, read by linear interpolation on the seed-averaged validation curves (whose evaluation set may be smaller than the final evaluation's).",
                reference.name, reference.name
            ));
            let rows = ordered
                .iter()
                .skip(1)
                .map(|(m, s)| {
                    let (steps, factor) = match &self.speedups[*m] {
                        SpeedUp::Reached {
                            baseline_steps,
                            speedup,
                            at_first_evaluation,
                            ..
                        } => {
                            let bound = if *at_first_evaluation { "≤ " } else { "" };
                            (
                                format!("{bound}{baseline_steps:.0}"),
                                format!("{bound}{speedup:.2}x"),
                            )
                        }
                        SpeedUp::NotReached {
                            baseline_steps_above,
                            speedup_above,
                            ..
                        } => (
                            format!("not reached within {baseline_steps_above}"),
                            format!("> {speedup_above:.2}x"),
                        ),
                        SpeedUp::Unavailable { .. } => ("no curve".into(), "n/a".into()),
                    };
                    vec![s.name.clone(), steps, factor, self.seed_speedups[*m].show()]
                })
                .collect();
            let (ref_steps, ref_loss) = reference
                .curve
                .as_ref()
                .and_then(|c| c.last().copied())
                .map_or(("?".to_owned(), f64::NAN), |(s, l)| (s.to_string(), l));
            doc.table(
                vec![
                    "baseline".into(),
                    format!(
                        "steps to {}'s final loss {ref_loss:.4} (at step {ref_steps})",
                        reference.name
                    ),
                    "speed-up".into(),
                    "per seed pair, mean ± sd".into(),
                ],
                rows,
            );
        }

        doc.heading(2, "Per-domain validation loss");
        doc.paragraph("Loss in nats per token, mean ± sd over seeds; lowest per domain in bold.");
        let mut header = vec!["domain".to_owned()];
        header.extend(ordered.iter().map(|(_, s)| s.name.clone()));
        let rows = self
            .domains
            .iter()
            .map(|d| {
                let best = ordered
                    .iter()
                    .filter_map(|(_, s)| s.domain_loss.get(d).map(|x| x.mean))
                    .fold(f64::INFINITY, f64::min);
                let mut row = vec![d.clone()];
                row.extend(ordered.iter().map(|(_, s)| match s.domain_loss.get(d) {
                    Some(x) if x.mean == best && ordered.len() > 1 => format!("**{}**", x.show(4)),
                    Some(x) => x.show(4),
                    None => "—".into(),
                }));
                row
            })
            .collect();
        doc.table(header, rows);

        if !self.weight_columns.is_empty() {
            doc.heading(2, "Mixture weights");
            let mut header = vec!["domain".to_owned()];
            header.extend(self.weight_columns.iter().map(|(label, _)| label.clone()));
            let columns: Vec<BTreeMap<String, f64>> = self
                .weight_columns
                .iter()
                .map(|(_, i)| self.context[*i].doc.weights())
                .collect();
            let rows = self
                .weight_domains()
                .into_iter()
                .map(|d| {
                    let mut row = vec![d.clone()];
                    row.extend(
                        columns
                            .iter()
                            .map(|w| w.get(&d).map_or("—".into(), |w| format!("{w:.3}"))),
                    );
                    row
                })
                .collect();
            doc.table(header, rows);
        }

        let ddo: Vec<(&String, &DdoReport)> = self
            .weight_columns
            .iter()
            .filter_map(|(label, i)| match &self.context[*i].doc {
                ContextDoc::Ddo(r) => Some((label, r.as_ref())),
                _ => None,
            })
            .collect();
        if !ddo.is_empty() {
            self.learning_section(&mut doc);
            doc.heading(2, "DDO at each proxy scale: noise, fits, weights");
            for (label, r) in &ddo {
                let sigma = match r.noise.sigma {
                    Some(sigma) => format!(
                        "σ = {sigma:.4} (sd of the {} base runs' objective over their mean, the unit of y)",
                        r.noise.base_runs
                    ),
                    None => "σ not measured".to_owned(),
                };
                doc.paragraph(format!("**{label}**: {sigma}. {}", r.noise.note));
            }
            doc.paragraph(
                "Per domain and proxy scale: the shifted power law y(x) = (x + a)^(-b) + c fitted to the objective ratio against the multiplier x of the domain's base tokens (and the other exact interpolant of the three points, when there is one), the signal-to-noise |y(r_hi) - y(r_lo)| / σ, the optimal multiplier and the weight with its 5–95% parametric-bootstrap interval.",
            );
            let curve = |c: Option<autoscale_mixture::PowerCurve>| {
                c.map_or_else(
                    || "—".to_owned(),
                    |f| format!("({:.3}, {:.3}, {:.3})", f.a, f.b, f.c),
                )
            };
            let rows = ddo
                .iter()
                .flat_map(|(label, r)| {
                    r.domains.iter().map(move |d| {
                        let mut flags = Vec::new();
                        if d.flat {
                            flags.push("flat: no measurable benefit");
                        } else if d.on_bound {
                            flags.push("on the bound");
                        }
                        if d.within_noise {
                            flags.push("within noise");
                        }
                        vec![
                            d.name.clone(),
                            (*label).clone(),
                            curve(d.fit),
                            curve(d.alternate),
                            d.snr.map_or_else(|| "—".to_owned(), |x| format!("{x:.1}")),
                            format!("{:.3}", d.multiplier),
                            weight_with_interval(d.weight, d.interval),
                            flags.join(", "),
                        ]
                    })
                })
                .collect();
            doc.table(
                [
                    "domain",
                    "scale",
                    "fit (a, b, c)",
                    "alternate",
                    "snr",
                    "optimal x",
                    "weight [5–95%]",
                    "flags",
                ]
                .map(String::from)
                .to_vec(),
                rows,
            );
            let warnings: Vec<String> = ddo
                .iter()
                .flat_map(|(label, r)| r.warnings.iter().map(move |w| format!("{label}: {w}")))
                .collect();
            doc.bullets(warnings);
        }
        if let Some(prediction) = self.context.iter().find_map(|c| match &c.doc {
            ContextDoc::Prediction(p) => Some(p),
            _ => None,
        }) {
            doc.heading(2, "The prediction");
            let mut text = format!(
                "AutoScale's weights for {} tokens, with the 5–95% interval of each weight from refitting DDO on resampled proxy results at every input scale and predicting again",
                tokens_label(prediction.total_tokens)
            );
            match &prediction.bootstrap {
                Some(b) => text.push_str(&format!(" ({} resamples).", b.resamples)),
                None => text.push_str(": not available (the inputs carry no noise estimate)."),
            }
            doc.paragraph(text);
            let rows = prediction
                .domains
                .iter()
                .map(|d| {
                    vec![
                        d.name.clone(),
                        weight_with_interval(d.weight, d.interval),
                        format!("{:.3e}", d.tokens),
                        if d.censored {
                            "censored (on the bound at an input scale)"
                        } else {
                            ""
                        }
                        .to_owned(),
                    ]
                })
                .collect();
            doc.table(
                ["domain", "weight [5–95%]", "tokens", "note"]
                    .map(String::from)
                    .to_vec(),
                rows,
            );
            doc.bullets(prediction.warnings.clone());
        }

        if !figures.is_empty() {
            doc.heading(2, "Plots");
            doc.paragraph("Each plot is also written as PNG beside this report.");
            for (name, caption, rendered) in figures {
                doc.figure(format!("{name}.svg"), caption, rendered.svg);
            }
        }
        if !self.notes.is_empty() {
            doc.heading(2, "Notes");
            doc.bullets(self.notes.clone());
        }
        doc
    }
}

/// `0.143 [0.101, 0.190]`, or the weight alone without an interval.
fn weight_with_interval(weight: f64, interval: Option<[f64; 2]>) -> String {
    match interval {
        Some([lo, hi]) => format!("{weight:.3} [{lo:.3}, {hi:.3}]"),
        None => format!("{weight:.3}"),
    }
}

/// One honest line: against which baselines the reference is better, worse or
/// indistinguishable, by Welch's test at [`SIGNIFICANCE`] (or the seed sd without seeds).
fn verdict(
    reference: &MixtureSummary,
    mixtures: &BTreeMap<String, MixtureSummary>,
    comparisons: &BTreeMap<String, Comparison>,
) -> String {
    let (mut better, mut worse, mut tied) = (Vec::new(), Vec::new(), Vec::new());
    for (m, c) in comparisons {
        let name = mixtures.get(m).map_or(m.as_str(), |s| s.name.as_str());
        let phrase = format!(
            "{name} ({:+.4} nats, {})",
            c.mean_loss_diff,
            c.test_phrase()
        );
        let significant = match &c.welch {
            Some(w) => w.significant(),
            None => !c.within_seed_noise && reference.seeds.len() > 1,
        };
        match (significant, c.mean_loss_diff < 0.0) {
            (true, true) => better.push(phrase),
            (true, false) => worse.push(phrase),
            (false, _) => tied.push(phrase),
        }
    }
    if comparisons.is_empty() {
        return format!(
            "Only {} was trained; there is nothing to compare.",
            reference.name
        );
    }
    let mut parts = Vec::new();
    if !better.is_empty() {
        parts.push(format!("beats {}", better.join(", ")));
    }
    if !worse.is_empty() {
        parts.push(format!("loses to {}", worse.join(", ")));
    }
    if !tied.is_empty() {
        parts.push(format!(
            "is not distinguishable from {} at p < {SIGNIFICANCE}",
            tied.join(", ")
        ));
    }
    format!("{} {}.", reference.name, parts.join("; "))
}

fn speedup_phrase(s: &SpeedUp, reference: &str, baseline: &str) -> String {
    match s {
        SpeedUp::Reached {
            reference_loss,
            reference_steps,
            baseline_steps,
            speedup,
            at_first_evaluation,
        } => {
            let bound = if *at_first_evaluation { "at most " } else { "" };
            format!(
                "speed-up {bound}{speedup:.2}x ({baseline} reaches {reference}'s final loss {reference_loss:.4} at step {bound}{baseline_steps:.0}, {reference} at {reference_steps})"
            )
        }
        SpeedUp::NotReached {
            reference_loss,
            reference_steps,
            baseline_steps_above,
            speedup_above,
        } => format!(
            "speed-up > {speedup_above:.2}x ({baseline} does not reach {reference}'s final loss {reference_loss:.4} within its {baseline_steps_above} steps; {reference} reaches it at {reference_steps})"
        ),
        SpeedUp::Unavailable { .. } => "speed-up not available (no validation curve)".into(),
    }
}

/// `1.5e6` style: token counts span decades, and the proxy's "tokens" may be bytes, so no unit.
fn tokens_label(tokens: f64) -> String {
    format!("{tokens:.1e}")
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
