//! The AutoScale mixture stages, run in-process on the CPU: `ddo_plan` lists DDO's proxy runs
//! and fans them out, `ddo` turns their evaluations into the optimal weights at one scale,
//! `predict` extrapolates optimal weights to a larger scale, and `mixture` gives baseline
//! weights. The math is `autoscale_mixture`'s; this module checks params, reads inputs, writes
//! outputs and draws the plots.
//!
//! | kind | writes |
//! |---|---|
//! | `ddo_plan` | `plan.json` (the runs), `fanout.json` (one child stage per run) |
//! | `ddo` | `weights.json` (the DDO report), `results.csv` (for `autoscale mix ddo`), `fits.svg` |
//! | `predict` | `weights.json` (the prediction), `prediction.svg` |
//! | `mixture` | `weights.json`: `{"method": ..., "weights": {...}}` |
//!
//! Every `weights.json` has a top-level `weights` map, so any of them can be handed to a
//! trainer, to `predict`, or to `autoscale mix predict --at TOKENS=weights.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use autoscale_engine::{
    FanoutChild, Implementation, InputPath, ParamSpec, ParamType, StageContext, StageError,
    StageKind,
};
use autoscale_mixture::{
    BootstrapOptions, DdoOptions, DdoReport, FlatPolicy, MixError, MixtureWeights, Objective,
    PlanOptions, PlannedRun, Prediction, Replicate, ScaleComposition, Target, TokenQuantities,
    baselines,
};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::data::ShardManifest;
use crate::learning::Learning;
use autoscale_errors::Hint;

// ---------------------------------------------------------------------------------------------
// ddo_plan

/// `ddo_plan`: the `1 + m * multipliers` proxy runs of DDO at one scale, as a fan-out.
pub struct DdoPlanKind;

const DDO_PLAN_PARAMS: &[ParamSpec] = &[
    ParamSpec::required(
        "domains",
        ParamType::List,
        "the domains to mix, e.g. [books, c4, github]",
    ),
    ParamSpec::required(
        "base_tokens",
        ParamType::Float,
        "total training tokens of the base proxy run",
    ),
    ParamSpec::optional(
        "multipliers",
        ParamType::List,
        "factors applied to one domain's tokens per run [default: [0.2, 3]]",
    ),
    ParamSpec::optional(
        "base_weights",
        ParamType::Map,
        "the base run's composition, domain: weight [default: uniform]",
    ),
    ParamSpec::optional(
        "base_seeds",
        ParamType::Int,
        "replicates of the base run with seeds seed, seed+1, ...; 2 or more measure the noise [default: 1]",
    ),
    ParamSpec::optional(
        "seed",
        ParamType::Int,
        "the training seed of the first base run and of every perturbed run [default: 0]",
    ),
    ParamSpec::optional(
        "replicate",
        ParamType::String,
        "what the base replicates redraw: `seed` (init and data) or `data` (data_seed only; the perturbed runs' own noise) [default: seed]",
    ),
];

/// `plan.json`: what `ddo_plan` hands to `ddo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DdoPlanFile {
    pub domains: Vec<String>,
    pub base_tokens: f64,
    pub multipliers: Vec<f64>,
    /// As given; `None` is uniform.
    pub base_weights: Option<MixtureWeights>,
    #[serde(default = "one_seed")]
    pub base_seeds: u32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub replicate: Replicate,
    /// Each run's `id` is its fan-out id: letters, digits, `_`, `-` and `.` only.
    pub runs: Vec<PlannedRun>,
}

fn one_seed() -> u32 {
    1
}

impl StageKind for DdoPlanKind {
    fn name(&self) -> &'static str {
        "ddo_plan"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::DDO_PLAN
    }

    fn summary(&self) -> &'static str {
        "plans DDO's proxy runs (base, then each domain scaled) and fans them out"
    }

    fn params(&self) -> &[ParamSpec] {
        DDO_PLAN_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        ddo_plan(params).map(|_| ()).map_err(|e| e.to_string())
    }

    fn planned_fanout(
        &self,
        params: &Map<String, Value>,
    ) -> Option<Result<Vec<FanoutChild>, String>> {
        let children = ddo_plan(params)
            .map_err(|e| e.to_string())
            .and_then(|plan| {
                plan.runs
                    .iter()
                    .map(|r| serde_json::from_value(fanout_child(r)).map_err(|e| e.to_string()))
                    .collect()
            });
        Some(children)
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let plan = ddo_plan(ctx.params)?;
        let children: Vec<Value> = plan.runs.iter().map(fanout_child).collect();
        write_json(&ctx.out_dir, "plan.json", &plan)?;
        write_json(
            &ctx.out_dir,
            "fanout.json",
            &json!({ "children": children }),
        )?;
        let ids: Vec<&str> = plan.runs.iter().map(|r| r.id.as_str()).collect();
        Ok(json!({ "runs": ids }))
    }
}

fn ddo_plan(params: &Map<String, Value>) -> Result<DdoPlanFile, StageError> {
    let domains = strings(params, "domains")?.unwrap_or_default();
    let base_tokens = float(params, "base_tokens")?.unwrap_or(0.0);
    let multipliers = floats(params, "multipliers")?.unwrap_or_else(|| vec![0.2, 3.0]);
    let base_weights = float_map(params, "base_weights")?
        .map(MixtureWeights::normalized)
        .transpose()
        .map_err(|e| mix_failure("`base_weights`", &e))?;
    let base_seeds = count(params, "base_seeds", 1)?.unwrap_or(1);
    let base_seeds = u32::try_from(base_seeds).map_err(|_| {
        param_error(format!(
            "`base_seeds` is {base_seeds}; that is too many runs"
        ))
    })?;
    // The plan's runs become stages: refuse a plan past the fan-out cap before building it.
    let runs =
        (base_seeds as usize).saturating_add(domains.len().saturating_mul(multipliers.len()));
    if runs > autoscale_engine::pipeline::MAX_FANOUT {
        return Err(StageError::Failed {
            message: format!(
                "the DDO plan has {runs} runs ({base_seeds} base seeds + {} domains × {} multipliers), more than the {} one stage may fan out to",
                domains.len(),
                multipliers.len(),
                autoscale_engine::pipeline::MAX_FANOUT
            ),
            hint: Some(
                "lower `base_seeds`, or split the domains over several ddo_plan stages".into(),
            ),
        });
    }
    let seed = count(params, "seed", 0)?.unwrap_or(0);
    let replicate = match string(params, "replicate")? {
        Some(name) => name
            .parse::<Replicate>()
            .map_err(|e| param_error(format!("`replicate`: {e}")))?,
        None => Replicate::default(),
    };
    let options = PlanOptions {
        multipliers: multipliers.clone(),
        base_weights: base_weights.clone(),
        base_seeds,
        seed,
        replicate,
    };
    let mut runs = autoscale_mixture::plan(&domains, base_tokens, &options)
        .map_err(|e| mix_failure("cannot plan the DDO runs", &e))?;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for run in &mut runs {
        run.id = run_id(run);
        let name = run.perturbed.clone().unwrap_or_else(|| "base".to_owned());
        if let Some(other) = seen.insert(run.id.clone(), name.clone()) {
            return Err(StageError::Failed {
                message: format!(
                    "domains `{other}` and `{name}` both give the run id `{}`",
                    run.id
                ),
                hint: Some(
                    "run ids keep letters, digits, `_`, `-` and `.` of the domain name; rename one domain".into(),
                ),
            });
        }
    }
    Ok(DdoPlanFile {
        domains,
        base_tokens,
        multipliers,
        base_weights,
        base_seeds,
        seed,
        replicate,
        runs,
    })
}

/// `base` (`base-s1`, ... for replicates), or `<domain>-x<multiplier>` with anything but
/// letters, digits, `_`, `-`, `.` in the domain replaced by `_`, so it can sit inside a stage id.
fn run_id(run: &PlannedRun) -> String {
    match &run.perturbed {
        None => run.id.clone(),
        Some(domain) => {
            let clean: String = domain
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{clean}-x{}", run.multiplier)
        }
    }
}

