//! `autoscale mix`: the mixture math on results from any trainer, without a pipeline. DDO on a
//! CSV of proxy-run perplexities, the AutoScale prediction from optimal weights at two or more
//! scales, DDO's plan of proxy runs, and the baseline weightings. A table for people by default,
//! one JSON object with `--json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use autoscale_mixture::{
    BootstrapOptions, DdoOptions, FlatPolicy, MixError, MixtureWeights, Objective, PlanOptions,
    ScaleComposition, Target,
};
use autoscale_stages::{BaselineError, BaselineMethod, BaselineRequest, baseline_weights};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::exit;
use crate::render::Failure;
use autoscale_errors::Hint;

#[derive(Debug, Args)]
pub struct MixArgs {
    #[command(subcommand)]
    command: MixCommand,
}

#[derive(Debug, Subcommand)]
enum MixCommand {
    /// Direct Data Optimization: the optimal weights at one scale from the proxy runs' results.
    Ddo(DdoArgs),
    /// AutoScale: the optimal weights at a larger scale from optimal weights at two or more.
    Predict(PredictArgs),
    /// The proxy runs DDO needs: the base run, then each domain scaled by each multiplier.
    Plan(PlanArgs),
    /// Baseline weights: uniform, natural, LLaMA, UniMax, temperature or explicit.
    Baseline(BaselineArgs),
}

