//! Direct Data Optimization (DDO) at one data scale: the plan of proxy runs, reading their
//! results from a CSV, the per-domain curve fits and the exact KKT solve for the weights.
//!
//! Multipliers are relative to the base run: domain `i` trains on `n_i * w0_i * N` tokens where
//! `w0` are the base weights and `N` the base total. With uniform `w0 = 1/m` the budget
//! constraint `sum_i w0_i n_i = 1` is the paper's `sum_i n_i = m`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::bootstrap::BootstrapOptions;
use crate::fit::{CurveFit, PowerCurve, fit_power_curve, fit_primary_curve, refit_power_curve};
use crate::{MixError, MixtureWeights, TokenQuantities, table};

/// How one run's per-domain validation perplexities become the single number DDO minimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// `(1/K) sum_k ppl_k` over the K evaluation domains (the paper's choice).
    #[default]
    MeanPerplexity,
    /// `(1/K) sum_k ln ppl_k`, the mean validation loss in nats.
    MeanLoss,
    /// `max_k ppl_k`, the worst evaluation domain.
    WorstPerplexity,
}

impl Objective {
    pub fn evaluate(self, perplexities: &[f64]) -> f64 {
        let k = perplexities.len() as f64;
        match self {
            Self::MeanPerplexity => perplexities.iter().sum::<f64>() / k,
            Self::MeanLoss => perplexities.iter().map(|p| p.ln()).sum::<f64>() / k,
            Self::WorstPerplexity => perplexities.iter().copied().fold(f64::MIN, f64::max),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::MeanPerplexity => "mean-perplexity",
            Self::MeanLoss => "mean-loss",
            Self::WorstPerplexity => "worst-perplexity",
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Objective {
    type Err = MixError;
    fn from_str(s: &str) -> Result<Self, MixError> {
        match s {
            "mean-perplexity" | "mean-ppl" | "ppl" => Ok(Self::MeanPerplexity),
            "mean-loss" | "loss" => Ok(Self::MeanLoss),
            "worst-perplexity" | "max-ppl" | "worst" => Ok(Self::WorstPerplexity),
            _ => Err(MixError::invalid(
                "objective",
                format!("`{s}`; expected mean-perplexity, mean-loss or worst-perplexity"),
            )),
        }
    }
}

/// Which proxy runs to train: the multipliers applied to one domain at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Quantity multipliers per domain, `[1/5, 3]` by default (the paper's `r_lo`, `r_hi`).
    pub multipliers: Vec<f64>,
    /// Base composition; uniform when `None`.
    pub base_weights: Option<MixtureWeights>,
    /// Replicates of the base run with different seeds (1 by default). Their spread is the
    /// only measure of the proxy runs' noise, so two or more let DDO say what is signal.
    #[serde(default = "one")]
    pub base_seeds: u32,
    /// The seed of the first base run and of every perturbed run; replicate `k` gets `seed + k`
    /// (as its seed, or as its data seed alone; see [`Replicate`]).
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub replicate: Replicate,
}

fn one() -> u32 {
    1
}

/// What the base replicates vary, and so which noise their spread measures.
///
/// The perturbed runs share the first base run's seed, and DDO's ratios pair them with it.
/// Two runs of one seed share the initialisation, and differ in their data draw only as much
/// as their mixtures differ, so the noise left in a ratio is the data draw's. `Data` replicates
/// measure exactly that: they share the seed and redraw the data (`data_seed: seed + k`).
/// `Seed` replicates redraw the initialisation too, so their spread also holds the
/// initialisation's luck, which the paired ratios do not carry: a conservative σ, and the
/// only one for a trainer that has no separate data seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replicate {
    /// New seed per replicate: initialisation and data draw (`seed: seed + k`).
    #[default]
    Seed,
    /// Same seed, new data draw per replicate (`data_seed: seed + k`); the trainer must take
    /// a `data_seed` param, as the built-in `train` kind does.
    Data,
}

impl FromStr for Replicate {
    type Err = MixError;
    fn from_str(s: &str) -> Result<Self, MixError> {
        match s {
            "seed" => Ok(Self::Seed),
            "data" => Ok(Self::Data),
            other => Err(MixError::invalid(
                "replicate",
                format!(
                    "`{other}`; use `seed` (initialisation and data) or `data` (data draw only)"
                ),
            )),
        }
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            multipliers: vec![0.2, 3.0],
            base_weights: None,
            base_seeds: 1,
            seed: 0,
            replicate: Replicate::Seed,
        }
    }
}

/// One proxy training run of the DDO plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// `base`, or `<domain>-x<multiplier>` such as `books-x0.2`.
    pub id: String,
    /// The scaled domain; `None` for the base run.
    pub perturbed: Option<String>,
    pub multiplier: f64,
    pub tokens: TokenQuantities,
    pub weights: MixtureWeights,
    pub total_tokens: f64,
    /// The training seed: perturbed runs share the first base run's, so their differences
    /// from it are not seed noise.
    #[serde(default)]
    pub seed: u64,
    /// The data draw's seed, when a replicate redraws only its data ([`Replicate::Data`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_seed: Option<u64>,
}

/// The `base_seeds + m * multipliers.len()` runs DDO needs at base total `base_tokens`: the
/// base run (`base`, then replicates `base-s1`, `base-s2`, ... with seeds `seed + k`), then for
/// each domain `i` and multiplier `r` the base quantities with `N_i` replaced by `r * N_i` (the
/// total changes with it).
pub fn plan(
    domains: &[String],
    base_tokens: f64,
    options: &PlanOptions,
) -> Result<Vec<PlannedRun>, MixError> {
    if !(base_tokens.is_finite() && base_tokens > 0.0) {
        return Err(MixError::invalid(
            "base tokens",
            format!("{base_tokens}; must be positive"),
        ));
    }
    let mut multipliers = options.multipliers.clone();
    multipliers.sort_by(f64::total_cmp);
    if multipliers.len() < 2
        || multipliers.windows(2).any(|w| w[0] == w[1])
        || multipliers
            .iter()
            .any(|r| !(r.is_finite() && *r > 0.0) || *r == 1.0)
    {
        return Err(MixError::invalid(
            "multipliers",
            format!(
                "{multipliers:?}; DDO needs at least two distinct positive multipliers other than 1"
            ),
        ));
    }
    if options.base_seeds == 0 {
        return Err(MixError::invalid(
            "base seeds",
            "0; DDO needs at least one base run",
        ));
    }
    let base = base_weights_for(domains, options.base_weights.as_ref())?;
    let base_tokens_of: BTreeMap<String, f64> = domains
        .iter()
        .zip(&base)
        .map(|(d, w)| (d.clone(), w * base_tokens))
        .collect();
    let run = |perturbed: Option<&String>,
               multiplier: f64,
               replicate: u32|
     -> Result<PlannedRun, MixError> {
        let tokens = TokenQuantities::new(base_tokens_of.iter().map(|(d, &n)| {
            let scaled = if Some(d) == perturbed {
                n * multiplier
            } else {
                n
            };
            (d.clone(), scaled)
        }))?;
        let id = match (perturbed, replicate) {
            (Some(d), _) => format!("{d}-x{multiplier}"),
            (None, 0) => "base".to_owned(),
            (None, k) => format!("base-s{k}"),
        };
        Ok(PlannedRun {
            id,
            perturbed: perturbed.cloned(),
            multiplier,
            total_tokens: tokens.total(),
            weights: tokens.to_weights()?,
            tokens,
            seed: match options.replicate {
                Replicate::Seed => options.seed.wrapping_add(u64::from(replicate)),
                Replicate::Data => options.seed,
            },
            data_seed: (options.replicate == Replicate::Data && replicate > 0)
                .then(|| options.seed.wrapping_add(u64::from(replicate))),
        })
    };
    let mut runs = Vec::new();
    for k in 0..options.base_seeds {
        runs.push(run(None, 1.0, k)?);
    }
    for d in domains {
        for &r in &multipliers {
            runs.push(run(Some(d), r, 0)?);
        }
    }
    Ok(runs)
}

/// A fixed-width table of the plan: one row per run with its total and per-domain tokens.
pub fn render_plan_table(runs: &[PlannedRun]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let domains: Vec<&str> = first.tokens.domains().collect();
    let mut headers = vec!["run", "total"];
    headers.extend(&domains);
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let mut row = vec![r.id.clone(), format!("{:.3e}", r.total_tokens)];
            row.extend(
                domains
                    .iter()
                    .map(|d| format!("{:.3e}", r.tokens.get(d).unwrap_or(0.0))),
            );
            row
        })
        .collect();
    table::render(&headers, &rows)
}