/// One fan-out child: the params a trainer stage needs. Token counts are rounded here, where
/// they are handed to a trainer; `plan.json` keeps them exact.
fn fanout_child(run: &PlannedRun) -> Value {
    let tokens: BTreeMap<&str, u64> = run
        .tokens
        .iter()
        .map(|(d, n)| (d, n.round() as u64))
        .collect();
    let total: u64 = tokens.values().sum();
    let mut child = json!({
        "id": run.id,
        "params": {
            "run": run.id,
            "perturbed": run.perturbed,
            "multiplier": run.multiplier,
            "seed": run.seed,
            "total_tokens": total,
            "tokens": tokens,
            "weights": run.weights,
        }
    });
    // Only data replicates carry it, so every other run's key stays what it was.
    if let Some(data_seed) = run.data_seed {
        child["params"]["data_seed"] = json!(data_seed);
    }
    child
}

// ---------------------------------------------------------------------------------------------
// ddo

/// `ddo`: fits each domain's response to its proxy runs and solves for the optimal weights.
pub struct DdoKind;

const DDO_PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "objective",
        ParamType::String,
        "mean-ppl (default), mean-loss or max-ppl over the evaluation domains",
    ),
    ParamSpec::optional(
        "lower_bound",
        ParamType::Float,
        "the least multiplier of a domain's base tokens, in [0, 1] [default: 0.2]",
    ),
    ParamSpec::optional(
        "flat_domains",
        ParamType::String,
        "bound (default): a domain whose objective does not fall gets the lower bound; fail: stop",
    ),
    ParamSpec::optional(
        "bootstrap",
        ParamType::Int,
        "resamples of the weights' 5-95% intervals, given 2+ base runs; 0 turns them off [default: 400]",
    ),
];

/// `eval.json` as a trainer writes it: `{"domains": {"books": {"loss": 2.9, "ppl": 18.2}}}`.
#[derive(Debug, Deserialize)]
struct EvalFile {
    domains: BTreeMap<String, EvalMetrics>,
}

#[derive(Debug, Deserialize)]
struct EvalMetrics {
    ppl: Option<f64>,
    loss: Option<f64>,
}

impl EvalMetrics {
    /// The perplexity, or `exp(loss)` when only the loss (in nats) is given.
    fn perplexity(&self) -> Option<f64> {
        self.ppl.or(self.loss.map(f64::exp))
    }
}

impl StageKind for DdoKind {
    fn name(&self) -> &'static str {
        "ddo"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::DDO
    }

    fn summary(&self) -> &'static str {
        "fits DDO's per-domain curves to the proxy runs' eval.json and solves for the weights"
    }

    fn params(&self) -> &[ParamSpec] {
        DDO_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        ddo_options(params).map(|_| ()).map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let params = ddo_options(ctx.params)?;
        let plan_dir = one_input(ctx, "plan", "the `ddo_plan` stage")?;
        let plan_path = plan_dir.join("plan.json");
        let plan: DdoPlanFile = read_json(&plan_path)?;
        let runs = many_input(ctx, "runs", "the fanned-out training stage")?;
        let results = collect_results(&plan, runs)?;
        if ctx.cancelled() {
            return Err(StageError::Cancelled);
        }
        let csv = results_csv(&plan, &results);
        let options = DdoOptions {
            base_weights: plan.base_weights.clone(),
            scale_tokens: Some(plan.base_tokens),
            ..params
        };
        let mut report = autoscale_mixture::parse_ddo_csv(csv.as_bytes())
            .and_then(|runs| autoscale_mixture::ddo(&runs, &options))
            .map_err(|e| mix_failure("DDO failed on the proxy runs' results", &e))?;
        let learning = learning_check(ctx, &plan, &results)?;
        if let Some(learning) = &learning {
            report.warnings.extend(learning.warning());
            write_json(&ctx.out_dir, "learning.json", learning)?;
        }
        write_file(&ctx.out_dir.join("results.csv"), csv.as_bytes())?;
        write_json(&ctx.out_dir, "weights.json", &report)?;
        write_file(&ctx.out_dir.join("fits.svg"), fits_svg(&report)?.as_bytes())?;
        let snr: BTreeMap<&str, Option<f64>> = report
            .domains
            .iter()
            .map(|d| (d.name.as_str(), d.snr))
            .collect();
        Ok(json!({
            "weights": report.weights,
            "warnings": report.warnings,
            "learning": learning.as_ref().map(Learning::summary),
            "noise": {
                "base_runs": report.noise.base_runs,
                "sigma": report.noise.sigma,
                "snr": snr,
                "note": report.noise.note,
            },
        }))
    }
}

/// With input `data` (the `shard` stage): did the base runs learn more than token frequencies?
/// See [`Learning`].
fn learning_check(
    ctx: &StageContext<'_>,
    plan: &DdoPlanFile,
    results: &[RunResult],
) -> Result<Option<Learning>, StageError> {
    let Some(input) = ctx.inputs.get("data") else {
        return Ok(None);
    };
    let InputPath::One(dir) = input else {
        return Err(StageError::Failed {
            message: "input `data` is a fan-out group".into(),
            hint: Some("`data` is the `shard` stage whose shards the proxies trained on".into()),
        });
    };
    let manifest: ShardManifest = read_json(&dir.join("manifest.json"))?;
    let base: Vec<BTreeMap<String, f64>> = plan
        .runs
        .iter()
        .zip(results)
        .filter(|(run, _)| run.perturbed.is_none())
        .map(|(_, result)| result.perplexities.clone())
        .collect();
    Ok(Learning::check(&base, &manifest))
}

/// The `ddo` params as options; the plan adds the base weights and the scale.
fn ddo_options(params: &Map<String, Value>) -> Result<DdoOptions, StageError> {
    let objective = match string(params, "objective")? {
        Some(name) => name
            .parse::<Objective>()
            .map_err(|e| param_error(format!("`objective`: {e}")))?,
        None => Objective::default(),
    };
    let lower_bound = float(params, "lower_bound")?.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&lower_bound) {
        return Err(param_error(format!(
            "`lower_bound` is {lower_bound}; it must lie in [0, 1] so the budget can be met"
        )));
    }
    let flat_domains = match string(params, "flat_domains")? {
        Some(name) => name
            .parse::<FlatPolicy>()
            .map_err(|e| param_error(format!("`flat_domains`: {e}")))?,
        None => FlatPolicy::default(),
    };
    Ok(DdoOptions {
        objective,
        min_multiplier: lower_bound,
        flat_domains,
        bootstrap: bootstrap_options(params)?,
        ..DdoOptions::default()
    })
}

/// The `bootstrap` param (resamples; 0 turns it off) over the default level and seed.
fn bootstrap_options(params: &Map<String, Value>) -> Result<BootstrapOptions, StageError> {
    let mut options = BootstrapOptions::default();
    if let Some(n) = count(params, "bootstrap", 0)? {
        options.resamples = u32::try_from(n)
            .ok()
            .filter(|n| *n <= 100_000)
            .ok_or_else(|| param_error(format!("`bootstrap` is {n}; at most 100000 resamples")))?;
    }
    Ok(options)
}

/// One run's evaluation, matched to the plan.
struct RunResult {
    /// Perplexity by evaluation domain.
    perplexities: BTreeMap<String, f64>,
}