#[derive(Debug, Args)]
struct DdoArgs {
    /// The runs' results: header `perturbed,multiplier,<domain>,...` with one validation
    /// perplexity column per evaluation domain; the base run has an empty `perturbed` and
    /// multiplier 1. Lines starting with `#` are comments.
    #[arg(long, value_name = "FILE.csv")]
    results: PathBuf,
    /// The least multiplier of any domain's base tokens, in [0, 1].
    #[arg(long, value_name = "N", default_value_t = 0.2)]
    lower_bound: f64,
    /// What to minimise over the evaluation domains.
    #[arg(long, value_enum, default_value_t = ObjectiveArg::MeanPpl)]
    objective: ObjectiveArg,
    /// The base run's total tokens (3e8, 300M): adds the optimal token quantities.
    #[arg(long, value_name = "TOKENS", value_parser = parse_tokens)]
    tokens: Option<f64>,
    /// The base run's composition when it was not uniform: `{"books": 0.3, ...}` or
    /// `{"weights": {...}}`.
    #[arg(long, value_name = "FILE.json")]
    base_weights: Option<PathBuf>,
    /// A domain whose objective does not fall with more data: `bound` gives it the lower bound
    /// and a warning, `fail` stops with an error.
    #[arg(long, value_enum, default_value_t = FlatArg::Bound)]
    flat_domains: FlatArg,
    /// Bootstrap resamples for the weights' 5-95% intervals, given two or more base rows
    /// (replicates of the base run); 0 turns them off.
    #[arg(long, value_name = "N", default_value_t = BootstrapOptions::default().resamples)]
    bootstrap: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FlatArg {
    /// The domain gets the lower bound; the others share the rest of the budget.
    Bound,
    /// Stop with an error.
    Fail,
}

impl From<FlatArg> for FlatPolicy {
    fn from(f: FlatArg) -> Self {
        match f {
            FlatArg::Bound => FlatPolicy::Bound,
            FlatArg::Fail => FlatPolicy::Fail,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    /// The mean validation perplexity (the paper's choice).
    MeanPpl,
    /// The mean validation loss, `ln ppl`.
    MeanLoss,
    /// The worst domain's perplexity.
    MaxPpl,
}

impl From<ObjectiveArg> for Objective {
    fn from(o: ObjectiveArg) -> Self {
        match o {
            ObjectiveArg::MeanPpl => Objective::MeanPerplexity,
            ObjectiveArg::MeanLoss => Objective::MeanLoss,
            ObjectiveArg::MaxPpl => Objective::WorstPerplexity,
        }
    }
}

#[derive(Debug, Args)]
struct PredictArgs {
    /// Optimal weights at one scale, as TOKENS=FILE.json (`{"books": 0.3, ...}`, a `mix ddo
    /// --json` output...); give two or more. A file that records its total (`mix ddo --tokens`,
    /// `mix predict`) may be given alone.
    #[arg(long = "at", value_name = "TOKENS=FILE", value_parser = parse_scale, required = true)]
    at: Vec<(Option<f64>, PathBuf)>,
    /// The total tokens to predict the composition at (3e10, 30B).
    #[arg(long, value_name = "TOKENS", value_parser = parse_tokens, required_unless_present = "steps", conflicts_with = "steps")]
    target: Option<f64>,
    /// Or: apply AutoScale's rule K times past the largest scale.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    steps: Option<u32>,
    /// Bootstrap resamples for the predicted weights' 5-95% intervals, when every file is a
    /// `mix ddo --json` report from two or more base runs; 0 turns them off.
    #[arg(long, value_name = "N", default_value_t = BootstrapOptions::default().resamples)]
    bootstrap: u32,
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// The domains to mix.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',', required = true)]
    domains: Vec<String>,
    /// The base run's total tokens (3e8, 300M).
    #[arg(long, value_name = "TOKENS", value_parser = parse_tokens)]
    tokens: f64,
    /// What each domain's tokens are multiplied by, one run per domain and multiplier.
    #[arg(long, value_name = "R,...", value_delimiter = ',', default_values_t = [0.2, 3.0])]
    multipliers: Vec<f64>,
    /// The base run's composition when not uniform: `{"books": 0.3, ...}` or `{"weights": {...}}`.
    #[arg(long, value_name = "FILE.json")]
    base_weights: Option<PathBuf>,
    /// Replicates of the base run (`base`, `base-s1`, ...) with seeds SEED, SEED+1, ...: two or
    /// more let `mix ddo` measure the noise.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    base_seeds: u32,
    /// The seed of the first base run and of every perturbed run.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    seed: u64,
    /// What the replicates redraw: `seed` (initialisation and data: seeds SEED+k) or `data`
    /// (the same seed, data_seed SEED+k: the noise the paired ratios carry).
    #[arg(long, value_name = "seed|data", default_value = "seed")]
    replicate: String,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    /// uniform: 1/m each; natural: in proportion to the tokens available; llama: LLaMA-1's
    /// RedPajama proportions; unimax: as uniform as the epoch cap allows; temperature: natural
    /// proportions to the power 1/T; explicit: the weights you give.
    #[arg(value_name = "METHOD", value_parser = PossibleValuesParser::new(BaselineMethod::NAMES))]
    method: String,
    /// The domains to weight (uniform, llama; checks the others).
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    domains: Vec<String>,
    /// Tokens available per domain (natural, unimax, temperature).
    #[arg(long, value_name = "DOMAIN=TOKENS,...", value_delimiter = ',', value_parser = parse_named_tokens)]
    available: Vec<(String, f64)>,
    /// Total training tokens (unimax).
    #[arg(long, value_name = "TOKENS", value_parser = parse_tokens)]
    budget: Option<f64>,
    /// The most passes over any domain (unimax).
    #[arg(long, value_name = "N", default_value_t = 4.0)]
    max_epochs: f64,
    /// T in w ~ p^(1/T) (temperature).
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Your domain names onto RedPajama subsets, for names llama does not know.
    #[arg(long, value_name = "DOMAIN=SUBSET,...", value_delimiter = ',', value_parser = parse_pair)]
    map: Vec<(String, String)>,
    /// The weights (explicit), renormalised.
    #[arg(long, value_name = "DOMAIN=WEIGHT,...", value_delimiter = ',', value_parser = parse_named_number)]
    weights: Vec<(String, f64)>,
}

pub fn run(args: MixArgs, json: bool) -> Result<u8, Failure> {
    match args.command {
        MixCommand::Ddo(args) => ddo(args, json),
        MixCommand::Predict(args) => predict(args, json),
        MixCommand::Plan(args) => plan(args, json),
        MixCommand::Baseline(args) => baseline(args, json),
    }
}

fn ddo(args: DdoArgs, json: bool) -> Result<u8, Failure> {
    let options = DdoOptions {
        objective: args.objective.into(),
        min_multiplier: args.lower_bound,
        base_weights: args.base_weights.as_deref().map(read_weights).transpose()?,
        scale_tokens: args.tokens,
        flat_domains: args.flat_domains.into(),
        bootstrap: BootstrapOptions {
            resamples: args.bootstrap,
            ..BootstrapOptions::default()
        },
    };
    let report = autoscale_mixture::ddo_from_csv_path(&args.results, &options).map_err(|e| {
        failure(
            Some(&args.results),
            e,
            "`autoscale mix ddo --help` describes the CSV",
        )
    })?;
    if json {
        print_json(&report);
    } else {
        print_text(&report.render_table());
    }
    Ok(exit::OK)
}

fn predict(args: PredictArgs, json: bool) -> Result<u8, Failure> {
    let target = match (args.target, args.steps) {
        (Some(tokens), _) => Target::TotalTokens(tokens),
        (None, Some(k)) => Target::Steps(k),
        (None, None) => {
            return Err(Failure::usage(
                "nothing to predict at",
                "give --target TOKENS or --steps K",
            ));
        }
    };
    let mut scales = Vec::with_capacity(args.at.len());
    for (total, path) in &args.at {
        let text = weights_json(path)?;
        let origin = format!("`{}`", path.display());
        let total = total.or_else(|| recorded_total(&text)).ok_or_else(|| {
            Failure::usage(
                format!(
                    "`{}` does not record at how many tokens its weights are optimal",
                    path.display()
                ),
                format!("give the total: --at TOKENS={}", path.display()),
            )
        })?;
        scales.push(
            ScaleComposition::from_json(total, &text, &origin)
                .map_err(|e| failure(Some(path), e, WEIGHTS_FILE_HINT))?,
        );
    }
    let bootstrap = BootstrapOptions {
        resamples: args.bootstrap,
        ..BootstrapOptions::default()
    };
    let prediction = autoscale_mixture::predict_with_bootstrap(&scales, target, &bootstrap)
        .map_err(|e| {
        failure(
            None,
            e,
            "give two or more --at TOKENS=FILE.json, each the optimal weights at a different scale",
        )
    })?;
    if json {
        print_json(&prediction);
    } else {
        print_text(&prediction.render_table());
    }
    Ok(exit::OK)
}

fn plan(args: PlanArgs, json: bool) -> Result<u8, Failure> {
    let options = PlanOptions {
        multipliers: args.multipliers,
        base_weights: args.base_weights.as_deref().map(read_weights).transpose()?,
        base_seeds: args.base_seeds,
        seed: args.seed,
        replicate: args
            .replicate
            .parse()
            .map_err(|e| failure(None, e, "`--replicate seed` or `--replicate data`"))?,
    };
    let runs = autoscale_mixture::plan(&args.domains, args.tokens, &options).map_err(|e| {
        failure(
            None,
            e,
            "e.g. `autoscale mix plan --domains books,c4 --tokens 3e8 --multipliers 0.2,3`",
        )
    })?;
    if json {
        print_json(&json!({ "runs": runs }));
    } else {
        let mut text = autoscale_mixture::render_plan_table(&runs);
        text.push_str(&format!(
            "{} runs; write their validation perplexities as a CSV for `autoscale mix ddo`\n",
            runs.len()
        ));
        print_text(&text);
    }
    Ok(exit::OK)
}

fn baseline(args: BaselineArgs, json: bool) -> Result<u8, Failure> {
    let method = BaselineMethod::parse(&args.method).ok_or_else(|| {
        Failure::usage(
            format!("unknown baseline `{}`", args.method),
            format!("choose one of {}", BaselineMethod::NAMES.join(", ")),
        )
    })?;
    let request = BaselineRequest {
        domains: (!args.domains.is_empty()).then_some(args.domains),
        available: named_map("--available", args.available)?,
        budget: args.budget,
        max_epochs: Some(args.max_epochs),
        temperature: args.temperature,
        weights: named_map("--weights", args.weights)?,
        map: named_map("--map", args.map)?.unwrap_or_default(),
    };
    let weights = baseline_weights(method, &request).map_err(|e| {
        let hint = e.hint().unwrap_or_else(|| match (&e, method) {
            (BaselineError::Missing { field, .. }, _) => {
                format!("add --{}", field.replace('_', "-"))
            }
            (_, BaselineMethod::Llama) => {
                "map your domain names onto RedPajama subsets with --map DOMAIN=SUBSET".to_owned()
            }
            _ => format!(
                "`autoscale mix baseline {} --help` lists what it takes",
                method.name()
            ),
        });
        Failure::usage(e.to_string(), hint)
    })?;
    if json {
        print_json(&json!({ "method": method.name(), "weights": weights }));
    } else {
        print_text(&format!(
            "{} weights\n{}",
            method.name(),
            weights.render_table()
        ));
    }
    Ok(exit::OK)
}

const WEIGHTS_FILE_HINT: &str = "a weights file is `{\"books\": 0.3, ...}` or has a `weights` map, like `autoscale mix ddo --json` output";

/// A crate error as a usage error: the file it concerns, the error and its causes, and its hint
/// (else `fallback`).
fn failure(file: Option<&Path>, e: MixError, fallback: &str) -> Failure {
    let mut message = match (file, &e) {
        (Some(path), e) if !matches!(e, MixError::Io { .. }) => {
            format!("`{}`: {e}", path.display())
        }
        _ => e.to_string(),
    };
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Failure::usage(message, e.hint().unwrap_or_else(|| fallback.to_owned()))
}

/// A weights file's text with a top-level `weights` map: a plain `{"books": 0.3}` is wrapped.
fn weights_json(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::usage(
            format!("cannot read `{}`: {e}", path.display()),
            "check the path",
        )
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        Failure::usage(
            format!("`{}` is not JSON: {e}", path.display()),
            WEIGHTS_FILE_HINT,
        )
    })?;
    Ok(match value {
        Value::Object(map) if !map.contains_key("weights") => json!({ "weights": map }).to_string(),
        _ => text,
    })
}

/// The total a weights file was computed at: a DDO report's `scale_tokens`, a prediction's
/// `total_tokens`.
fn recorded_total(json: &str) -> Option<f64> {
    let value: Value = serde_json::from_str(json).ok()?;
    value["scale_tokens"]
        .as_f64()
        .or_else(|| value["total_tokens"].as_f64())
}

fn read_weights(path: &Path) -> Result<MixtureWeights, Failure> {
    let origin = format!("`{}`", path.display());
    ScaleComposition::from_json(1.0, &weights_json(path)?, &origin)
        .map(|c| c.weights)
        .map_err(|e| failure(Some(path), e, WEIGHTS_FILE_HINT))
}

/// `NAME=VALUE` pairs as a map; `None` when none were given, an error on a repeated name.
fn named_map<T>(
    flag: &str,
    pairs: Vec<(String, T)>,
) -> Result<Option<BTreeMap<String, T>>, Failure> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut map = BTreeMap::new();
    for (name, value) in pairs {
        if map.contains_key(&name) {
            return Err(Failure::usage(
                format!("{flag} names `{name}` twice"),
                "give each domain once",
            ));
        }
        map.insert(name, value);
    }
    Ok(Some(map))
}