/// Validated results of the DDO runs, as read from the CSV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdoRuns {
    /// Perplexity columns, in CSV order. Domains never perturbed count in the objective only.
    pub eval_domains: Vec<String>,
    /// The base run's perplexities, in `eval_domains` order: one row per replicate (seed).
    pub base: Vec<Vec<f64>>,
    pub perturbed: Vec<PerturbedRun>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerturbedRun {
    pub domain: String,
    pub multiplier: f64,
    /// In `eval_domains` order.
    pub perplexities: Vec<f64>,
    /// The CSV line it came from, for error messages.
    pub line: u64,
}

impl DdoRuns {
    /// Perturbed (trained) domains in column order.
    pub fn trained_domains(&self) -> Vec<&str> {
        self.eval_domains
            .iter()
            .filter(|d| self.perturbed.iter().any(|r| &r.domain == *d))
            .map(String::as_str)
            .collect()
    }
}

/// Reads DDO results: header `perturbed,multiplier,<domain>,...`, one row per run, the base
/// run with an empty `perturbed` and multiplier 1, one validation-perplexity column per
/// evaluation domain. Several base rows are replicates of the base run with different seeds;
/// a perturbed run given twice is an error. Lines starting with `#` are comments.
pub fn parse_ddo_csv(reader: impl Read) -> Result<DdoRuns, MixError> {
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(reader);
    let csv_error = |source: csv::Error| MixError::Csv {
        line: source.position().map(csv::Position::line),
        source,
    };
    let headers = csv.headers().map_err(csv_error)?.clone();
    let find = |column: &'static str| {
        headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(column))
            .ok_or_else(|| MixError::MissingColumn {
                column,
                found: headers.iter().collect::<Vec<_>>().join(","),
            })
    };
    let (perturbed_col, multiplier_col) = (find("perturbed")?, find("multiplier")?);
    let eval_cols: Vec<usize> = (0..headers.len())
        .filter(|&i| i != perturbed_col && i != multiplier_col)
        .collect();
    let eval_domains: Vec<String> = eval_cols.iter().map(|&i| headers[i].to_owned()).collect();
    if eval_domains.is_empty() {
        return Err(MixError::invalid(
            "CSV header",
            "no perplexity columns; add one column per evaluation domain",
        ));
    }
    if let Some(bad) = eval_domains
        .iter()
        .enumerate()
        .find(|(i, d)| d.is_empty() || eval_domains[..*i].contains(d))
    {
        return Err(MixError::invalid(
            "CSV header",
            format!("domain column `{}` is empty or repeated", bad.1),
        ));
    }

    let mut base: Vec<Vec<f64>> = Vec::new();
    let mut perturbed = Vec::new();
    let mut seen: HashMap<(String, u64), u64> = HashMap::new();
    for record in csv.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, csv::Position::line);
        let bad = |column: &str, value: &str, reason: &str| MixError::BadValue {
            line,
            column: column.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let domain = record.get(perturbed_col).unwrap_or_default();
        let raw = record.get(multiplier_col).unwrap_or_default();
        let multiplier = raw
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m > 0.0)
            .ok_or_else(|| bad("multiplier", raw, "is not a positive number"))?;
        if domain.is_empty() && multiplier != 1.0 {
            return Err(bad(
                "multiplier",
                raw,
                "is not 1, but an empty `perturbed` marks the base run",
            ));
        }
        if !domain.is_empty() && multiplier == 1.0 {
            return Err(bad(
                "multiplier",
                raw,
                "on a perturbed run reproduces the base run; drop the row or leave `perturbed` empty",
            ));
        }
        if !domain.is_empty() && !eval_domains.iter().any(|d| d == domain) {
            return Err(MixError::UnknownPerturbedDomain {
                line,
                domain: domain.to_owned(),
                known: eval_domains.join(", "),
            });
        }
        let mut perplexities = Vec::with_capacity(eval_cols.len());
        for (&col, name) in eval_cols.iter().zip(&eval_domains) {
            let cell = record.get(col).unwrap_or_default();
            let ppl = cell
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite() && *p > 0.0)
                .ok_or_else(|| bad(name, cell, "is not a positive, finite perplexity"))?;
            perplexities.push(ppl);
        }
        if domain.is_empty() {
            base.push(perplexities);
            continue;
        }
        if let Some(first_line) = seen.insert((domain.to_owned(), multiplier.to_bits()), line) {
            return Err(MixError::DuplicateRow {
                line,
                first_line,
                run: format!("`{domain}` x{multiplier}"),
            });
        }
        perturbed.push(PerturbedRun {
            domain: domain.to_owned(),
            multiplier,
            perplexities,
            line,
        });
    }
    if base.is_empty() {
        return Err(MixError::MissingBaseRow);
    }
    let runs = DdoRuns {
        eval_domains,
        base,
        perturbed,
    };
    if runs.perturbed.is_empty() {
        return Err(MixError::invalid(
            "DDO runs",
            "only a base run; add perturbed runs (`autoscale mix plan` lists them)",
        ));
    }
    for domain in runs.trained_domains() {
        let found = runs.perturbed.iter().filter(|r| r.domain == domain).count();
        if found < 2 {
            return Err(MixError::TooFewMultipliers {
                domain: domain.to_owned(),
                found,
            });
        }
    }
    Ok(runs)
}

/// What DDO does with a trained domain whose objective does not fall with more of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlatPolicy {
    /// Give it the lower bound and share the rest of the budget among the others: proxy runs
    /// are noisy, and a domain with no measurable benefit at this scale is a finding.
    #[default]
    Bound,
    /// Stop with [`MixError::NotDecreasing`].
    Fail,
}

impl FlatPolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bound => "bound",
            Self::Fail => "fail",
        }
    }
}

impl FromStr for FlatPolicy {
    type Err = MixError;
    fn from_str(s: &str) -> Result<Self, MixError> {
        match s {
            "bound" => Ok(Self::Bound),
            "fail" => Ok(Self::Fail),
            _ => Err(MixError::invalid(
                "flat-domain policy",
                format!("`{s}`; expected bound or fail"),
            )),
        }
    }
}

/// Settings of the DDO fit and solve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdoOptions {
    pub objective: Objective,
    /// Lower bound `n_min` on every multiplier (0.2 by default): the solve never starves a
    /// domain below a fifth of its base quantity, the smallest amount the fits have seen.
    pub min_multiplier: f64,
    /// Base composition of the trained domains; uniform when `None`.
    pub base_weights: Option<MixtureWeights>,
    /// The base run's total tokens `N`; when given the report carries token quantities.
    pub scale_tokens: Option<f64>,
    #[serde(default)]
    pub flat_domains: FlatPolicy,
    /// Intervals on the weights by a parametric bootstrap; it needs two or more base runs to
    /// measure the noise, and `resamples: 0` turns it off.
    #[serde(default)]
    pub bootstrap: BootstrapOptions,
}

impl Default for DdoOptions {
    fn default() -> Self {
        Self {
            objective: Objective::default(),
            min_multiplier: 0.2,
            base_weights: None,
            scale_tokens: None,
            flat_domains: FlatPolicy::default(),
            bootstrap: BootstrapOptions::default(),
        }
    }
}

/// A fitted objective ratio point: the run with the domain at `multiplier`, divided by base.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub multiplier: f64,
    pub ratio: f64,
}

/// DDO's result for one trained domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainResult {
    pub name: String,
    pub base_weight: f64,
    /// Optimal weight `w_i = w0_i n_i` (renormalised).
    pub weight: f64,
    /// Optimal multiplier `n_i` of the base quantity.
    pub multiplier: f64,
    /// `w_i * N` when the scale `N` is known.
    pub tokens: Option<f64>,
    /// The fitted curve; `None` for a flat domain, which has no decreasing curve to fit.
    pub fit: Option<PowerCurve>,
    /// The other exact interpolant of three points, if any; see [`crate::CurveFit`].
    pub alternate: Option<PowerCurve>,
    /// `None` for a flat domain.
    pub fit_rms: Option<f64>,
    pub points: Vec<CurvePoint>,
    /// True when `n_i` sits on `min_multiplier`: a floor, not an interior optimum.
    pub on_bound: bool,
    /// True when the objective did not fall with more of the domain, so it was given the
    /// lower bound without a fit ([`FlatPolicy::Bound`]).
    #[serde(default)]
    pub flat: bool,
    /// `|y(r_hi) - y(r_lo)| / sigma` over the smallest and largest multiplier: the domain's
    /// effect in units of the runs' noise. `None` when the noise was not measured (one base
    /// run) or is zero.
    #[serde(default)]
    pub snr: Option<f64>,
    /// True when `snr < 2`: the effect is not distinguishable from noise.
    #[serde(default)]
    pub within_noise: bool,
    /// The bootstrap's percentile interval of `weight` (5-95% by default).
    #[serde(default)]
    pub interval: Option<[f64; 2]>,
}