/// Reads every planned run's `eval.json` from the fan-out group, matching child stage ids
/// (`<template>[<run id>]`) to the plan's run ids.
fn collect_results(
    plan: &DdoPlanFile,
    children: &BTreeMap<String, PathBuf>,
) -> Result<Vec<RunResult>, StageError> {
    let mut by_run: BTreeMap<&str, (&str, &Path)> = BTreeMap::new();
    for (child, dir) in children {
        let Some(id) = fanout_run_id(child).filter(|id| plan.runs.iter().any(|r| r.id == *id))
        else {
            return Err(StageError::Failed {
                message: format!("`runs` member `{child}` is not a run of the plan"),
                hint: Some(format!(
                    "`runs` must name the stage fanned out by this `plan`, whose children are `<stage>[<run>]` with runs {}",
                    plan.runs
                        .iter()
                        .map(|r| format!("`{}`", r.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            });
        };
        if let Some((other, _)) = by_run.insert(id, (child, dir)) {
            return Err(StageError::Failed {
                message: format!("`runs` members `{other}` and `{child}` are both run `{id}`"),
                hint: Some("fan the training stage out over the plan alone".into()),
            });
        }
    }
    let mut results = Vec::with_capacity(plan.runs.len());
    let mut eval_domains: Option<Vec<String>> = None;
    for run in &plan.runs {
        let Some((child, dir)) = by_run.get(run.id.as_str()) else {
            return Err(StageError::Failed {
                message: format!("run `{}` of the plan has no result in `runs`", run.id),
                hint: Some(
                    "`runs` must name the stage fanned out by this `plan`, so that every planned run is trained".into(),
                ),
            });
        };
        let path = dir.join("eval.json");
        if !path.is_file() {
            return Err(StageError::Failed {
                message: format!(
                    "run `{}` (stage `{child}`) wrote no `{}`",
                    run.id,
                    path.display()
                ),
                hint: Some(
                    r#"each training run must write eval.json: {"domains": {"<domain>": {"loss": ..., "ppl": ...}}}"#.into(),
                ),
            });
        }
        let eval: EvalFile = read_json(&path)?;
        // The base run's domains are the evaluation domains; every trained domain is among them.
        let wanted = eval_domains.get_or_insert_with(|| {
            let mut d = plan.domains.clone();
            d.extend(
                eval.domains
                    .keys()
                    .filter(|k| !plan.domains.contains(k))
                    .cloned(),
            );
            d
        });
        let mut perplexities = BTreeMap::new();
        for domain in wanted.iter() {
            let ppl = eval
                .domains
                .get(domain)
                .ok_or_else(|| StageError::Failed {
                    message: format!(
                        "run `{}`: `{}` has no domain `{domain}`",
                        run.id,
                        path.display()
                    ),
                    hint: Some(format!(
                        "evaluate every run on the same domains, including each trained one ({})",
                        wanted.join(", ")
                    )),
                })?
                .perplexity()
                .ok_or_else(|| StageError::Failed {
                    message: format!(
                        "run `{}`: domain `{domain}` in `{}` has neither `ppl` nor `loss`",
                        run.id,
                        path.display()
                    ),
                    hint: Some(
                        "give the validation perplexity as `ppl` or the loss in nats as `loss`"
                            .into(),
                    ),
                })?;
            perplexities.insert(domain.clone(), ppl);
        }
        results.push(RunResult { perplexities });
    }
    Ok(results)
}

/// `books-x0.2` from `proxy[books-x0.2]`: the last bracketed part of a fan-out child's id.
fn fanout_run_id(child: &str) -> Option<&str> {
    child.strip_suffix(']')?.rsplit_once('[').map(|(_, id)| id)
}

/// The results in `autoscale mix ddo`'s CSV format, one row per planned run in plan order.
fn results_csv(plan: &DdoPlanFile, results: &[RunResult]) -> String {
    let domains: Vec<&String> = results
        .first()
        .map(|r| r.perplexities.keys().collect())
        .unwrap_or_default();
    // Trained domains first, in plan order, then the evaluation-only ones.
    let mut columns: Vec<&String> = plan.domains.iter().collect();
    columns.extend(domains.into_iter().filter(|d| !plan.domains.contains(d)));
    let mut out = format!(
        "# DDO proxy runs at {} base tokens; `autoscale mix ddo --results results.csv` redoes the math\nperturbed,multiplier",
        plan.base_tokens
    );
    for c in &columns {
        out.push(',');
        out.push_str(&csv_field(c));
    }
    out.push('\n');
    for (run, result) in plan.runs.iter().zip(results) {
        out.push_str(&csv_field(run.perturbed.as_deref().unwrap_or("")));
        out.push_str(&format!(",{}", run.multiplier));
        for c in &columns {
            out.push_str(&format!(
                ",{}",
                result.perplexities.get(*c).unwrap_or(&f64::NAN)
            ));
        }
        out.push('\n');
    }
    out
}

/// Quotes a CSV field when it needs it (or would read as a comment).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with('#') || s.trim() != s {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// predict

/// `predict`: the AutoScale extrapolation from optimal weights at two or more scales.
pub struct PredictKind;

const PREDICT_PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "target_tokens",
        ParamType::Float,
        "the total tokens to predict the optimal composition at",
    ),
    ParamSpec::optional(
        "steps",
        ParamType::Int,
        "or: apply AutoScale's rule this many times past the largest scale",
    ),
    ParamSpec::optional(
        "scales",
        ParamType::Map,
        "total tokens of inputs that do not record them: input name (or fan-out member id): tokens",
    ),
    ParamSpec::optional(
        "bootstrap",
        ParamType::Int,
        "resamples of the predicted weights' 5-95% intervals, when every input is a DDO report with 2+ base runs; 0 turns them off [default: 400]",
    ),
];

impl StageKind for PredictKind {
    fn name(&self) -> &'static str {
        "predict"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::PREDICT
    }

    fn summary(&self) -> &'static str {
        "extrapolates optimal weights from two or more scales (the inputs) to a larger one"
    }

    fn params(&self) -> &[ParamSpec] {
        PREDICT_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        predict_target(params)
            .and_then(|_| float_map(params, "scales"))
            .and_then(|_| bootstrap_options(params))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let target = predict_target(ctx.params)?;
        let scales = float_map(ctx.params, "scales")?.unwrap_or_default();
        let bootstrap = bootstrap_options(ctx.params)?;
        let compositions = read_compositions(ctx.inputs, &scales)?;
        let prediction =
            autoscale_mixture::predict_with_bootstrap(&compositions, target, &bootstrap).map_err(
                |e| {
                    let mut failure = mix_failure("cannot predict the composition", &e);
                    if let StageError::Failed {
                        hint: hint @ None, ..
                    } = &mut failure
                    {
                        *hint = Some(
                    "give `predict` two or more inputs, each a `ddo` stage run at a different scale"
                        .into(),
                );
                    }
                    failure
                },
            )?;
        write_json(&ctx.out_dir, "weights.json", &prediction)?;
        let svg = prediction_svg(&compositions, &prediction)?;
        write_file(&ctx.out_dir.join("prediction.svg"), svg.as_bytes())?;
        Ok(json!({
            "total_tokens": prediction.total_tokens,
            "weights": prediction.weights,
            "warnings": prediction.warnings,
        }))
    }
}

fn predict_target(params: &Map<String, Value>) -> Result<Target, StageError> {
    let tokens = float(params, "target_tokens")?;
    let steps = present(params, "steps").map(|v| {
        v.as_u64()
            .filter(|k| *k >= 1)
            .and_then(|k| u32::try_from(k).ok())
            .ok_or_else(|| param_error(format!("`steps` is {v}; it must be a whole number >= 1")))
    });
    match (tokens, steps) {
        (Some(t), None) if t.is_finite() && t > 0.0 => Ok(Target::TotalTokens(t)),
        (Some(t), None) => Err(param_error(format!(
            "`target_tokens` is {t}; it must be a positive number of tokens"
        ))),
        (None, Some(k)) => Ok(Target::Steps(k?)),
        (Some(_), Some(_)) => Err(param_error(
            "`predict` takes one of `target_tokens` and `steps`, not both",
        )),
        (None, None) => Err(param_error(
            "`predict` needs `target_tokens` (a total to predict at) or `steps`",
        )),
    }
}