/// A token count: `3e8`, `300000000`, `300_000_000`, or with a suffix: `50k`, `300M`, `1.2B`
/// (also `G`), `2T`.
fn parse_tokens(text: &str) -> Result<f64, String> {
    let clean = text.trim().replace('_', "");
    let (number, factor) = match clean.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&clean[..clean.len() - 1], 1e3),
        Some('M') => (&clean[..clean.len() - 1], 1e6),
        Some('B' | 'G') => (&clean[..clean.len() - 1], 1e9),
        Some('T') => (&clean[..clean.len() - 1], 1e12),
        _ => (clean.as_str(), 1.0),
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .map(|n| n * factor)
        .filter(|n| n.is_finite() && *n > 0.0)
        .ok_or_else(|| {
            format!(
                "`{text}` is not a positive token count; write e.g. 3e8, 300000000, 300M or 1.2B"
            )
        })
}

/// `TOKENS=FILE`, e.g. `3e8=weights.json`, or a lone `FILE` that records its total.
fn parse_scale(text: &str) -> Result<(Option<f64>, PathBuf), String> {
    let Some((tokens, path)) = text.split_once('=') else {
        return Ok((None, PathBuf::from(text.trim())));
    };
    if path.trim().is_empty() {
        return Err(format!("`{text}` names no file after `=`"));
    }
    Ok((Some(parse_tokens(tokens)?), PathBuf::from(path.trim())))
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() && !value.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

fn parse_named_tokens(text: &str) -> Result<(String, f64), String> {
    let (name, value) = parse_pair(text)?;
    Ok((name, parse_tokens(&value)?))
}

fn parse_named_number(text: &str) -> Result<(String, f64), String> {
    let (name, value) = parse_pair(text)?;
    let number = value
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| format!("`{value}` in `{text}` is not a non-negative number"))?;
    Ok((name, number))
}