/// The noise of the proxy runs, measured on the base run's replicates (seeds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    pub base_runs: usize,
    /// Each base replicate's objective, the paired one (the perturbed runs' seed) first: it
    /// is the report's `base_objective`.
    pub base_objectives: Vec<f64>,
    /// Sample standard deviation of `base_objectives` over their mean: the noise in units of
    /// the objective ratio `y`. `None` with a single base run.
    pub sigma: Option<f64>,
    pub note: String,
}

impl Default for Noise {
    fn default() -> Self {
        Self {
            base_runs: 1,
            base_objectives: Vec::new(),
            sigma: None,
            note: "noise not recorded".to_owned(),
        }
    }
}

impl Noise {
    fn measure(base_objectives: Vec<f64>, mean: f64) -> Self {
        let k = base_objectives.len();
        let sigma = (k >= 2).then(|| {
            let var = base_objectives
                .iter()
                .map(|o| (o - mean).powi(2))
                .sum::<f64>()
                / (k - 1) as f64;
            var.sqrt() / mean.abs()
        });
        let note = match k {
            1 => "single base run: noise not measured".to_owned(),
            2 => "sigma from 2 base runs (1 degree of freedom)".to_owned(),
            _ => format!("sigma from {k} base runs ({} degrees of freedom)", k - 1),
        };
        Self {
            base_runs: k,
            base_objectives,
            sigma,
            note,
        }
    }
}

/// The full DDO result. The top-level `weights` map makes this JSON readable as a plain
/// weights file by [`crate::ScaleComposition::from_json`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdoReport {
    pub objective: Objective,
    /// The objective of the first base replicate, the one whose seed every perturbed run
    /// shares: every ratio divides by it, so a seed's luck cancels out of the ratios.
    pub base_objective: f64,
    /// Predicted objective at the optimum over the base objective, from the additive model
    /// `1 + sum_i (y_i(n_i) - y_i(1))` over the fitted (not flat) domains.
    pub predicted_objective_ratio: f64,
    pub min_multiplier: f64,
    pub scale_tokens: Option<f64>,
    pub weights: MixtureWeights,
    pub tokens: Option<TokenQuantities>,
    pub domains: Vec<DomainResult>,
    /// Evaluation domains never perturbed: they shape the objective but get no weight.
    pub eval_only_domains: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(default)]
    pub noise: Noise,
    /// The bootstrap behind the `interval`s, when one ran.
    #[serde(default)]
    pub bootstrap: Option<BootstrapOptions>,
}

/// DDO's inputs once the runs are reduced to objective ratios: enough to redo the fit and
/// solve, which the bootstrap does on resampled ratios. [`DdoReport::evidence`] rebuilds it
/// from a report, so the predictor can redo DDO at each scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdoEvidence {
    pub domains: Vec<String>,
    pub base_weights: Vec<f64>,
    /// Per domain, its points sorted by multiplier, the base point `(1, 1)` among them.
    pub points: Vec<Vec<CurvePoint>>,
    pub min_multiplier: f64,
    pub base_runs: usize,
    pub sigma: Option<f64>,
}

/// Reads the CSV (see [`parse_ddo_csv`]) and runs [`ddo`].
pub fn ddo_from_csv(reader: impl Read, options: &DdoOptions) -> Result<DdoReport, MixError> {
    ddo(&parse_ddo_csv(reader)?, options)
}

/// [`ddo_from_csv`] on a file.
pub fn ddo_from_csv_path(path: &Path, options: &DdoOptions) -> Result<DdoReport, MixError> {
    let file = std::fs::File::open(path).map_err(|source| MixError::Io {
        path: path.to_owned(),
        source,
    })?;
    ddo_from_csv(std::io::BufReader::new(file), options)
}

/// Fits each trained domain's ratio curve `y_i(x) = (x + a_i)^(-b_i) + c_i` through its runs'
/// objective over the first base replicate's (whose seed the perturbed runs share; `y_i(1) =
/// 1`), then solves for the multipliers with [`solve_multipliers`]. A domain whose objective does not fall goes to the
/// lower bound or fails, per [`DdoOptions::flat_domains`]. With two or more base runs the
/// report measures the noise and bootstraps intervals on the weights.
pub fn ddo(runs: &DdoRuns, options: &DdoOptions) -> Result<DdoReport, MixError> {
    let objective = options.objective;
    if let Some(n) = options.scale_tokens
        && !(n.is_finite() && n > 0.0)
    {
        return Err(MixError::invalid(
            "scale tokens",
            format!("{n}; must be positive"),
        ));
    }
    let (evidence, noise) = evidence_from_runs(runs, options)?;
    let base_objective = noise.base_objectives[0];
    let solved = fit_and_solve(
        &evidence,
        &evidence.points,
        options.flat_domains,
        FitDepth::WithAlternates,
    )?;
    let trained = &evidence.domains;
    let weights = MixtureWeights::normalized(trained.iter().cloned().zip(solved.weights.clone()))?;
    let tokens = options
        .scale_tokens
        .map(|n| weights.to_tokens(n))
        .transpose()?;
    let predicted_objective_ratio = 1.0
        + solved
            .fits
            .iter()
            .zip(&solved.multipliers)
            .filter_map(|(f, &n)| f.as_ref().map(|f| f.curve.eval(n) - f.curve.eval(1.0)))
            .sum::<f64>();

    let mut warnings = Vec::new();
    let all_flat = solved.flat.iter().all(Option::is_some);
    if all_flat {
        warnings.push(
            "no domain's objective falls with more data at this scale; every domain keeps its base weight"
                .to_owned(),
        );
    }
    let mut domains = Vec::with_capacity(trained.len());
    for (i, name) in trained.iter().enumerate() {
        let points = evidence.points[i].clone();
        let fit = solved.fits[i].as_ref();
        if let Some(fit) = fit
            && points.len() == 3
            && fit.rms_residual > 1e-6
        {
            warnings.push(format!(
                "domain `{name}`: no convex decreasing curve passes through its three points; using the least-squares fit (rms {:.2e})",
                fit.rms_residual
            ));
        }
        if let Some(detail) = &solved.flat[i]
            && !all_flat
        {
            warnings.push(format!(
                "domain `{name}`: no measurable benefit at this scale ({detail}); it gets the lower bound"
            ));
        } else if solved.on_bound[i] {
            warnings.push(format!(
                "domain `{name}` sits on the lower bound (multiplier {}); its weight is a floor, not an interior optimum",
                options.min_multiplier
            ));
        }
        let snr = noise.sigma.filter(|s| *s > 0.0).and_then(|sigma| {
            let (lo, hi) = (points.first()?, points.last()?);
            Some((hi.ratio - lo.ratio).abs() / sigma)
        });
        domains.push(DomainResult {
            weight: weights.get(name).unwrap_or(0.0),
            tokens: tokens.as_ref().and_then(|t| t.get(name)),
            name: name.clone(),
            base_weight: evidence.base_weights[i],
            multiplier: solved.multipliers[i],
            fit: fit.map(|f| f.curve),
            alternate: fit.and_then(|f| f.alternate),
            fit_rms: fit.map(|f| f.rms_residual),
            points,
            on_bound: solved.on_bound[i],
            flat: solved.flat[i].is_some(),
            snr,
            within_noise: snr.is_some_and(|s| s < WITHIN_NOISE_SNR),
            interval: None,
        });
    }
    if noise.base_runs >= 2 && noise.sigma == Some(0.0) {
        warnings.push(format!(
            "the {} base replicates gave exactly the same objective, so sigma is 0 and nothing can be judged against noise; does the trainer take the replicates' `seed` (or `data_seed` with `replicate: data`)?",
            noise.base_runs
        ));
    }
    let noisy: Vec<String> = domains
        .iter()
        .filter(|d| d.within_noise)
        .map(|d| format!("`{}` ({:.1})", d.name, d.snr.unwrap_or(0.0)))
        .collect();
    if !noisy.is_empty() {
        warnings.push(format!(
            "within noise (snr < {WITHIN_NOISE_SNR}): {}; their runs differ by less than twice the base runs' spread",
            noisy.join(", ")
        ));
    }

    let mut bootstrap = None;
    if options.bootstrap.resamples > 0
        && let Some(sigma) = evidence.sigma
    {
        let draws = crate::bootstrap::ddo_draws(&evidence, sigma, &options.bootstrap);
        if let Some(intervals) =
            crate::bootstrap::weight_intervals(&draws.solutions, options.bootstrap.level)
        {
            for (d, interval) in domains.iter_mut().zip(intervals) {
                d.interval = Some(interval);
            }
            bootstrap = Some(options.bootstrap.clone());
        }
        if draws.failed > 0 {
            warnings.push(format!(
                "bootstrap: {} of {} resamples could not be solved and were left out",
                draws.failed, options.bootstrap.resamples
            ));
        }
    }

    Ok(DdoReport {
        objective,
        base_objective,
        predicted_objective_ratio,
        min_multiplier: options.min_multiplier,
        scale_tokens: options.scale_tokens,
        weights,
        tokens,
        domains,
        eval_only_domains: runs
            .eval_domains
            .iter()
            .filter(|d| !trained.contains(d))
            .cloned()
            .collect(),
        warnings,
        noise,
        bootstrap,
    })
}