/// Every input's weights at its scale: a directory's `weights.json`, or a weights file. The
/// total comes from `scales`, else the file's `scale_tokens` (a DDO report) or `total_tokens`
/// (a prediction).
fn read_compositions(
    inputs: &BTreeMap<String, InputPath>,
    scales: &BTreeMap<String, f64>,
) -> Result<Vec<ScaleComposition>, StageError> {
    let mut sources: Vec<(&str, &str, &Path)> = Vec::new();
    for (name, input) in inputs {
        match input {
            InputPath::One(path) => sources.push((name, name, path)),
            InputPath::Many(members) => sources.extend(
                members
                    .iter()
                    .map(|(id, path)| (name.as_str(), id.as_str(), path.as_path())),
            ),
        }
    }
    if let Some(unknown) = scales
        .keys()
        .find(|k| !sources.iter().any(|(name, id, _)| name == k || id == k))
    {
        return Err(param_error(format!(
            "`scales` names `{unknown}`, which is not an input (inputs: {})",
            sources
                .iter()
                .map(|(_, id, _)| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut compositions = Vec::with_capacity(sources.len());
    for (name, id, path) in sources {
        let file = if path.is_dir() {
            path.join("weights.json")
        } else {
            path.to_owned()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| StageError::Failed {
            message: format!("input `{id}`: cannot read `{}`: {e}", file.display()),
            hint: Some(
                "each input of `predict` is a `ddo` (or `predict`, `mixture`) stage, or a weights JSON file".into(),
            ),
        })?;
        let recorded = || {
            let value: Value = serde_json::from_str(&text).ok()?;
            value["scale_tokens"]
                .as_f64()
                .or_else(|| value["total_tokens"].as_f64())
        };
        let total = scales
            .get(id)
            .or_else(|| scales.get(name))
            .copied()
            .or_else(recorded)
            .ok_or_else(|| StageError::Failed {
                message: format!(
                    "input `{id}`: `{}` does not say at how many tokens its weights are optimal",
                    file.display()
                ),
                hint: Some(format!("give it with the param `scales: {{{id}: TOKENS}}`")),
            })?;
        let origin = format!("input `{id}` (`{}`)", file.display());
        compositions.push(
            ScaleComposition::from_json(total, &text, &origin)
                .map_err(|e| mix_failure("cannot read the weights", &e))?,
        );
    }
    Ok(compositions)
}

// ---------------------------------------------------------------------------------------------
// mixture (baselines)

/// `mixture`: a baseline composition (uniform, natural, LLaMA, UniMax, temperature, explicit).
pub struct MixtureKind;

const MIXTURE_PARAMS: &[ParamSpec] = &[
    ParamSpec::required(
        "method",
        ParamType::String,
        "uniform, natural, llama, unimax, temperature or explicit",
    ),
    ParamSpec::optional(
        "domains",
        ParamType::List,
        "the domains to weight (uniform, llama; checks the others)",
    ),
    ParamSpec::optional(
        "available",
        ParamType::Map,
        "tokens available per domain (natural, unimax, temperature)",
    ),
    ParamSpec::optional("budget", ParamType::Float, "total training tokens (unimax)"),
    ParamSpec::optional(
        "max_epochs",
        ParamType::Float,
        "most passes over any domain (unimax) [default: 4]",
    ),
    ParamSpec::optional(
        "temperature",
        ParamType::Float,
        "T in w ~ p^(1/T) (temperature)",
    ),
    ParamSpec::optional(
        "weights",
        ParamType::Map,
        "domain: weight, renormalised (explicit)",
    ),
    ParamSpec::optional(
        "map",
        ParamType::Map,
        "your domain: RedPajama subset, for names llama does not know (llama)",
    ),
];

/// The baseline weightings by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaselineMethod {
    Uniform,
    Natural,
    Llama,
    Unimax,
    Temperature,
    Explicit,
}

impl BaselineMethod {
    pub const NAMES: [&'static str; 6] = [
        "uniform",
        "natural",
        "llama",
        "unimax",
        "temperature",
        "explicit",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Natural => "natural",
            Self::Llama => "llama",
            Self::Unimax => "unimax",
            Self::Temperature => "temperature",
            Self::Explicit => "explicit",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "uniform" => Self::Uniform,
            "natural" => Self::Natural,
            "llama" => Self::Llama,
            "unimax" => Self::Unimax,
            "temperature" => Self::Temperature,
            "explicit" => Self::Explicit,
            _ => return None,
        })
    }
}

/// What the baselines read; each method uses only its own fields.
#[derive(Debug, Clone, Default)]
pub struct BaselineRequest {
    pub domains: Option<Vec<String>>,
    /// Tokens available per domain.
    pub available: Option<BTreeMap<String, f64>>,
    /// Total training tokens (UniMax).
    pub budget: Option<f64>,
    /// UniMax's epoch cap; 4 when `None`.
    pub max_epochs: Option<f64>,
    pub temperature: Option<f64>,
    /// Explicit weights.
    pub weights: Option<BTreeMap<String, f64>>,
    /// Domain -> RedPajama subset name, for LLaMA's weights.
    pub map: BTreeMap<String, String>,
}

/// Why a baseline could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("the `{method}` baseline needs `{field}` ({what})")]
    Missing {
        method: &'static str,
        field: &'static str,
        what: &'static str,
    },
    #[error("the domains [{domains}] differ from those with available tokens [{available}]")]
    AvailableMismatch { domains: String, available: String },
    #[error(transparent)]
    Mix(#[from] MixError),
}

impl Hint for BaselineError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::Missing { .. } => None,
            Self::AvailableMismatch { .. } => {
                Some("give the available tokens of exactly the domains to weight".to_owned())
            }
            Self::Mix(e) => e.hint(),
        }
    }
}