fn print_json(value: &impl serde::Serialize) {
    let line = serde_json::to_string(value).unwrap_or_default();
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn print_text(text: &str) {
    let _ = write!(std::io::stdout().lock(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_read_plain_scientific_and_suffixed() {
        assert_eq!(parse_tokens("3e8"), Ok(3e8));
        assert_eq!(parse_tokens("300000000"), Ok(3e8));
        assert_eq!(parse_tokens("300_000_000"), Ok(3e8));
        assert_eq!(parse_tokens("300M"), Ok(3e8));
        assert_eq!(parse_tokens("1.2B"), Ok(1.2e9));
        assert_eq!(parse_tokens("50k"), Ok(5e4));
        assert_eq!(parse_tokens("2T"), Ok(2e12));
        for bad in ["", "M", "-3e8", "0", "3x", "inf", "1e"] {
            assert!(parse_tokens(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_scale("300M=w.json"),
            Ok((Some(3e8), PathBuf::from("w.json")))
        );
        assert_eq!(parse_scale("w.json"), Ok((None, PathBuf::from("w.json"))));
        assert!(parse_scale("3x=w.json").is_err());
        assert!(parse_scale("3e8=").is_err());
        assert_eq!(parse_named_tokens("books=2B"), Ok(("books".into(), 2e9)));
        assert!(parse_named_number("a=-1").is_err());
    }
}