/// A domain whose effect is under this many noise units is "within noise".
const WITHIN_NOISE_SNR: f64 = 2.0;

/// The ratios DDO fits (each run's objective over the paired, first, base replicate's) and
/// the noise.
pub(crate) fn evidence_from_runs(
    runs: &DdoRuns,
    options: &DdoOptions,
) -> Result<(DdoEvidence, Noise), MixError> {
    let objective = options.objective;
    if runs.base.is_empty() {
        return Err(MixError::MissingBaseRow);
    }
    let base_objectives: Vec<f64> = runs.base.iter().map(|p| objective.evaluate(p)).collect();
    let mean = base_objectives.iter().sum::<f64>() / base_objectives.len() as f64;
    // The perturbed runs share the first replicate's seed (its initialisation and its draws),
    // so their ratios are paired with it: a lucky or unlucky seed moves the perturbed runs
    // with it, and dividing by the replicates' mean would leave that luck in every ratio.
    let paired = base_objectives[0];
    if !(mean.is_finite() && mean != 0.0 && paired.is_finite() && paired != 0.0) {
        return Err(MixError::invalid(
            "base runs",
            format!(
                "their {objective} is {paired} (first replicate), {mean} (mean); ratios to it mean nothing"
            ),
        ));
    }
    let trained: Vec<String> = runs
        .trained_domains()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let base_weights = base_weights_for(&trained, options.base_weights.as_ref())?;
    let mut points = Vec::with_capacity(trained.len());
    for domain in &trained {
        let mut pts = vec![CurvePoint {
            multiplier: 1.0,
            ratio: 1.0,
        }];
        for r in runs.perturbed.iter().filter(|r| &r.domain == domain) {
            let ratio = objective.evaluate(&r.perplexities) / paired;
            if !(ratio.is_finite() && r.multiplier.is_finite() && r.multiplier > 0.0) {
                return Err(MixError::invalid(
                    format!("run `{domain}` x{}", r.multiplier),
                    format!("objective ratio {ratio} is not a finite number"),
                ));
            }
            pts.push(CurvePoint {
                multiplier: r.multiplier,
                ratio,
            });
        }
        pts.sort_by(|p, q| p.multiplier.total_cmp(&q.multiplier));
        points.push(pts);
    }
    let noise = Noise::measure(base_objectives, mean);
    let evidence = DdoEvidence {
        domains: trained,
        base_weights,
        points,
        min_multiplier: options.min_multiplier,
        base_runs: noise.base_runs,
        sigma: noise.sigma,
    };
    Ok((evidence, noise))
}

impl DdoReport {
    /// The fit-and-solve inputs behind this report, for redoing DDO on resampled ratios.
    pub fn evidence(&self) -> Result<DdoEvidence, MixError> {
        Ok(DdoEvidence {
            domains: self.domains.iter().map(|d| d.name.clone()).collect(),
            base_weights: self.domains.iter().map(|d| d.base_weight).collect(),
            points: self.domains.iter().map(|d| d.points.clone()).collect(),
            min_multiplier: self.min_multiplier,
            base_runs: self.noise.base_runs,
            sigma: self.noise.sigma,
        })
    }