/// The weights of a baseline `method`.
pub fn baseline_weights(
    method: BaselineMethod,
    request: &BaselineRequest,
) -> Result<MixtureWeights, BaselineError> {
    let missing = |field, what| BaselineError::Missing {
        method: method.name(),
        field,
        what,
    };
    let domains = || {
        request
            .domains
            .as_deref()
            .ok_or_else(|| missing("domains", "the domains to weight"))
    };
    let available = || -> Result<TokenQuantities, BaselineError> {
        let map = request
            .available
            .as_ref()
            .ok_or_else(|| missing("available", "the tokens available per domain"))?;
        if let Some(domains) = &request.domains {
            let names: Vec<&String> = map.keys().collect();
            let mut wanted: Vec<&String> = domains.iter().collect();
            wanted.sort();
            if names != wanted {
                return Err(BaselineError::AvailableMismatch {
                    domains: domains.join(", "),
                    available: map.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(TokenQuantities::new(map.clone())?)
    };
    Ok(match method {
        BaselineMethod::Uniform => baselines::uniform(domains()?)?,
        BaselineMethod::Natural => baselines::natural(&available()?)?,
        BaselineMethod::Llama => baselines::llama_redpajama(domains()?, &request.map)?,
        BaselineMethod::Unimax => {
            let budget = request
                .budget
                .ok_or_else(|| missing("budget", "the total training tokens"))?;
            baselines::unimax(&available()?, budget, request.max_epochs.unwrap_or(4.0))?
        }
        BaselineMethod::Temperature => {
            let t = request
                .temperature
                .ok_or_else(|| missing("temperature", "T in w ~ p^(1/T)"))?;
            baselines::temperature(&available()?, t)?
        }
        BaselineMethod::Explicit => {
            let weights = request
                .weights
                .as_ref()
                .ok_or_else(|| missing("weights", "domain: weight"))?;
            let domains = request
                .domains
                .clone()
                .unwrap_or_else(|| weights.keys().cloned().collect());
            baselines::explicit(&domains, weights)?
        }
    })
}

impl StageKind for MixtureKind {
    fn name(&self) -> &'static str {
        "mixture"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::MIXTURE
    }

    fn summary(&self) -> &'static str {
        "baseline weights: uniform, natural, llama, unimax, temperature or explicit"
    }

    fn params(&self) -> &[ParamSpec] {
        MIXTURE_PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        mixture(params).map(|_| ()).map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let (method, weights) = mixture(ctx.params)?;
        let out = json!({ "method": method.name(), "weights": weights });
        write_json(&ctx.out_dir, "weights.json", &out)?;
        Ok(out)
    }
}

fn mixture(params: &Map<String, Value>) -> Result<(BaselineMethod, MixtureWeights), StageError> {
    let name = string(params, "method")?.unwrap_or_default();
    let method = BaselineMethod::parse(&name).ok_or_else(|| {
        param_error(format!(
            "unknown `method` `{name}`; expected one of {}",
            BaselineMethod::NAMES.join(", ")
        ))
    })?;
    let request = BaselineRequest {
        domains: strings(params, "domains")?,
        available: float_map(params, "available")?,
        budget: float(params, "budget")?,
        max_epochs: float(params, "max_epochs")?,
        temperature: float(params, "temperature")?,
        weights: float_map(params, "weights")?,
        map: string_map(params, "map")?.unwrap_or_default(),
    };
    let weights = baseline_weights(method, &request).map_err(|e| StageError::Failed {
        hint: e
            .hint()
            .or_else(|| Some("`autoscale kinds` lists each kind's params".to_owned())),
        message: e.to_string(),
    })?;
    Ok((method, weights))
}

// ---------------------------------------------------------------------------------------------
// Plots

/// Series colours (Tableau 10), cycled.
pub(crate) const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const PLOT_SIZE: (u32, u32) = (800, 520);

type PlotResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Each domain's objective ratio against its multiplier: the runs as dots, the fitted
/// `(x + a)^(-b) + c` as a line, the optimum as a cross.
fn fits_svg(report: &DdoReport) -> Result<String, StageError> {
    crate::font::ensure_registered().map_err(|e| StageError::failed(e.to_string()))?;
    let mut svg = String::new();
    draw_fits(
        SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area(),
        report,
    )
    .map_err(|e| StageError::failed(format!("cannot draw fits.svg: {e}")))?;
    Ok(svg)
}

fn draw_fits(root: DrawingArea<SVGBackend<'_>, Shift>, report: &DdoReport) -> PlotResult {
    root.fill(&WHITE)?;
    let xs = report
        .domains
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.multiplier).chain([d.multiplier]));
    let (x_lo, x_hi) = padded_range(xs);
    let x_lo = x_lo.max(0.0);
    let ys = report.domains.iter().flat_map(|d| {
        d.points
            .iter()
            .map(|p| p.ratio)
            .chain(d.fit.map(|f| f.eval(d.multiplier)))
    });
    let (y_lo, y_hi) = padded_range(ys);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("DDO fits ({})", report.objective),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("multiplier of the base tokens (dots: runs; cross: optimum)")
        .y_desc("objective / base objective")
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()?;
    for (i, d) in report.domains.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // A flat domain has no curve: its dots alone, and its weight on the bound.
        let curve: Vec<(f64, f64)> = match d.fit {
            Some(fit) => (0..=120)
                .map(|k| x_lo + (x_hi - x_lo) * f64::from(k) / 120.0)
                .map(|x| (x, fit.eval(x)))
                .filter(|(_, y)| y.is_finite() && (y_lo..=y_hi).contains(y))
                .collect(),
            None => Vec::new(),
        };
        let label = match d.fit {
            Some(f) => format!(
                "{} (a {:.3}, b {:.3}, c {:.3}): w {:.3}",
                d.name, f.a, f.b, f.c, d.weight
            ),
            None => format!("{} (flat, on the bound): w {:.3}", d.name, d.weight),
        };
        chart
            .draw_series(LineSeries::new(curve, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            d.points
                .iter()
                .map(|p| Circle::new((p.multiplier, p.ratio), 4, color.filled())),
        )?;
        if let Some(fit) = d.fit {
            let optimum = (d.multiplier, fit.eval(d.multiplier));
            if optimum.1.is_finite() {
                chart.draw_series([Cross::new(optimum, 7, color.stroke_width(2))])?;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Tokens per domain against the total (log-log): the input scales as dots, the fitted
/// log-affine path as a line, the prediction as a triangle.
fn prediction_svg(
    inputs: &[ScaleComposition],
    prediction: &Prediction,
) -> Result<String, StageError> {
    crate::font::ensure_registered().map_err(|e| StageError::failed(e.to_string()))?;
    let mut svg = String::new();
    draw_prediction(
        SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area(),
        inputs,
        prediction,
    )
    .map_err(|e| StageError::failed(format!("cannot draw prediction.svg: {e}")))?;
    Ok(svg)
}

fn draw_prediction(
    root: DrawingArea<SVGBackend<'_>, Shift>,
    inputs: &[ScaleComposition],
    prediction: &Prediction,
) -> PlotResult {
    root.fill(&WHITE)?;
    // ln N_i(s) = ln N_i(s*) + delta_i (s - s*), from the smallest input to the prediction.
    let s_values = prediction.scales.iter().map(|f| f.s).chain([prediction.s]);
    let s_lo = s_values.clone().fold(f64::INFINITY, f64::min);
    let s_hi = s_values.fold(f64::NEG_INFINITY, f64::max);
    let path_at = |s: f64| -> Vec<f64> {
        prediction
            .domains
            .iter()
            .map(|d| d.tokens * (d.log_slope * (s - prediction.s)).exp())
            .collect()
    };
    let path: Vec<(f64, Vec<f64>)> = (0..=80)
        .map(|k| s_lo + (s_hi - s_lo) * f64::from(k) / 80.0)
        .map(|s| {
            let n = path_at(s);
            (n.iter().sum(), n)
        })
        .filter(|(total, n): &(f64, Vec<f64>)| {
            total.is_finite() && n.iter().all(|x| x.is_finite() && *x > 0.0)
        })
        .collect();
    let xs = inputs
        .iter()
        .map(|c| c.total_tokens)
        .chain([prediction.total_tokens]);
    let (x_lo, x_hi) = padded_log_range(xs);
    let ys = inputs
        .iter()
        .flat_map(|c| c.weights.iter().map(|(_, w)| w * c.total_tokens))
        .chain(prediction.domains.iter().map(|d| d.tokens));
    let (y_lo, y_hi) = padded_log_range(ys);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "AutoScale prediction at {:.3e} tokens",
                prediction.total_tokens
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("total tokens (dots: optimal at input scales; triangle: predicted)")
        .y_desc("tokens of the domain")
        .x_label_formatter(&|x| format!("{x:.1e}"))
        .y_label_formatter(&|y| format!("{y:.1e}"))
        .draw()?;
    for (i, d) in prediction.domains.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line: Vec<(f64, f64)> = path
            .iter()
            .map(|(total, n)| (*total, n[i]))
            .filter(|(x, y)| (x_lo..=x_hi).contains(x) && (y_lo..=y_hi).contains(y))
            .collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(format!("{}: w {:.3}", d.name, d.weight))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(inputs.iter().filter_map(|c| {
            let w = c.weights.get(&d.name)?;
            Some(Circle::new(
                (c.total_tokens, w * c.total_tokens),
                4,
                color.filled(),
            ))
        }))?;
        chart.draw_series([TriangleMarker::new(
            (prediction.total_tokens, d.tokens),
            7,
            color.filled(),
        )])?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The positive finite values' range, widened by a quarter on a log axis; `(0.1, 10)` if none.
pub(crate) fn padded_log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        (0.1, 10.0)
    } else {
        (lo / 1.25, hi * 1.25)
    }
}

/// The finite values' range, widened by a tenth (or by 0.05 when flat); `(0, 1)` if none.
pub(crate) fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(0.05);
    (lo - pad, hi + pad)
}

// ---------------------------------------------------------------------------------------------
// Params, inputs and files

/// A param's value, unless it is absent or null.
fn present<'a>(params: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    params.get(name).filter(|v| !v.is_null())
}

fn param_error(message: impl Into<String>) -> StageError {
    StageError::Failed {
        message: message.into(),
        hint: Some("`autoscale kinds` lists each kind's params".into()),
    }
}

fn string(params: &Map<String, Value>, name: &str) -> Result<Option<String>, StageError> {
    present(params, name)
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| param_error(format!("`{name}` must be a string, not {v}")))
        })
        .transpose()
}

fn float(params: &Map<String, Value>, name: &str) -> Result<Option<f64>, StageError> {
    present(params, name)
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| param_error(format!("`{name}` must be a number, not {v}")))
        })
        .transpose()
}

/// A whole-number param of at least `min`.
fn count(params: &Map<String, Value>, name: &str, min: u64) -> Result<Option<u64>, StageError> {
    present(params, name)
        .map(|v| {
            v.as_u64().filter(|n| *n >= min).ok_or_else(|| {
                param_error(format!(
                    "`{name}` is {v}; it must be a whole number >= {min}"
                ))
            })
        })
        .transpose()
}

fn list<'a>(params: &'a Map<String, Value>, name: &str) -> Result<Option<&'a [Value]>, StageError> {
    present(params, name)
        .map(|v| {
            v.as_array()
                .map(Vec::as_slice)
                .ok_or_else(|| param_error(format!("`{name}` must be a list, not {v}")))
        })
        .transpose()
}

fn map<'a>(
    params: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, StageError> {
    present(params, name)
        .map(|v| {
            v.as_object()
                .ok_or_else(|| param_error(format!("`{name}` must be a map, not {v}")))
        })
        .transpose()
}

fn strings(params: &Map<String, Value>, name: &str) -> Result<Option<Vec<String>>, StageError> {
    list(params, name)?
        .map(|items| {
            items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        param_error(format!("`{name}` lists names, and {v} is not a string"))
                    })
                })
                .collect()
        })
        .transpose()
}

fn floats(params: &Map<String, Value>, name: &str) -> Result<Option<Vec<f64>>, StageError> {
    list(params, name)?
        .map(|items| {
            items
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        param_error(format!("`{name}` lists numbers, and {v} is not a number"))
                    })
                })
                .collect()
        })
        .transpose()
}

fn float_map(
    params: &Map<String, Value>,
    name: &str,
) -> Result<Option<BTreeMap<String, f64>>, StageError> {
    map(params, name)?
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    v.as_f64().map(|x| (k.clone(), x)).ok_or_else(|| {
                        param_error(format!("`{name}.{k}` must be a number, not {v}"))
                    })
                })
                .collect()
        })
        .transpose()
}

fn string_map(
    params: &Map<String, Value>,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, StageError> {
    map(params, name)?
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.clone(), s.to_owned()))
                        .ok_or_else(|| {
                            param_error(format!("`{name}.{k}` must be a string, not {v}"))
                        })
                })
                .collect()
        })
        .transpose()
}

fn one_input<'a>(
    ctx: &'a StageContext<'_>,
    name: &str,
    what: &str,
) -> Result<&'a Path, StageError> {
    match ctx.inputs.get(name) {
        Some(InputPath::One(path)) => Ok(path),
        Some(InputPath::Many(_)) => Err(StageError::Failed {
            message: format!("input `{name}` of `{}` is a fan-out group", ctx.stage_id),
            hint: Some(format!("`{name}` names {what}, which is one stage")),
        }),
        None => Err(missing_input(ctx, name, what)),
    }
}

fn many_input<'a>(
    ctx: &'a StageContext<'_>,
    name: &str,
    what: &str,
) -> Result<&'a BTreeMap<String, PathBuf>, StageError> {
    match ctx.inputs.get(name) {
        Some(InputPath::Many(members)) => Ok(members),
        Some(InputPath::One(_)) => Err(StageError::Failed {
            message: format!("input `{name}` of `{}` is a single stage", ctx.stage_id),
            hint: Some(format!(
                "`{name}` names {what}: the template's id, declared with `fanout:`"
            )),
        }),
        None => Err(missing_input(ctx, name, what)),
    }
}

fn missing_input(ctx: &StageContext<'_>, name: &str, what: &str) -> StageError {
    StageError::Failed {
        message: format!("stage `{}` has no input `{name}`", ctx.stage_id),
        hint: Some(format!(
            "add `{name}: <stage>` under `inputs:`, naming {what}"
        )),
    }
}