    /// A fixed-width table: one row per domain, then the objective and its predicted ratio.
    pub fn render_table(&self) -> String {
        let abc = |c: &PowerCurve| format!("({:.3}, {:.3}, {:.3})", c.a, c.b, c.c);
        let dash = || "-".to_owned();
        let level = self.bootstrap.as_ref().map_or(0.9, |b| b.level);
        let interval_header = format!("{:.0}% interval", level * 100.0);
        let rows: Vec<Vec<String>> = self
            .domains
            .iter()
            .map(|d| {
                let fit = |f: fn(&PowerCurve) -> f64| {
                    d.fit.as_ref().map_or_else(dash, |c| format!("{:.4}", f(c)))
                };
                vec![
                    d.name.clone(),
                    format!("{:.4}", d.weight),
                    d.interval
                        .map_or_else(dash, |[lo, hi]| format!("{lo:.4}-{hi:.4}")),
                    format!("{:.3}", d.multiplier),
                    d.tokens.map_or_else(dash, |t| format!("{t:.3e}")),
                    fit(|c| c.a),
                    fit(|c| c.b),
                    fit(|c| c.c),
                    d.alternate.as_ref().map_or_else(dash, abc),
                    d.fit_rms.map_or_else(dash, |r| format!("{r:.1e}")),
                    d.snr.map_or_else(dash, |s| format!("{s:.1}")),
                    match (d.flat, d.on_bound) {
                        (true, _) => "flat",
                        (false, true) => "yes",
                        (false, false) => "",
                    }
                    .to_owned(),
                ]
            })
            .collect();
        let mut out = table::render(
            &[
                "domain",
                "weight",
                &interval_header,
                "n",
                "tokens",
                "a",
                "b",
                "c",
                "alt (a, b, c)",
                "rms",
                "snr",
                "bound",
            ],
            &rows,
        );
        out.push_str(&format!(
            "objective {}: base {:.4}, predicted ratio at optimum {:.4}\n",
            self.objective, self.base_objective, self.predicted_objective_ratio
        ));
        match self.noise.sigma {
            Some(sigma) => {
                out.push_str(&format!("noise: sigma {sigma:.4} ({})\n", self.noise.note))
            }
            None => out.push_str(&format!("noise: {}\n", self.noise.note)),
        }
        if let Some(b) = &self.bootstrap {
            out.push_str(&format!(
                "intervals: {} bootstrap resamples, seed {}\n",
                b.resamples, b.seed
            ));
        }
        if !self.eval_only_domains.is_empty() {
            out.push_str(&format!(
                "evaluated only: {}\n",
                self.eval_only_domains.join(", ")
            ));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}

/// How much fitting [`fit_and_solve`] does: the report wants every exact interpolant, a
/// bootstrap resample only the curve the solve uses, found from the point estimate's curve
/// (per domain, where it has one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum FitDepth<'a> {
    WithAlternates,
    Primary(&'a [Option<PowerCurve>]),
}

/// One fit and solve: per domain its fit (`None` when flat, with the points that showed it),
/// multiplier, whether it sits on the bound, and the weight `w0_i n_i`.
#[derive(Debug, Clone)]
pub(crate) struct Solved {
    pub fits: Vec<Option<CurveFit>>,
    pub flat: Vec<Option<String>>,
    pub multipliers: Vec<f64>,
    pub on_bound: Vec<bool>,
    pub weights: Vec<f64>,
}

/// Fits every domain's `points` and solves for the multipliers. Under [`FlatPolicy::Bound`] a
/// domain whose ratio does not fall gets `n_min` and the others share what is left of the
/// budget, `sum_others w0_i n_i = 1 - n_min sum_flat w0_i`; when every domain is flat each
/// keeps its base quantity (`n_i = 1`), since nothing was measured to move it.
pub(crate) fn fit_and_solve(
    evidence: &DdoEvidence,
    points: &[Vec<CurvePoint>],
    policy: FlatPolicy,
    depth: FitDepth<'_>,
) -> Result<Solved, MixError> {
    let n_min = evidence.min_multiplier;
    if !(n_min.is_finite() && (0.0..=1.0).contains(&n_min)) {
        return Err(MixError::invalid(
            "minimum multiplier",
            format!("{n_min}; must lie in [0, 1] so the budget can be met"),
        ));
    }
    let m = evidence.domains.len();
    let mut fits = Vec::with_capacity(m);
    let mut flat = vec![None; m];
    for (i, (domain, pts)) in evidence.domains.iter().zip(points).enumerate() {
        let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.multiplier, p.ratio)).collect();
        let fitted = match depth {
            FitDepth::WithAlternates => fit_power_curve(domain, &xy),
            FitDepth::Primary(starts) => match starts.get(i).copied().flatten() {
                Some(start) => refit_power_curve(domain, &xy, start),
                None => fit_primary_curve(domain, &xy),
            },
        };
        match fitted {
            Ok(fit) => fits.push(Some(fit)),
            Err(MixError::NotDecreasing { detail, .. }) if policy == FlatPolicy::Bound => {
                flat[i] = Some(detail);
                fits.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    let free: Vec<usize> = (0..m).filter(|&i| fits[i].is_some()).collect();
    let w0 = &evidence.base_weights;
    let (mut multipliers, mut on_bound) = (vec![1.0; m], vec![false; m]);
    if !free.is_empty() {
        let flat_budget: f64 = (0..m)
            .filter(|i| flat[*i].is_some())
            .map(|i| w0[i] * n_min)
            .sum();
        let left = 1.0 - flat_budget;
        let curves: Vec<PowerCurve> = free
            .iter()
            .filter_map(|&i| fits[i].as_ref().map(|f| f.curve))
            .collect();
        // Dividing the base weights by what is left turns that budget into the solver's 1.
        let scaled: Vec<f64> = free.iter().map(|&i| w0[i] / left).collect();
        let solution = solve_multipliers(&curves, &scaled, n_min)?;
        for i in 0..m {
            if flat[i].is_some() {
                multipliers[i] = n_min;
                on_bound[i] = true;
            }
        }
        for (k, &i) in free.iter().enumerate() {
            multipliers[i] = solution.multipliers[k];
            on_bound[i] = solution.on_bound[k];
        }
    }
    let raw: Vec<f64> = w0.iter().zip(&multipliers).map(|(w, n)| w * n).collect();
    let sum: f64 = raw.iter().sum();
    Ok(Solved {
        fits,
        flat,
        multipliers,
        on_bound,
        weights: raw.iter().map(|w| w / sum).collect(),
    })
}

/// The optimal multipliers and which sit on the lower bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiplierSolution {
    pub multipliers: Vec<f64>,
    pub on_bound: Vec<bool>,
    /// The budget constraint's Lagrange multiplier.
    pub lambda: f64,
}

/// Minimises `sum_i (n_i + a_i)^(-b_i)` subject to `sum_i w0_i n_i = 1` and `n_i >= n_min`
/// (with uniform `w0 = 1/m`: `sum_i n_i = m`). Each term is convex, so KKT is exact:
/// `n_i(lambda) = max(n_min, (b_i / (lambda w0_i))^(1/(b_i+1)) - a_i)`, and
/// `sum_i w0_i n_i(lambda)` falls in `lambda`, found by bisection on `ln lambda`.
pub fn solve_multipliers(
    curves: &[PowerCurve],
    base_weights: &[f64],
    min_multiplier: f64,
) -> Result<MultiplierSolution, MixError> {
    if curves.is_empty() || curves.len() != base_weights.len() {
        return Err(MixError::invalid(
            "DDO solve",
            format!(
                "{} curves for {} base weights",
                curves.len(),
                base_weights.len()
            ),
        ));
    }
    if !(min_multiplier.is_finite() && (0.0..=1.0).contains(&min_multiplier)) {
        return Err(MixError::invalid(
            "minimum multiplier",
            format!("{min_multiplier}; must lie in [0, 1] so the budget can be met"),
        ));
    }
    if let Some(c) = curves
        .iter()
        .find(|c| !(c.b > 0.0 && c.b.is_finite() && c.a.is_finite()))
    {
        return Err(MixError::invalid(
            "DDO solve",
            format!("curve {c:?} is not decreasing (needs b > 0)"),
        ));
    }
    let interior = |ln_lambda: f64| -> Vec<f64> {
        curves
            .iter()
            .zip(base_weights)
            .map(|(c, w0)| ((c.b.ln() - ln_lambda - w0.ln()) / (c.b + 1.0)).exp() - c.a)
            .collect()
    };
    let excess = |ln_lambda: f64| {
        interior(ln_lambda)
            .iter()
            .zip(base_weights)
            .map(|(n, w0)| w0 * n.max(min_multiplier))
            .sum::<f64>()
            - 1.0
    };
    let (mut lo, mut hi, mut step) = (0.0f64, 0.0f64, 1.0f64);
    while excess(lo) < 0.0 && step < 1e5 {
        lo -= step;
        step *= 2.0;
    }
    step = 1.0;
    while excess(hi) > 0.0 && step < 1e5 {
        hi += step;
        step *= 2.0;
    }
    if excess(hi) > 1e-12 {
        return Err(MixError::invalid(
            "DDO solve",
            "the fitted curves' poles leave no room in the budget; lower the minimum multiplier or refit",
        ));
    }
    for _ in 0..300 {
        let mid = 0.5 * (lo + hi);
        if excess(mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-14 * (1.0 + mid.abs()) {
            break;
        }
    }
    let ln_lambda = 0.5 * (lo + hi);
    let free = interior(ln_lambda);
    Ok(MultiplierSolution {
        multipliers: free.iter().map(|n| n.max(min_multiplier)).collect(),
        on_bound: free.iter().map(|&n| n <= min_multiplier).collect(),
        lambda: ln_lambda.exp(),
    })
}

/// Base weights in `domains` order: uniform, or the given ones, which must name exactly them.
fn base_weights_for(
    domains: &[String],
    given: Option<&MixtureWeights>,
) -> Result<Vec<f64>, MixError> {
    if domains.is_empty() {
        return Err(MixError::invalid("domains", "no domains given"));
    }
    if let Some(d) = domains
        .iter()
        .enumerate()
        .find(|(i, d)| domains[..*i].contains(d))
    {
        return Err(MixError::invalid(
            "domains",
            format!("`{}` appears twice", d.1),
        ));
    }
    let Some(given) = given else {
        return Ok(vec![1.0 / domains.len() as f64; domains.len()]);
    };
    if let Some(unknown) = given.domains().find(|d| !domains.iter().any(|x| x == d)) {
        return Err(MixError::UnknownDomain {
            domain: unknown.to_owned(),
            context: "base weights".to_owned(),
            known: domains.join(", "),
        });
    }
    domains
        .iter()
        .map(|d| match given.get(d) {
            Some(w) if w > 0.0 => Ok(w),
            Some(_) => Err(MixError::invalid(
                "base weights",
                format!("`{d}` has weight 0; multipliers of zero tokens mean nothing"),
            )),
            None => Err(MixError::DomainMismatch {
                left: "the trained domains".to_owned(),
                right: "the base weights".to_owned(),
                detail: format!("`{d}` has no base weight"),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    /// SplitMix64: a seeded generator so property tests are reproducible without a crate.
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next_f64()
        }
    }

    /// A synthetic loss for which DDO's separable ratio model is exact.
    ///
    /// DDO models the objective ratio of a run as `1 + sum_i (y_i(n_i) - 1)` with
    /// `y_i(x) = (x + a_i)^(-b_i) + c_i`, which has no amplitude parameter. The plain power law
    /// `sum_i beta_i N_i^(-gamma_i) + l` cannot match that for m >= 2 (each domain's term would
    /// have to equal the whole base loss), so the test uses its shifted form
    /// `L(N) = sum_i beta_i (N_i + A_i)^(-gamma_i) + l` with `A_i = a_i N_i^0`,
    /// `gamma_i = b_i`, `beta_i = O_0 (N_i^0)^(b_i)` and `l = O_0 (1 - sum_i (1 + a_i)^(-b_i))`.
    /// In multipliers `n_i = N_i / N_i^0` that is `L = O_0 (1 + sum_i ((n_i + a_i)^(-b_i) -
    /// (1 + a_i)^(-b_i)))`, so `L(base) = O_0` and each perturbation's ratio is exactly
    /// `y_i`, with `c_i = 1 - (1 + a_i)^(-b_i)`. Parameters keep `l > 0`.
    struct Synthetic {
        names: Vec<String>,
        ab: Vec<(f64, f64)>,
        base_tokens: f64,
        o0: f64,
    }

    impl Synthetic {
        fn base_tokens_of(&self) -> f64 {
            self.base_tokens / self.names.len() as f64
        }

        /// The loss of a run, in tokens per domain.
        fn loss(&self, tokens: &[f64]) -> f64 {
            let n0 = self.base_tokens_of();
            let l = self.o0 * (1.0 - self.ab.iter().map(|(a, b)| (1.0 + a).powf(-b)).sum::<f64>());
            assert!(l > 0.0, "synthetic irreducible loss must stay positive");
            tokens
                .iter()
                .zip(&self.ab)
                .map(|(n, (a, b))| self.o0 * n0.powf(*b) * (n + a * n0).powf(-b))
                .sum::<f64>()
                + l
        }

        /// The CSV of the DDO runs: evaluation perplexities `L (1 + e_k)` with `sum_k e_k = 0`
        /// over the trained domains plus one held-out domain, so their mean is exactly `L`.
        fn csv(&self, multipliers: &[f64]) -> String {
            let spread = [0.1, -0.05, 0.02, -0.07];
            let mut out = format!("perturbed,multiplier,{},held_out\n", self.names.join(","));
            let row = |tokens: Vec<f64>| {
                let l = self.loss(&tokens);
                spread
                    .iter()
                    .map(|e| format!("{}", l * (1.0 + e)))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let n0 = self.base_tokens_of();
            out.push_str(&format!(",1,{}\n", row(vec![n0; self.names.len()])));
            for (i, name) in self.names.iter().enumerate() {
                for &r in multipliers {
                    let mut tokens = vec![n0; self.names.len()];
                    tokens[i] *= r;
                    out.push_str(&format!("{name},{r},{}\n", row(tokens)));
                }
            }
            out
        }

        /// Independent optimiser of the true loss at the base total, on the multiplier floor:
        /// a grid over the 2-simplex, zoomed around the best point. Returns weights.
        fn brute_force_weights(&self, n_min: f64) -> [f64; 3] {
            let total = self.base_tokens;
            let floor = n_min * self.base_tokens_of();
            let eval = |x: f64, y: f64| {
                let z = total - x - y;
                if x < floor || y < floor || z < floor {
                    f64::INFINITY
                } else {
                    self.loss(&[x, y, z])
                }
            };
            let (mut cx, mut cy, mut half) = (total / 3.0, total / 3.0, total / 2.0);
            for _ in 0..12 {
                let steps = 60;
                let mut best = (f64::INFINITY, cx, cy);
                for i in 0..=steps {
                    for j in 0..=steps {
                        let x =
                            (cx - half + 2.0 * half * f64::from(i) / f64::from(steps)).max(floor);
                        let y =
                            (cy - half + 2.0 * half * f64::from(j) / f64::from(steps)).max(floor);
                        let v = eval(x, y);
                        if v < best.0 {
                            best = (v, x, y);
                        }
                    }
                }
                (cx, cy) = (best.1, best.2);
                half *= 0.25;
            }
            [cx / total, cy / total, (total - cx - cy) / total]
        }
    }

    fn synthetic() -> Synthetic {
        Synthetic {
            names: vec!["books".into(), "c4".into(), "github".into()],
            // Chosen so LM from (1, 1, 1) lands on the generating root of each 3-point fit.
            ab: vec![(2.0, 1.0), (0.5, 3.0), (2.0, 3.0)],
            base_tokens: 3e8,
            o0: 20.0,
        }
    }

    #[test]
    fn ddo_on_three_points_recovers_the_true_optimum() {
        let syn = synthetic();
        let options = DdoOptions {
            scale_tokens: Some(syn.base_tokens),
            ..DdoOptions::default()
        };
        let report = ddo_from_csv(syn.csv(&[0.2, 3.0]).as_bytes(), &options).expect("ddo");
        assert_eq!(report.eval_only_domains, vec!["held_out".to_owned()]);
        for (d, (a, b)) in report.domains.iter().zip(&syn.ab) {
            assert!(d.fit_rms.is_some_and(|r| r < 1e-9), "{d:?}");
            let fit = d.fit.expect("fitted");
            for p in &d.points {
                assert!((fit.eval(p.multiplier) - p.ratio).abs() < 1e-9);
            }
            assert!(
                (fit.a - a).abs() < 1e-6 && (fit.b - b).abs() < 1e-6,
                "{d:?}"
            );
            assert!((fit.c - (1.0 - (1.0 + a).powf(-b))).abs() < 1e-6);
            assert!(d.alternate.is_some(), "three points admit a second curve");
        }
        let truth = syn.brute_force_weights(0.2);
        for (d, w) in report.domains.iter().zip(truth) {
            assert!(
                (d.weight - w).abs() < 1e-4,
                "{}: {} vs {w}",
                d.name,
                d.weight
            );
            let tokens = d.tokens.expect("scale given");
            assert!((tokens - d.weight * syn.base_tokens).abs() < 1.0);
        }
        // The additive model is exact here, so its predicted ratio is the true one.
        let n0 = syn.base_tokens_of();
        let tokens: Vec<f64> = report.domains.iter().map(|d| d.multiplier * n0).collect();
        let true_ratio = syn.loss(&tokens) / syn.o0;
        assert!((report.predicted_objective_ratio - true_ratio).abs() < 1e-9);
        assert!(report.predicted_objective_ratio < 1.0);
    }

    #[test]
    fn ddo_with_more_multipliers_is_least_squares_and_exact() {
        let syn = Synthetic {
            names: vec!["web".into(), "code".into(), "wiki".into()],
            ab: vec![(0.3, 3.0), (1.0, 2.5), (4.0, 0.7)],
            base_tokens: 1e9,
            o0: 1.0,
        };
        let report = ddo_from_csv(
            syn.csv(&[0.2, 0.5, 2.0, 3.0]).as_bytes(),
            &DdoOptions::default(),
        )
        .expect("ddo");
        for (d, (a, b)) in report.domains.iter().zip(&syn.ab) {
            assert!(d.alternate.is_none());
            let fit = d.fit.expect("fitted");
            assert!(
                (fit.a - a).abs() < 1e-6 && (fit.b - b).abs() < 1e-6,
                "{d:?}"
            );
        }
        let truth = syn.brute_force_weights(0.2);
        for (d, w) in report.domains.iter().zip(truth) {
            assert!(
                (d.weight - w).abs() < 1e-4,
                "{}: {} vs {w}",
                d.name,
                d.weight
            );
        }
    }

    #[test]
    fn kkt_meets_constraints_and_beats_random_feasible_points() {
        let mut rng = Rng(7);
        for trial in 0..20 {
            let m = 2 + trial % 5;
            let curves: Vec<PowerCurve> = (0..m)
                .map(|_| PowerCurve {
                    a: rng.range(-0.15, 3.0),
                    // Small b makes some domains nearly useless, so the bound binds.
                    b: if rng.next_f64() < 0.3 {
                        rng.range(0.01, 0.05)
                    } else {
                        rng.range(0.2, 3.0)
                    },
                    c: 0.0,
                })
                .collect();
            // Half the trials use a skewed base, where the budget is sum_i w0_i n_i = 1.
            let raw: Vec<f64> = (0..m)
                .map(|_| {
                    if trial % 2 == 0 {
                        1.0
                    } else {
                        rng.range(0.1, 1.0)
                    }
                })
                .collect();
            let w0: Vec<f64> = raw.iter().map(|x| x / raw.iter().sum::<f64>()).collect();
            let n_min = 0.2;
            let sol = solve_multipliers(&curves, &w0, n_min).expect("feasible");
            let budget: f64 = sol.multipliers.iter().zip(&w0).map(|(n, w)| n * w).sum();
            assert!((budget - 1.0).abs() < 1e-9, "budget {budget} != 1");
            if trial % 2 == 0 {
                let sum: f64 = sol.multipliers.iter().sum();
                assert!((sum - m as f64).abs() < 1e-9, "sum {sum} != {m}");
            }
            for (n, bound) in sol.multipliers.iter().zip(&sol.on_bound) {
                assert!(*n >= n_min);
                assert_eq!(*bound, (*n - n_min).abs() < 1e-12);
            }
            let value = |n: &[f64]| -> f64 {
                curves
                    .iter()
                    .zip(n)
                    .map(|(c, x)| (x + c.a).powf(-c.b))
                    .sum()
            };
            let best = value(&sol.multipliers);
            for draw in 0..1000 {
                let n: Vec<f64> = if draw % 2 == 0 {
                    // Anywhere in the feasible set.
                    let u: Vec<f64> = (0..m).map(|_| rng.next_f64()).collect();
                    let uw: f64 = u.iter().zip(&w0).map(|(x, w)| x * w).sum();
                    u.iter().map(|x| n_min + (1.0 - n_min) * x / uw).collect()
                } else {
                    // Near the optimum: shift budget between two domains.
                    let (i, j) = (draw % m, (draw / 2 + 1) % m);
                    let mut n = sol.multipliers.clone();
                    let eps = rng.range(-0.05, 0.05);
                    n[i] += eps / w0[i];
                    n[j] -= eps / w0[j];
                    if i == j || n[i] < n_min || n[j] < n_min {
                        continue;
                    }
                    n
                };
                assert!(best <= value(&n) + 1e-12, "{n:?} beats KKT {sol:?}");
            }
        }
    }

    #[test]
    fn kkt_flags_a_useless_domain_on_the_bound() {
        let curves = [
            PowerCurve {
                a: 0.0,
                b: 1.0,
                c: 0.0,
            },
            PowerCurve {
                a: 0.0,
                b: 1.0,
                c: 0.0,
            },
            PowerCurve {
                a: 50.0,
                b: 0.01,
                c: 0.0,
            },
        ];
        let sol = solve_multipliers(&curves, &[1.0 / 3.0; 3], 0.2).expect("feasible");
        assert_eq!(sol.on_bound, vec![false, false, true]);
        assert!((sol.multipliers[0] - 1.4).abs() < 1e-9, "{sol:?}");
        assert!(solve_multipliers(&curves, &[1.0 / 3.0; 3], 1.5).is_err());
    }

    #[test]
    fn plan_lists_base_and_two_runs_per_domain() {
        let domains = vec!["books".to_owned(), "c4".to_owned()];
        let runs = plan(&domains, 1e6, &PlanOptions::default()).expect("plan");
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["base", "books-x0.2", "books-x3", "c4-x0.2", "c4-x3"]);
        let r = &runs[2];
        assert_eq!(r.perturbed.as_deref(), Some("books"));
        assert_eq!(r.tokens.get("books"), Some(1.5e6));
        assert_eq!(r.tokens.get("c4"), Some(5e5));
        assert_eq!(r.total_tokens, 2e6);
        assert_eq!(r.weights.get("books"), Some(0.75));
        let json = serde_json::to_value(&runs).expect("serialise");
        assert_eq!(json[1]["tokens"]["books"], 1e5);
        assert!(render_plan_table(&runs).contains("books-x0.2"));

        let skewed = PlanOptions {
            base_weights: Some(
                MixtureWeights::normalized([("books", 1.0), ("c4", 3.0)]).expect("w"),
            ),
            ..PlanOptions::default()
        };
        let runs = plan(&domains, 1e6, &skewed).expect("plan");
        assert_eq!(runs[0].tokens.get("c4"), Some(7.5e5));
        let bad = PlanOptions {
            multipliers: vec![0.2, 1.0],
            ..PlanOptions::default()
        };
        assert!(plan(&domains, 1e6, &bad).is_err());
        assert!(plan(&domains, -1.0, &PlanOptions::default()).is_err());
    }

    const GOOD: &str = "perturbed,multiplier,books,c4,held_out
,1,20,30,40
books,0.2,21,30.4,40.3
books,3,19.5,29.9,39.9
c4,0.2,20.2,32,40.5
c4,3,20,29,39.6
";

    #[test]
    fn csv_to_report_json_round_trip() {
        let options = DdoOptions {
            scale_tokens: Some(1e8),
            ..DdoOptions::default()
        };
        let report = ddo_from_csv(GOOD.as_bytes(), &options).expect("ddo");
        let json = serde_json::to_value(&report).expect("serialise");
        let weights = json["weights"].as_object().expect("weights map");
        let sum: f64 = weights.values().filter_map(serde_json::Value::as_f64).sum();
        assert!((sum - 1.0).abs() < 1e-12);
        for d in json["domains"].as_array().expect("domains") {
            for key in ["a", "b", "c"] {
                assert!(d["fit"][key].as_f64().is_some_and(f64::is_finite), "{d}");
            }
        }
        assert_eq!(json["objective"], "mean-perplexity");
        let back: DdoReport = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back.weights, report.weights);
        let table = report.render_table();
        assert!(
            table.contains("books") && table.contains("held_out"),
            "{table}"
        );
    }

    #[test]
    fn objectives_differ_and_parse() {
        let p = [4.0, 16.0];
        assert_eq!(Objective::MeanPerplexity.evaluate(&p), 10.0);
        assert!((Objective::MeanLoss.evaluate(&p) - 8f64.ln()).abs() < 1e-12);
        assert_eq!(Objective::WorstPerplexity.evaluate(&p), 16.0);
        assert_eq!(
            "max-ppl".parse::<Objective>().ok(),
            Some(Objective::WorstPerplexity)
        );
        assert!("median".parse::<Objective>().is_err());
        let options = DdoOptions {
            objective: Objective::MeanLoss,
            ..DdoOptions::default()
        };
        let report = ddo_from_csv(GOOD.as_bytes(), &options).expect("ddo");
        assert_eq!(report.objective, Objective::MeanLoss);
        assert!((report.base_objective - (20f64 * 30.0 * 40.0).ln() / 3.0).abs() < 1e-12);
    }

    fn csv_error(csv: &str) -> String {
        let err = ddo_from_csv(csv.as_bytes(), &DdoOptions::default()).expect_err("bad csv");
        format!("{err} | hint: {}", err.hint().unwrap_or_default())
    }

    #[test]
    fn bad_csvs_name_the_line_and_value() {
        let no_base = GOOD.replace(",1,20,30,40\n", "");
        assert!(csv_error(&no_base).contains("no base run"));

        let unknown = GOOD.replace("c4,0.2,", "c5,0.2,");
        let msg = csv_error(&unknown);
        assert!(msg.contains("line 5") && msg.contains("`c5`"), "{msg}");

        let one = GOOD.replace("c4,3,20,29,39.6\n", "");
        let msg = csv_error(&one);
        assert!(msg.contains("`c4`") && msg.contains("1 perturbed"), "{msg}");

        let negative = GOOD.replace("19.5", "-19.5");
        let msg = csv_error(&negative);
        assert!(
            msg.contains("line 4") && msg.contains("`-19.5`") && msg.contains("`books`"),
            "{msg}"
        );

        let nan = GOOD.replace("30.4", "NaN");
        let msg = csv_error(&nan);
        assert!(msg.contains("line 3") && msg.contains("`NaN`"), "{msg}");

        let dup = format!("{GOOD}books,3,19.4,29.9,39.9\n");
        let msg = csv_error(&dup);
        assert!(msg.contains("line 7") && msg.contains("line 4"), "{msg}");

        let short = GOOD.replace("c4,3,20,29,39.6", "c4,3,20,29");
        let msg = csv_error(&short);
        assert!(msg.contains("line 6"), "{msg}");

        let no_column = GOOD.replace("multiplier", "mult");
        assert!(csv_error(&no_column).contains("`multiplier`"));

        let bad_base = GOOD.replace(",1,20,30,40", ",2,20,30,40");
        let msg = csv_error(&bad_base);
        assert!(msg.contains("line 2") && msg.contains("`2`"), "{msg}");

        let rising = GOOD.replace("books,3,19.5,29.9,39.9", "books,3,25,35,45");
        let fail = DdoOptions {
            flat_domains: FlatPolicy::Fail,
            ..DdoOptions::default()
        };
        let msg = ddo_from_csv(rising.as_bytes(), &fail)
            .expect_err("flat domains fail when told to")
            .to_string();
        assert!(
            msg.contains("`books`") && msg.contains("does not decrease"),
            "{msg}"
        );
    }

    #[test]
    fn base_weights_must_name_the_trained_domains() {
        let options = DdoOptions {
            base_weights: Some(
                MixtureWeights::normalized([("books", 1.0), ("wiki", 1.0)]).expect("w"),
            ),
            ..DdoOptions::default()
        };
        let err = ddo_from_csv(GOOD.as_bytes(), &options).expect_err("unknown domain");
        assert!(err.to_string().contains("`wiki`"), "{err}");
    }

    #[test]
    fn a_flat_domain_gets_the_bound_and_the_others_share_the_rest() {
        let syn = synthetic();
        let mut runs = parse_ddo_csv(syn.csv(&[0.2, 3.0]).as_bytes()).expect("csv");
        // github gets worse with more data: y(0.2) < 1 < y(3).
        for r in runs.perturbed.iter_mut().filter(|r| r.domain == "github") {
            let factor = if r.multiplier < 1.0 { 0.995 } else { 1.06 };
            r.perplexities = runs.base[0].iter().map(|p| p * factor).collect();
        }
        let report = ddo(&runs, &DdoOptions::default()).expect("a flat domain is no failure");
        let github = &report.domains[2];
        assert!(github.flat && github.on_bound, "{github:?}");
        assert!(github.fit.is_none() && github.fit_rms.is_none());
        assert_eq!(github.multiplier, 0.2);
        assert!((github.weight - 0.2 / 3.0).abs() < 1e-12);
        let warning = report
            .warnings
            .iter()
            .find(|w| w.contains("domain `github`: no measurable benefit at this scale"))
            .expect("a warning names the flat domain");
        assert!(
            warning.contains("y(0.2)=0.9950") && warning.contains("y(3)=1.0600"),
            "{warning}"
        );
        assert!(warning.ends_with("it gets the lower bound"), "{warning}");
        // The others are the KKT optimum of the budget github leaves them.
        let left = 1.0 - 0.2 / 3.0;
        let curves: Vec<PowerCurve> = report.domains[..2]
            .iter()
            .map(|d| d.fit.expect("fitted"))
            .collect();
        let alone = solve_multipliers(&curves, &[1.0 / 3.0 / left; 2], 0.2).expect("solve");
        for (d, n) in report.domains.iter().zip(&alone.multipliers) {
            assert!((d.multiplier - n).abs() < 1e-12, "{d:?}");
        }
        let budget: f64 = report.domains.iter().map(|d| d.multiplier / 3.0).sum();
        assert!((budget - 1.0).abs() < 1e-12);
        assert_eq!(report.weights.len(), 3, "the flat domain keeps its place");
        let back: DdoReport =
            serde_json::from_str(&serde_json::to_string(&report).expect("json")).expect("read");
        assert_eq!(back.domains[2].fit, None);
        assert!(report.render_table().contains("flat"));
    }

    #[test]
    fn every_domain_flat_keeps_the_base_weights() {
        let rising = "perturbed,multiplier,a,b\n,1,10,10\na,0.2,9.9,9.9\na,3,10.2,10.2\nb,0.2,10,10\nb,3,10.1,10.1\n";
        let options = DdoOptions {
            base_weights: Some(MixtureWeights::normalized([("a", 1.0), ("b", 3.0)]).expect("w")),
            ..DdoOptions::default()
        };
        let report = ddo_from_csv(rising.as_bytes(), &options).expect("no panic, no error");
        assert_eq!(report.weights.get("a"), Some(0.25));
        assert_eq!(report.weights.get("b"), Some(0.75));
        assert!(report.domains.iter().all(|d| d.flat && !d.on_bound));
        assert_eq!(report.predicted_objective_ratio, 1.0);
        assert!(
            report.warnings[0].contains("every domain keeps its base weight"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn ratios_pair_with_the_first_base_replicate_not_the_mean() {
        // The first replicate is the lucky one (objective 27 against a mean of 30); a perturbed
        // run that matches it exactly must read as no change, not as a 10% gain.
        let csv = GOOD.replace(",1,20,30,40\n", ",1,18,27,36\n,1,20,30,40\n,1,22,33,44\n");
        let report = ddo_from_csv(csv.as_bytes(), &DdoOptions::default()).expect("ddo");
        assert_eq!(report.noise.base_objectives, vec![27.0, 30.0, 33.0]);
        assert_eq!(report.base_objective, 27.0);
        let sigma = report.noise.sigma.expect("measured");
        assert!((sigma - 0.1).abs() < 1e-12, "{sigma}");
        let books = &report.domains[0];
        let run = books
            .points
            .iter()
            .find(|p| p.multiplier == 3.0)
            .expect("x3");
        let first = GOOD
            .lines()
            .find(|l| l.starts_with("books,3,"))
            .expect("row");
        let cols: Vec<f64> = first
            .split(',')
            .skip(2)
            .map(|c| c.parse().unwrap())
            .collect();
        let objective = cols.iter().sum::<f64>() / cols.len() as f64;
        assert!((run.ratio - objective / 27.0).abs() < 1e-12, "{run:?}");
    }

    #[test]
    fn base_replicates_measure_noise_snr_and_intervals() {
        let three = GOOD.replace(
            ",1,20,30,40\n",
            ",1,20,30,40\n,1,20.5,30.5,40.5\n,1,19.5,29.5,39.5\n",
        );
        let report = ddo_from_csv(three.as_bytes(), &DdoOptions::default()).expect("ddo");
        assert_eq!(report.noise.base_runs, 3);
        assert_eq!(report.noise.base_objectives, vec![30.0, 30.5, 29.5]);
        assert_eq!(report.base_objective, 30.0);
        let sigma = report.noise.sigma.expect("measured");
        assert!((sigma - 0.5 / 30.0).abs() < 1e-12, "{sigma}");
        assert!(
            report.noise.note.contains("3 base runs"),
            "{}",
            report.noise.note
        );
        let books = &report.domains[0];
        let dy = (30.4 + 21.0 + 40.3 - 19.5 - 29.9 - 39.9) / 90.0;
        assert!(
            (books.snr.expect("snr") - dy / sigma).abs() < 1e-9,
            "{books:?}"
        );
        assert!(books.within_noise, "snr {:?}", books.snr);
        assert!(
            !report.domains[1].within_noise,
            "{:?}",
            report.domains[1].snr
        );
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("within noise") && w.contains("`books`")),
            "{:?}",
            report.warnings
        );
        assert_eq!(report.bootstrap, Some(BootstrapOptions::default()));
        for d in &report.domains {
            let [lo, hi] = d.interval.expect("interval");
            assert!(
                lo < hi && lo <= d.weight + 1e-9 && d.weight <= hi + 1e-9,
                "{d:?}"
            );
        }
        // Same seed, same intervals.
        let again = ddo_from_csv(three.as_bytes(), &DdoOptions::default()).expect("ddo");
        assert_eq!(again.domains[0].interval, books.interval);

        let two = GOOD.replace(",1,20,30,40\n", ",1,20,30,40\n,1,20.5,30.5,40.5\n");
        let report = ddo_from_csv(two.as_bytes(), &DdoOptions::default()).expect("ddo");
        assert_eq!(
            report.noise.note,
            "sigma from 2 base runs (1 degree of freedom)"
        );

        let single = ddo_from_csv(GOOD.as_bytes(), &DdoOptions::default()).expect("ddo");
        assert_eq!(single.noise.sigma, None);
        assert_eq!(single.noise.note, "single base run: noise not measured");
        assert_eq!(single.bootstrap, None);
        assert!(
            single
                .domains
                .iter()
                .all(|d| d.snr.is_none() && d.interval.is_none())
        );
        assert!(single.render_table().contains("noise not measured"));
    }

    #[test]
    fn plan_replicates_the_base_run_with_seeds() {
        let domains = vec!["books".to_owned(), "c4".to_owned()];
        let options = PlanOptions {
            base_seeds: 3,
            seed: 7,
            ..PlanOptions::default()
        };
        let runs = plan(&domains, 1e6, &options).expect("plan");
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "base",
                "base-s1",
                "base-s2",
                "books-x0.2",
                "books-x3",
                "c4-x0.2",
                "c4-x3"
            ]
        );
        let seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 7, 7, 7, 7]);
        assert_eq!(runs[1].tokens, runs[0].tokens);
        let zero = PlanOptions {
            base_seeds: 0,
            ..PlanOptions::default()
        };
        assert!(plan(&domains, 1e6, &zero).is_err());
        // Plans written before seeds still read.
        let mut old = serde_json::to_value(&runs[0]).expect("json");
        old.as_object_mut().expect("object").remove("seed");
        let back: PlannedRun = serde_json::from_value(old).expect("old plan");
        assert_eq!(back.seed, 0);
        assert!(runs.iter().all(|r| r.data_seed.is_none()));
    }

    #[test]
    fn data_replicates_share_the_seed_and_redraw_the_data() {
        let domains = vec!["books".to_owned(), "c4".to_owned()];
        let options = PlanOptions {
            base_seeds: 3,
            seed: 7,
            replicate: "data".parse().expect("known"),
            ..PlanOptions::default()
        };
        let runs = plan(&domains, 1e6, &options).expect("plan");
        let seeds: Vec<(u64, Option<u64>)> = runs.iter().map(|r| (r.seed, r.data_seed)).collect();
        assert_eq!(
            seeds,
            [
                (7, None),
                (7, Some(8)),
                (7, Some(9)),
                (7, None),
                (7, None),
                (7, None),
                (7, None)
            ]
        );
        let err = "init".parse::<Replicate>().expect_err("unknown");
        assert!(err.to_string().contains("`data`"), "{err}");
    }
}