/// A crate error as a stage failure, with its causes in the message and its hint.
fn mix_failure(context: &str, e: &MixError) -> StageError {
    let mut message = format!("{context}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StageError::Failed {
        message,
        hint: e.hint(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::Failed {
        message: format!("cannot read `{}`: {e}", path.display()),
        hint: None,
    })?;
    serde_json::from_str(&text).map_err(|e| StageError::Failed {
        message: format!("`{}` is not what was expected: {e}", path.display()),
        hint: None,
    })
}

fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<(), StageError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| StageError::failed(format!("cannot serialise {name}: {e}")))?;
    bytes.push(b'\n');
    write_file(&dir.join(name), &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    std::fs::write(path, bytes).map_err(|e| StageError::Failed {
        message: format!("cannot write `{}`: {e}", path.display()),
        hint: Some("is the disk full, or the cache directory read-only?".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kind_harness::Harness;

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
    }

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The shifted power law of `autoscale_mixture`'s DDO tests: the ratio of a run with
    /// multipliers `n` is exactly `1 + sum_i ((n_i + a_i)^(-b_i) - (1 + a_i)^(-b_i))`, so DDO
    /// recovers the true optimum.
    const AB: [(f64, f64); 3] = [(2.0, 1.0), (0.5, 3.0), (2.0, 3.0)];
    const DOMAINS: [&str; 3] = ["books", "c4", "github"];

    fn synthetic_loss(n: &[f64; 3]) -> f64 {
        20.0 * (1.0
            + n.iter()
                .zip(AB)
                .map(|(x, (a, b))| (x + a).powf(-b) - (1.0 + a).powf(-b))
                .sum::<f64>())
    }

    /// The true optimum by KKT bisection, as weights.
    fn true_weights() -> [f64; 3] {
        let n_of = |ln_lam: f64| AB.map(|(a, b)| ((b.ln() - ln_lam) / (b + 1.0)).exp() - a);
        let (mut lo, mut hi) = (-50.0, 50.0);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if n_of(mid).iter().map(|n| n.max(0.2)).sum::<f64>() > 3.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        n_of(0.5 * (lo + hi)).map(|n| n.max(0.2) / 3.0)
    }

    /// Runs `ddo_plan`, then fakes the fanned-out training: one dir per child with eval.json
    /// from the synthetic law (the held-out domain is 5% harder, plain loss only).
    fn plan_and_train(h: &Harness) -> (PathBuf, BTreeMap<String, PathBuf>) {
        plan_and_train_with(h, json!({"domains": DOMAINS, "base_tokens": 3e8}), 0.0)
    }

    /// [`plan_and_train`] with other plan params, and seed noise: a run with seed `k` reads
    /// `1 + noise * (k mod 3 - 1)` times its loss.
    fn plan_and_train_with(
        h: &Harness,
        plan: Value,
        noise: f64,
    ) -> (PathBuf, BTreeMap<String, PathBuf>) {
        let base_runs = plan["base_seeds"].as_u64().unwrap_or(1) as usize;
        let (plan_dir, summary) = h
            .run(&DdoPlanKind, "plan", plan, BTreeMap::new())
            .expect("plan");
        assert_eq!(
            summary["runs"].as_array().map(Vec::len),
            Some(6 + base_runs)
        );
        let fanout = read(&plan_dir.join("fanout.json"));
        let mut runs = BTreeMap::new();
        for child in fanout["children"].as_array().expect("children") {
            let id = child["id"].as_str().expect("id");
            let p = &child["params"];
            let n = DOMAINS.map(|d| p["tokens"][d].as_f64().expect("tokens") / 1e8);
            let seed = p["seed"].as_u64().expect("seed") % 3;
            let l = synthetic_loss(&n) * (1.0 + noise * (seed as f64 - 1.0));
            let mut domains = Map::new();
            for d in DOMAINS {
                domains.insert(d.into(), json!({"ppl": l, "loss": l.ln()}));
            }
            domains.insert("held_out".into(), json!({"loss": (l * 1.05).ln()}));
            let dir = h.dir(&format!("train/{id}"));
            std::fs::write(
                dir.join("eval.json"),
                json!({ "domains": domains }).to_string(),
            )
            .expect("write eval");
            runs.insert(format!("proxy[{id}]"), dir);
        }
        (plan_dir, runs)
    }

    fn ddo_inputs(plan: &Path, runs: BTreeMap<String, PathBuf>) -> BTreeMap<String, InputPath> {
        BTreeMap::from([
            ("plan".to_owned(), InputPath::One(plan.to_owned())),
            ("runs".to_owned(), InputPath::Many(runs)),
        ])
    }

    #[test]
    fn plan_writes_the_runs_and_a_fanout_of_valid_ids() {
        let h = Harness::new();
        let (dir, _) = h
            .run(
                &DdoPlanKind,
                "plan",
                json!({"domains": ["books", "common crawl"], "base_tokens": 1e6, "multipliers": [3, 0.2]}),
                BTreeMap::new(),
            )
            .expect("plan");
        let fanout = read(&dir.join("fanout.json"));
        let children = fanout["children"].as_array().expect("children");
        let ids: Vec<&str> = children.iter().filter_map(|c| c["id"].as_str()).collect();
        assert_eq!(
            ids,
            [
                "base",
                "books-x0.2",
                "books-x3",
                "common_crawl-x0.2",
                "common_crawl-x3"
            ]
        );
        let books = &children[2]["params"];
        assert_eq!(books["run"], "books-x3");
        assert_eq!(books["perturbed"], "books");
        assert_eq!(books["multiplier"], 3.0);
        assert_eq!(books["tokens"]["books"], 1_500_000);
        assert_eq!(books["tokens"]["common crawl"], 500_000);
        assert_eq!(books["total_tokens"], 2_000_000);
        assert_eq!(books["weights"]["books"], 0.75);
        assert!(children[0]["params"]["perturbed"].is_null());
        let plan: DdoPlanFile =
            serde_json::from_value(read(&dir.join("plan.json"))).expect("plan.json");
        assert_eq!(plan.runs.len(), 5);
        assert_eq!(plan.runs[3].id, "common_crawl-x0.2");
    }

    #[test]
    fn plan_params_are_checked() {
        let bad = [
            json!({"domains": ["a", "b"], "base_tokens": -1.0}),
            json!({"domains": ["a", "b"], "base_tokens": 1e6, "multipliers": [3]}),
            json!({"domains": ["a", 3], "base_tokens": 1e6}),
            json!({"domains": ["a", "b"], "base_tokens": 1e6, "base_weights": {"a": 1, "c": 1}}),
            json!({"domains": ["a b", "a_b"], "base_tokens": 1e6}),
        ];
        for p in bad {
            assert!(DdoPlanKind.check(&params(p.clone())).is_err(), "{p}");
        }
        let err = DdoPlanKind
            .check(&params(
                json!({"domains": ["a b", "a_b"], "base_tokens": 1e6}),
            ))
            .expect_err("collision");
        assert!(err.contains("a_b-x0.2"), "{err}");
        assert!(
            DdoPlanKind
                .check(&params(json!({"domains": ["a", "b"], "base_tokens": 1e6, "base_weights": {"a": 1, "b": 3}})))
                .is_ok()
        );
    }

    #[test]
    fn ddo_recovers_the_true_optimum_from_fanned_out_runs() {
        let h = Harness::new();
        let (plan_dir, runs) = plan_and_train(&h);
        let (dir, summary) = h
            .run(&DdoKind, "ddo", json!({}), ddo_inputs(&plan_dir, runs))
            .expect("ddo");
        let report: DdoReport =
            serde_json::from_value(read(&dir.join("weights.json"))).expect("report");
        assert_eq!(report.scale_tokens, Some(3e8));
        assert_eq!(report.eval_only_domains, ["held_out"]);
        let truth = true_weights();
        for (d, w) in DOMAINS.iter().zip(truth) {
            let got = report.weights.get(d).expect("weight");
            assert!((got - w).abs() < 1e-3, "{d}: {got} vs true {w}");
            assert_eq!(summary["weights"][d].as_f64(), Some(got));
        }
        let tokens = report.tokens.as_ref().expect("tokens");
        assert!((tokens.total() - 3e8).abs() < 1.0);
        // results.csv is the CLI's format and gives the same answer.
        let again = autoscale_mixture::ddo_from_csv_path(
            &dir.join("results.csv"),
            &DdoOptions {
                scale_tokens: Some(3e8),
                ..DdoOptions::default()
            },
        )
        .expect("csv");
        assert_eq!(again.weights, report.weights);
        let svg = std::fs::read_to_string(dir.join("fits.svg")).expect("svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("books (a ") && svg.contains("<circle"));
    }

    #[test]
    fn ddo_names_the_missing_run_or_domain() {
        let h = Harness::new();
        let (plan_dir, mut runs) = plan_and_train(&h);
        let c4 = runs.remove("proxy[c4-x3]").expect("c4-x3");
        let err = h
            .run(
                &DdoKind,
                "ddo1",
                json!({}),
                ddo_inputs(&plan_dir, runs.clone()),
            )
            .expect_err("missing run");
        assert!(err.to_string().contains("run `c4-x3`"), "{err}");

        runs.insert("proxy[c4-x3]".into(), c4.clone());
        std::fs::write(
            c4.join("eval.json"),
            r#"{"domains": {"books": {"ppl": 3}, "c4": {"ppl": 3}, "held_out": {"ppl": 3}}}"#,
        )
        .expect("write");
        let err = h
            .run(
                &DdoKind,
                "ddo2",
                json!({}),
                ddo_inputs(&plan_dir, runs.clone()),
            )
            .expect_err("missing domain");
        let text = err.to_string();
        assert!(
            text.contains("c4-x3") && text.contains("github") && text.contains("eval.json"),
            "{text}"
        );

        std::fs::remove_file(c4.join("eval.json")).expect("rm");
        let err = h
            .run(
                &DdoKind,
                "ddo3",
                json!({}),
                ddo_inputs(&plan_dir, runs.clone()),
            )
            .expect_err("no eval.json");
        assert!(err.to_string().contains("wrote no"), "{err}");

        runs.insert("proxy[stray]".into(), c4);
        let err = h
            .run(&DdoKind, "ddo4", json!({}), ddo_inputs(&plan_dir, runs))
            .expect_err("stray member");
        assert!(err.to_string().contains("proxy[stray]"), "{err}");

        assert!(
            DdoKind
                .check(&params(json!({"objective": "median"})))
                .is_err()
        );
        assert!(DdoKind.check(&params(json!({"lower_bound": 2.0}))).is_err());
        assert!(
            DdoKind
                .check(&params(json!({"objective": "max-ppl", "lower_bound": 0.1})))
                .is_ok()
        );
    }

    /// Weights files at two scales on the optimum path of `L = sum_i beta_i N_i^(-gamma_i)`.
    fn optimum_at(total: f64) -> BTreeMap<String, f64> {
        // N_i = (gamma_i beta_i / lambda)^(1/(gamma_i+1)); bisect lambda for the total.
        let bg = [(3.0, 0.3), (5.0, 0.5), (2.0, 0.2)];
        let at =
            |ln_lam: f64| bg.map(|(b, g): (f64, f64)| (((g * b).ln() - ln_lam) / (g + 1.0)).exp());
        let (mut lo, mut hi) = (-200.0, 200.0);
        for _ in 0..300 {
            let mid = 0.5 * (lo + hi);
            if at(mid).iter().sum::<f64>() > total {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        DOMAINS
            .iter()
            .zip(at(0.5 * (lo + hi)))
            .map(|(d, n)| ((*d).to_owned(), n))
            .collect()
    }

    #[test]
    fn predict_extrapolates_ddo_outputs_and_plain_files() {
        let h = Harness::new();
        let small = h.dir("ddo_small");
        let (n1, n2) = (optimum_at(1e8), optimum_at(3e8));
        let weights = |n: &BTreeMap<String, f64>| {
            let t: f64 = n.values().sum();
            n.iter()
                .map(|(d, x)| (d.clone(), x / t))
                .collect::<BTreeMap<_, _>>()
        };
        std::fs::write(
            small.join("weights.json"),
            json!({"scale_tokens": 1e8, "weights": weights(&n1)}).to_string(),
        )
        .expect("write");
        let large = h.root.path().join("large.json");
        std::fs::write(&large, json!({"weights": weights(&n2)}).to_string()).expect("write");
        let inputs = BTreeMap::from([
            ("small".to_owned(), InputPath::One(small)),
            ("large".to_owned(), InputPath::One(large)),
        ]);

        let err = h
            .run(
                &PredictKind,
                "p0",
                json!({"target_tokens": 1e10}),
                inputs.clone(),
            )
            .expect_err("large has no total");
        assert!(err.to_string().contains("input `large`"), "{err}");

        let (dir, summary) = h
            .run(
                &PredictKind,
                "p1",
                json!({"target_tokens": 1e10, "scales": {"large": 3e8}}),
                inputs,
            )
            .expect("predict");
        let p: Prediction = serde_json::from_value(read(&dir.join("weights.json")))
            .unwrap_or_else(|e| panic!("prediction: {e}"));
        assert!(
            (p.total_tokens - 1e10).abs() < 1e-3 * 1e10,
            "{}",
            p.total_tokens
        );
        assert!((p.tokens.total() - 1e10).abs() < 1e-3 * 1e10);
        let truth = optimum_at(1e10);
        for (d, n) in &truth {
            let got = p.tokens.get(d).expect("tokens");
            assert!((got / n - 1.0).abs() < 0.02, "{d}: {got} vs {n}");
        }
        assert_eq!(summary["total_tokens"].as_f64(), Some(p.total_tokens));
        let svg = std::fs::read_to_string(dir.join("prediction.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    }

    #[test]
    fn predict_needs_exactly_one_target() {
        assert!(PredictKind.check(&params(json!({}))).is_err());
        assert!(
            PredictKind
                .check(&params(json!({"target_tokens": 1e9, "steps": 1})))
                .is_err()
        );
        assert!(PredictKind.check(&params(json!({"steps": 0}))).is_err());
        assert!(
            PredictKind
                .check(&params(json!({"target_tokens": -5.0})))
                .is_err()
        );
        assert!(PredictKind.check(&params(json!({"steps": 2}))).is_ok());
        assert!(
            PredictKind
                .check(&params(json!({"steps": 2, "scales": {"a": "x"}})))
                .is_err()
        );
    }

    #[test]
    fn mixture_baselines_write_weights() {
        let h = Harness::new();
        let (dir, _) = h
            .run(
                &MixtureKind,
                "natural",
                json!({"method": "natural", "available": {"a": 1e9, "b": 3e9}}),
                BTreeMap::new(),
            )
            .expect("natural");
        let out = read(&dir.join("weights.json"));
        assert_eq!(out["method"], "natural");
        assert_eq!(out["weights"]["a"], 0.25);
        assert_eq!(out["weights"]["b"], 0.75);

        let (dir, _) = h
            .run(
                &MixtureKind,
                "llama",
                json!({"method": "llama", "domains": ["cc", "books", "mine"], "map": {"mine": "arxiv"}}),
                BTreeMap::new(),
            )
            .expect("llama");
        let w = &read(&dir.join("weights.json"))["weights"];
        let sum: f64 = ["cc", "books", "mine"]
            .iter()
            .filter_map(|d| w[d].as_f64())
            .sum();
        assert!((sum - 1.0).abs() < 1e-12);
        assert!(
            (w["cc"].as_f64().unwrap_or(0.0) / w["books"].as_f64().unwrap_or(1.0) - 0.67 / 0.045)
                .abs()
                < 1e-9
        );

        let cases = [
            (
                json!({"method": "unifrom", "domains": ["a"]}),
                "unknown `method`",
            ),
            (json!({"method": "natural"}), "needs `available`"),
            (
                json!({"method": "unimax", "available": {"a": 1.0}}),
                "needs `budget`",
            ),
            (
                json!({"method": "temperature", "domains": ["a", "b"], "available": {"a": 1.0}, "temperature": 2}),
                "differ from those with available tokens",
            ),
            (
                json!({"method": "explicit", "domains": ["a"], "weights": {"b": 1}}),
                "unknown domain `b`",
            ),
        ];
        for (p, expected) in cases {
            let err = MixtureKind
                .check(&params(p.clone()))
                .expect_err("bad params");
            assert!(err.contains(expected), "{p}: {err}");
        }
    }

    #[test]
    fn fanout_ids_and_csv_fields() {
        assert_eq!(fanout_run_id("proxy[books-x0.2]"), Some("books-x0.2"));
        assert_eq!(fanout_run_id("proxy[seed=1][base]"), Some("base"));
        assert_eq!(fanout_run_id("proxy"), None);
        assert_eq!(csv_field("books"), "books");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
        assert_eq!(csv_field("#x"), "\"#x\"");
    }

    #[test]
    fn data_replicates_share_the_seed_and_carry_a_data_seed() {
        let plan = json!({"domains": DOMAINS, "base_tokens": 3e8, "base_seeds": 3, "seed": 1, "replicate": "data"});
        let children = match DdoPlanKind.planned_fanout(plan.as_object().expect("map")) {
            Some(Ok(children)) => children,
            other => panic!("{:?}", other.map(|r| r.map(|c| c.len()))),
        };
        let seeds: Vec<(Option<u64>, Option<u64>)> = children
            .iter()
            .take(4)
            .map(|c| {
                let seed = |name: &str| c.params.get(name).and_then(Value::as_u64);
                (seed("seed"), seed("data_seed"))
            })
            .collect();
        assert_eq!(
            seeds,
            [
                (Some(1), None),
                (Some(1), Some(2)),
                (Some(1), Some(3)),
                (Some(1), None)
            ]
        );
        let bad = json!({"domains": DOMAINS, "base_tokens": 3e8, "replicate": "init"});
        let err = DdoPlanKind
            .check(bad.as_object().expect("map"))
            .expect_err("unknown");
        assert!(err.contains("replicate"), "{err}");
    }

    #[test]
    fn replicated_base_runs_carry_seeds_and_give_ddo_its_noise() {
        let h = Harness::new();
        let plan = json!({"domains": DOMAINS, "base_tokens": 3e8, "base_seeds": 3, "seed": 1});
        let (plan_dir, runs) = plan_and_train_with(&h, plan, 0.002);
        let fanout = read(&plan_dir.join("fanout.json"));
        let children = fanout["children"].as_array().expect("children");
        let ids: Vec<&str> = children.iter().filter_map(|c| c["id"].as_str()).collect();
        assert_eq!(ids[..4], ["base", "base-s1", "base-s2", "books-x0.2"]);
        let seeds: Vec<u64> = children
            .iter()
            .filter_map(|c| c["params"]["seed"].as_u64())
            .collect();
        assert_eq!(seeds, [1, 2, 3, 1, 1, 1, 1, 1, 1]);
        assert!(
            children
                .iter()
                .all(|c| c["params"].get("data_seed").is_none())
        );

        let (dir, summary) = h
            .run(
                &DdoKind,
                "ddo",
                json!({"bootstrap": 50}),
                ddo_inputs(&plan_dir, runs),
            )
            .expect("ddo");
        let report: DdoReport =
            serde_json::from_value(read(&dir.join("weights.json"))).expect("report");
        assert_eq!(report.noise.base_runs, 3);
        let sigma = report.noise.sigma.expect("measured");
        assert!((sigma - 0.002).abs() < 1e-4, "{sigma}");
        assert_eq!(report.bootstrap.as_ref().map(|b| b.resamples), Some(50));
        assert!(
            report
                .domains
                .iter()
                .all(|d| d.interval.is_some() && d.snr.is_some())
        );
        assert_eq!(summary["noise"]["base_runs"], 3);
        assert_eq!(summary["noise"]["sigma"].as_f64(), Some(sigma));
        assert!(
            summary["noise"]["snr"]["books"].as_f64().is_some(),
            "{summary}"
        );
        // results.csv keeps one row per base replicate.
        let csv = std::fs::read_to_string(dir.join("results.csv")).expect("csv");
        assert_eq!(
            csv.lines().filter(|l| l.starts_with(",1,")).count(),
            3,
            "{csv}"
        );
    }

    #[test]
    fn ddo_and_plan_check_the_new_params() {
        for bad in [
            json!({"flat_domains": "maybe"}),
            json!({"bootstrap": -1}),
            json!({"bootstrap": 1.5}),
        ] {
            assert!(DdoKind.check(&params(bad.clone())).is_err(), "{bad}");
        }
        assert!(
            DdoKind
                .check(&params(json!({"flat_domains": "fail", "bootstrap": 0})))
                .is_ok()
        );
        let err = DdoPlanKind
            .check(&params(
                json!({"domains": ["a", "b"], "base_tokens": 1e6, "base_seeds": 0}),
            ))
            .expect_err("no base run");
        assert!(err.contains("base_seeds"), "{err}");
        let err = DdoPlanKind
            .check(&params(
                json!({"domains": ["a", "b"], "base_tokens": 1e6, "base_seeds": 4_000_000_000u64}),
            ))
            .expect_err("too many runs");
        assert!(err.contains("more than the 10000"), "{err}");
        assert!(
            PredictKind
                .check(&params(json!({"steps": 1, "bootstrap": "x"})))
                .is_err()
        );
    }
}
