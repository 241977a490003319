//! The AutoScale predictor: from optimal compositions at two or more data scales, the optimal
//! composition at a larger one.
//!
//! Theory: if the loss is `sum_i beta_i N_i^(-gamma_i)`, the optimum at any budget satisfies
//! `gamma_i beta_i N_i^(-gamma_i - 1) = lambda`, so `ln N_i* = (ln(gamma_i beta_i) - ln lambda) /
//! (gamma_i + 1)`: every `ln N_i*` is affine in the one parameter `ln lambda`. Rescaled so the
//! two smallest inputs sit at `s = 0` and `s = 1`, `N_i(s) = N_i^(1) (N_i^(2) / N_i^(1))^s`;
//! `s = 2` is the paper's rule `N^(3)* = N^(2)* (N^(1)*)^(-1) N^(2)*`, element-wise.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{MixError, MixtureWeights, TokenQuantities, table};

/// The optimal composition found at one data scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleComposition {
    pub total_tokens: f64,
    pub weights: MixtureWeights,
    /// Domains DDO left on its lower bound at this scale.
    #[serde(default)]
    pub on_bound: Vec<String>,
    /// DDO's lower bound on multipliers, for plain weights without flags: assuming a uniform
    /// base over `m` domains, a domain with `w_i <= n_min / m` counts as on the bound.
    #[serde(default)]
    pub min_multiplier: Option<f64>,
}

/// What a weights JSON must hold: a `weights` map. Also matches a [`crate::DdoReport`] (whose
/// `domains[].on_bound` flags are kept) and a [`Prediction`]; other fields are ignored.
#[derive(Deserialize)]
struct WeightsFile {
    weights: MixtureWeights,
    #[serde(default)]
    domains: Vec<DomainFlag>,
    #[serde(default)]
    on_bound: Vec<String>,
}

#[derive(Deserialize)]
struct DomainFlag {
    name: String,
    #[serde(default)]
    on_bound: bool,
}

impl ScaleComposition {
    pub fn new(total_tokens: f64, weights: MixtureWeights) -> Self {
        Self {
            total_tokens,
            weights,
            on_bound: Vec::new(),
            min_multiplier: None,
        }
    }

    pub fn from_tokens(tokens: &TokenQuantities) -> Result<Self, MixError> {
        Ok(Self::new(tokens.total(), tokens.to_weights()?))
    }

    /// `N_i = w_i N`.
    pub fn tokens(&self) -> Result<TokenQuantities, MixError> {
        self.weights.to_tokens(self.total_tokens)
    }

    /// Reads `{"weights": {"books": 0.2, ...}}` (or a DDO report / prediction JSON) for a
    /// composition at `total_tokens`; `origin` names the source in errors.
    pub fn from_json(total_tokens: f64, json: &str, origin: &str) -> Result<Self, MixError> {
        let file: WeightsFile = serde_json::from_str(json).map_err(|source| MixError::Json {
            origin: origin.to_owned(),
            source,
        })?;
        let mut on_bound = file.on_bound;
        on_bound.extend(
            file.domains
                .into_iter()
                .filter(|d| d.on_bound)
                .map(|d| d.name),
        );
        Ok(Self {
            on_bound,
            ..Self::new(total_tokens, file.weights)
        })
    }

    pub fn from_json_file(total_tokens: f64, path: &Path) -> Result<Self, MixError> {
        let text = std::fs::read_to_string(path).map_err(|source| MixError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(total_tokens, &text, &format!("`{}`", path.display()))
    }

    /// Reads a CLI spec `TOTAL=PATH`, e.g. `3e8=w.json`: the weights file at that total.
    pub fn from_spec(spec: &str) -> Result<Self, MixError> {
        let (total, path) = parse_scale_spec(spec)?;
        Self::from_json_file(total, &path)
    }

    fn bound_domains(&self) -> Vec<String> {
        let mut flagged = self.on_bound.clone();
        if let Some(n_min) = self.min_multiplier {
            let floor = n_min / self.weights.len() as f64 * (1.0 + 1e-6);
            flagged.extend(
                self.weights
                    .iter()
                    .filter(|(d, w)| *w <= floor && !flagged.iter().any(|f| f == d))
                    .map(|(d, _)| d.to_owned())
                    .collect::<Vec<_>>(),
            );
        }
        flagged
    }
}

/// Splits `TOTAL=PATH` (e.g. `3e8=w.json`) into a positive token total and a path.
pub fn parse_scale_spec(spec: &str) -> Result<(f64, PathBuf), MixError> {
    let bad = |reason: &str| MixError::invalid(format!("scale `{spec}`"), reason);
    let (total, path) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected TOTAL_TOKENS=WEIGHTS.json, e.g. 3e8=w.json"))?;
    let total = total
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0)
        .ok_or_else(|| bad("the total before `=` must be a positive number of tokens"))?;
    if path.trim().is_empty() {
        return Err(bad("no weights file after `=`"));
    }
    Ok((total, PathBuf::from(path.trim())))
}

/// Where to extrapolate to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Apply the paper's rule `k` times past the largest input: `s = s_K + k (s_K - s_{K-1})`;
    /// with two scales `N^(2) (N^(2)/N^(1))^k`.
    Steps(u32),
    /// The scale parameter itself (`s = 0`, `1` are the two smallest inputs).
    Param(f64),
    /// The `s` at which `sum_i N_i(s)` equals this many tokens.
    TotalTokens(f64),
}

/// One input scale after the fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FittedScale {
    pub total_tokens: f64,
    pub s: f64,
    /// RMS over domains of `ln N_i - (alpha_i + delta_i s)`; zero with two scales.
    pub rms_log_residual: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedDomain {
    pub name: String,
    pub tokens: f64,
    pub weight: f64,
    /// `delta_i = d ln N_i / d s`.
    pub log_slope: f64,
}

/// The extrapolated composition. Its `weights` map makes the JSON a valid weights file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub s: f64,
    pub total_tokens: f64,
    pub weights: MixtureWeights,
    pub tokens: TokenQuantities,
    pub domains: Vec<PredictedDomain>,
    pub scales: Vec<FittedScale>,
    pub warnings: Vec<String>,
}

/// Fits `ln N_i = alpha_i + delta_i s` to the inputs and evaluates it at `target`.
///
/// The scale parameter: two scales get `s = 0, 1` (smallest first). With three or more, the
/// `s_k` are not assumed from the totals (the exact theory makes `s` affine in `ln lambda`,
/// which is affine in `ln N` only when all `gamma_i` agree) but fitted jointly with
/// `alpha, delta` by least squares: the best rank-one fit of the column-centred matrix
/// `ln N_i^(k)` (power iteration started from the centred `ln N^(k)`), then rescaled so the
/// two smallest scales sit at `s = 0` and `s = 1`. Exact power-law optima give zero residual.
pub fn predict(scales: &[ScaleComposition], target: Target) -> Result<Prediction, MixError> {
    if scales.len() < 2 {
        return Err(MixError::invalid(
            "scales",
            format!(
                "{} composition(s); extrapolation needs at least two scales",
                scales.len()
            ),
        ));
    }
    let mut sorted: Vec<&ScaleComposition> = scales.iter().collect();
    sorted.sort_by(|p, q| p.total_tokens.total_cmp(&q.total_tokens));
    let domains: Vec<String> = sorted[0].weights.domains().map(str::to_owned).collect();
    for (k, sc) in sorted.iter().enumerate() {
        if !(sc.total_tokens.is_finite() && sc.total_tokens > 0.0) {
            return Err(MixError::invalid(
                "scales",
                format!("total {} is not a positive token count", sc.total_tokens),
            ));
        }
        if k > 0 && sc.total_tokens == sorted[k - 1].total_tokens {
            return Err(MixError::invalid(
                "scales",
                format!("two compositions at the same total {:e}", sc.total_tokens),
            ));
        }
        let names: Vec<&str> = sc.weights.domains().collect();
        if names != domains {
            let missing: Vec<&String> = domains
                .iter()
                .filter(|d| !names.contains(&d.as_str()))
                .collect();
            let extra: Vec<&&str> = names
                .iter()
                .filter(|n| !domains.iter().any(|d| d == *n))
                .collect();
            return Err(MixError::DomainMismatch {
                left: format!("scale {:e}", sorted[0].total_tokens),
                right: format!("scale {:e}", sc.total_tokens),
                detail: format!("missing {missing:?}, extra {extra:?}"),
            });
        }
    }
    let mut log_tokens = Vec::with_capacity(sorted.len());
    for sc in &sorted {
        let mut row = Vec::with_capacity(domains.len());
        for (d, w) in sc.weights.iter() {
            if w <= 0.0 {
                return Err(MixError::invalid(
                    format!("composition at {:e} tokens", sc.total_tokens),
                    format!(
                        "`{d}` has weight 0; log-affine extrapolation needs positive quantities"
                    ),
                ));
            }
            row.push((w * sc.total_tokens).ln());
        }
        log_tokens.push(row);
    }
    let totals: Vec<f64> = sorted.iter().map(|s| s.total_tokens.ln()).collect();
    let fit = fit_log_affine(&log_tokens, &totals)?;

    let s_last = fit.s[fit.s.len() - 1];
    let s = match target {
        Target::Param(s) if s.is_finite() => s,
        Target::Param(s) => return Err(MixError::invalid("target s", format!("{s}"))),
        Target::Steps(k) => s_last + f64::from(k) * (s_last - fit.s[fit.s.len() - 2]),
        Target::TotalTokens(t) => solve_total(&fit.alpha, &fit.delta, t)?,
    };
    let raw: Vec<f64> = fit
        .alpha
        .iter()
        .zip(&fit.delta)
        .map(|(a, d)| (a + d * s).exp())
        .collect();
    if raw.iter().any(|n| !n.is_finite()) {
        return Err(MixError::Unreachable {
            target: format!("s = {s}"),
            reason: "token quantities overflow".to_owned(),
        });
    }
    let tokens = TokenQuantities::new(domains.iter().cloned().zip(raw.iter().copied()))?;
    let weights = tokens.to_weights()?;
    let mut warnings = Vec::new();
    for sc in &sorted {
        for d in sc.bound_domains() {
            warnings.push(format!(
                "domain `{d}` sits on the DDO lower bound at {:e} tokens; its extrapolation follows a floor, not an interior optimum",
                sc.total_tokens
            ));
        }
    }
    if s < s_last {
        warnings.push(format!(
            "target s = {s:.3} lies below the largest input scale (s = {s_last:.3}); this interpolates"
        ));
    }
    if fit.s.windows(2).any(|w| w[1] <= w[0]) {
        warnings.push(
            "the fitted scale parameter does not grow with the total; the inputs disagree with the log-affine model".to_owned(),
        );
    }
    Ok(Prediction {
        s,
        total_tokens: tokens.total(),
        domains: domains
            .iter()
            .zip(&raw)
            .zip(&fit.delta)
            .map(|((name, &n), &delta)| PredictedDomain {
                name: name.clone(),
                tokens: n,
                weight: weights.get(name).unwrap_or(0.0),
                log_slope: delta,
            })
            .collect(),
        scales: sorted
            .iter()
            .zip(&fit.s)
            .zip(&fit.rms)
            .map(|((sc, &s), &rms)| FittedScale {
                total_tokens: sc.total_tokens,
                s,
                rms_log_residual: rms,
            })
            .collect(),
        weights,
        tokens,
        warnings,
    })
}

impl Prediction {
    /// A fixed-width table of the predicted composition, then the fitted input scales.
    pub fn render_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .domains
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    format!("{:.4}", d.weight),
                    format!("{:.3e}", d.tokens),
                    format!("{:.4}", d.log_slope),
                ]
            })
            .collect();
        let mut out = table::render(&["domain", "weight", "tokens", "dlnN/ds"], &rows);
        out.push_str(&format!(
            "total {:.3e} tokens at s = {:.4}\n",
            self.total_tokens, self.s
        ));
        let scales: Vec<Vec<String>> = self
            .scales
            .iter()
            .map(|f| {
                vec![
                    format!("{:.3e}", f.total_tokens),
                    format!("{:.4}", f.s),
                    format!("{:.1e}", f.rms_log_residual),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &["input total", "s", "rms ln residual"],
            &scales,
        ));
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}

struct LogAffineFit {
    alpha: Vec<f64>,
    delta: Vec<f64>,
    s: Vec<f64>,
    rms: Vec<f64>,
}

/// Least-squares `m[k][i] ~ alpha_i + delta_i s_k` with `s_0 = 0`, `s_1 = 1`; see [`predict`].
fn fit_log_affine(m: &[Vec<f64>], log_totals: &[f64]) -> Result<LogAffineFit, MixError> {
    let (k_n, d_n) = (m.len(), m[0].len());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mu: Vec<f64> = (0..d_n)
        .map(|i| mean(&m.iter().map(|row| row[i]).collect::<Vec<_>>()))
        .collect();
    let centred: Vec<Vec<f64>> = m
        .iter()
        .map(|row| row.iter().zip(&mu).map(|(x, u)| x - u).collect())
        .collect();
    let t_mean = mean(log_totals);
    let mut u: Vec<f64> = log_totals.iter().map(|t| t - t_mean).collect();
    let mut v = vec![0.0; d_n];
    for _ in 0..10_000 {
        v = (0..d_n)
            .map(|i| (0..k_n).map(|k| centred[k][i] * u[k]).sum())
            .collect();
        let next: Vec<f64> = centred
            .iter()
            .map(|row| row.iter().zip(&v).map(|(c, x)| c * x).sum())
            .collect();
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if !(norm > 0.0 && norm.is_finite()) {
            break;
        }
        let next: Vec<f64> = next.iter().map(|x| x / norm).collect();
        let change = next
            .iter()
            .zip(&u)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        u = next;
        if change < 1e-15 {
            break;
        }
    }
    let uu: f64 = u.iter().map(|x| x * x).sum();
    let spread = u[1] - u[0];
    if !(uu.is_finite() && uu > 0.0) || spread.abs() < 1e-12 * uu.sqrt() {
        return Err(MixError::invalid(
            "scales",
            "the two smallest compositions are identical in tokens; nothing to extrapolate",
        ));
    }
    // delta for the unit-norm u, then rescale s so the two smallest scales sit at 0 and 1.
    let delta_u: Vec<f64> = (0..d_n)
        .map(|i| (0..k_n).map(|k| centred[k][i] * u[k]).sum::<f64>() / uu)
        .collect();
    let s: Vec<f64> = u.iter().map(|x| (x - u[0]) / spread).collect();
    let delta: Vec<f64> = delta_u.iter().map(|d| d * spread).collect();
    let alpha: Vec<f64> = mu.iter().zip(&delta_u).map(|(m, d)| m + d * u[0]).collect();
    let rms = m
        .iter()
        .zip(&s)
        .map(|(row, sk)| {
            let sq: f64 = row
                .iter()
                .enumerate()
                .map(|(i, x)| (x - alpha[i] - delta[i] * sk).powi(2))
                .sum();
            (sq / d_n as f64).sqrt()
        })
        .collect();
    Ok(LogAffineFit {
        alpha,
        delta,
        s,
        rms,
    })
}

/// The `s` with `sum_i exp(alpha_i + delta_i s) = total` on the branch where the sum grows
/// with `s`. The sum is convex in `s`, so that branch starts at its minimum (or at `-inf` when
/// every `delta_i > 0`); below that minimum the total is unreachable.
fn solve_total(alpha: &[f64], delta: &[f64], total: f64) -> Result<f64, MixError> {
    let unreachable = |reason: String| MixError::Unreachable {
        target: format!("{total:e} tokens"),
        reason,
    };
    if !(total.is_finite() && total > 0.0) {
        return Err(unreachable(
            "the target must be a positive token count".to_owned(),
        ));
    }
    let ln_total = total.ln();
    // ln sum_i exp(alpha_i + delta_i s), and the sign of its slope, without overflow.
    let exps = |s: f64| -> Vec<f64> { alpha.iter().zip(delta).map(|(a, d)| a + d * s).collect() };
    let ln_sum = |s: f64| {
        let e = exps(s);
        let top = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        top + e.iter().map(|x| (x - top).exp()).sum::<f64>().ln()
    };
    let slope = |s: f64| {
        let e = exps(s);
        let top = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        e.iter()
            .zip(delta)
            .map(|(x, d)| d * (x - top).exp())
            .sum::<f64>()
    };
    if delta.iter().all(|d| *d <= 0.0) {
        return Err(unreachable(
            "no domain grows with scale, so the total never increases".to_owned(),
        ));
    }
    let branch_start = if delta.iter().all(|d| *d > 0.0) {
        None
    } else {
        // The slope rises from negative to positive: bracket its root and bisect.
        let (mut lo, mut hi, mut step) = (-1.0, 1.0, 1.0);
        while slope(lo) > 0.0 && step < 1e6 {
            lo -= step;
            step *= 2.0;
        }
        step = 1.0;
        while slope(hi) < 0.0 && step < 1e6 {
            hi += step;
            step *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if slope(mid) < 0.0 { lo = mid } else { hi = mid }
        }
        Some(0.5 * (lo + hi))
    };
    let mut lo = match branch_start {
        Some(start) if ln_sum(start) > ln_total => {
            return Err(unreachable(format!(
                "the smallest total on the extrapolation path is {:e} tokens",
                ln_sum(start).exp()
            )));
        }
        Some(start) => start,
        None => {
            let (mut lo, mut step) = (-1.0, 1.0);
            while ln_sum(lo) > ln_total && step < 1e6 {
                lo -= step;
                step *= 2.0;
            }
            lo
        }
    };
    let (mut hi, mut step) = (lo.max(1.0), 1.0);
    while ln_sum(hi) < ln_total && step < 1e6 {
        hi += step;
        step *= 2.0;
    }
    if !(ln_sum(lo) <= ln_total && ln_sum(hi) >= ln_total) {
        return Err(unreachable("no scale parameter brackets it".to_owned()));
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if ln_sum(mid) < ln_total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(0.5 * (lo + hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimum of `sum_i beta_i N_i^(-gamma_i)` at `total`, from its first-order condition
    /// `N_i = (gamma_i beta_i / lambda)^(1/(gamma_i + 1))`, bisecting `ln lambda`.
    fn true_optimum(beta: &[f64], gamma: &[f64], total: f64) -> Vec<f64> {
        let at = |ln_l: f64| -> Vec<f64> {
            beta.iter()
                .zip(gamma)
                .map(|(b, g)| (((g * b).ln() - ln_l) / (g + 1.0)).exp())
                .collect()
        };
        let (mut lo, mut hi) = (-200.0, 200.0);
        for _ in 0..300 {
            let mid = 0.5 * (lo + hi);
            if at(mid).iter().sum::<f64>() > total {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        at(0.5 * (lo + hi))
    }

    const NAMES: [&str; 3] = ["books", "c4", "github"];
    const BETA: [f64; 3] = [1e3, 5e2, 2e4];
    const GAMMA: [f64; 3] = [0.3, 0.5, 0.4];

    fn composition(tokens: &[f64]) -> ScaleComposition {
        let t = TokenQuantities::new(NAMES.iter().copied().zip(tokens.iter().copied())).expect("t");
        ScaleComposition::from_tokens(&t).expect("composition")
    }

    fn optimum_at(total: f64) -> ScaleComposition {
        composition(&true_optimum(&BETA, &GAMMA, total))
    }

    fn assert_tokens_close(p: &Prediction, expected: &[f64], rel: f64) {
        for (name, want) in NAMES.iter().zip(expected) {
            let got = p.tokens.get(name).expect("domain");
            assert!(((got - want) / want).abs() < rel, "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn two_scales_extrapolate_to_the_true_optimum() {
        let scales = [optimum_at(1e8), optimum_at(3e8)];
        let p = predict(&scales, Target::TotalTokens(5e9)).expect("predict");
        assert!((p.total_tokens - 5e9).abs() < 1.0);
        assert_tokens_close(&p, &true_optimum(&BETA, &GAMMA, 5e9), 1e-9);
        assert!(p.s > 1.0 && p.warnings.is_empty(), "{p:?}");
        let w: f64 = p.weights.iter().map(|(_, x)| x).sum();
        assert!((w - 1.0).abs() < 1e-12);
    }

    #[test]
    fn s_one_two_and_steps_follow_the_paper_rule() {
        let (n1, n2) = ([10.0, 40.0, 50.0], [30.0, 60.0, 110.0]);
        // Unsorted on purpose: the predictor orders scales by total.
        let scales = [composition(&n2), composition(&n1)];
        let at_one = predict(&scales, Target::Param(1.0)).expect("s=1");
        assert_tokens_close(&at_one, &n2, 1e-12);
        let rule: Vec<f64> = n1.iter().zip(&n2).map(|(a, b)| b * b / a).collect();
        let at_two = predict(&scales, Target::Param(2.0)).expect("s=2");
        assert_tokens_close(&at_two, &rule, 1e-12);
        assert!((at_two.total_tokens - rule.iter().sum::<f64>()).abs() < 1e-9);
        for k in 0..4 {
            let want: Vec<f64> = n1
                .iter()
                .zip(&n2)
                .map(|(a, b)| b * (b / a).powi(k))
                .collect();
            let p = predict(&scales, Target::Steps(k.unsigned_abs())).expect("steps");
            assert_tokens_close(&p, &want, 1e-12);
            assert!((p.s - f64::from(1 + k)).abs() < 1e-12);
        }
    }

    #[test]
    fn three_scales_fit_exactly_and_predict_a_fourth() {
        let scales = [optimum_at(1e8), optimum_at(3e8), optimum_at(2e9)];
        let p = predict(&scales, Target::TotalTokens(3e10)).expect("predict");
        assert_tokens_close(&p, &true_optimum(&BETA, &GAMMA, 3e10), 1e-9);
        assert!(
            p.scales.iter().all(|f| f.rms_log_residual < 1e-9),
            "{:?}",
            p.scales
        );
        assert!((p.scales[0].s).abs() < 1e-12 && (p.scales[1].s - 1.0).abs() < 1e-12);
        // Unequal gammas: the fitted s of the third scale is not the one ln(total) implies.
        let from_totals = (2e9f64 / 1e8).ln() / 3f64.ln();
        assert!((p.scales[2].s - from_totals).abs() > 1e-3, "{:?}", p.scales);
    }

    #[test]
    fn noisy_scales_report_residuals() {
        let mut third = true_optimum(&BETA, &GAMMA, 2e9);
        third[0] *= 1.3;
        let scales = [optimum_at(1e8), optimum_at(3e8), composition(&third)];
        let p = predict(&scales, Target::Steps(1)).expect("predict");
        assert!(
            p.scales.iter().any(|f| f.rms_log_residual > 1e-3),
            "{:?}",
            p.scales
        );
        assert!(p.render_table().contains("rms ln residual"));
    }

    #[test]
    fn bound_domains_are_warned_about() {
        let mut small = optimum_at(1e8);
        small.on_bound = vec!["github".to_owned()];
        let p = predict(&[small, optimum_at(3e8)], Target::Steps(1)).expect("predict");
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("`github`"), "{:?}", p.warnings);

        let mut floored = composition(&[10.0, 10.0, 130.0]);
        floored.min_multiplier = Some(0.2);
        let p = predict(
            &[floored, composition(&[20.0, 30.0, 250.0])],
            Target::Steps(1),
        )
        .expect("predict");
        let flagged: Vec<&String> = p
            .warnings
            .iter()
            .filter(|w| w.contains("lower bound"))
            .collect();
        assert_eq!(flagged.len(), 2, "{:?}", p.warnings);
    }

    #[test]
    fn impossible_requests_are_errors() {
        let one = [optimum_at(1e8)];
        assert!(predict(&one, Target::Steps(1)).is_err());
        let same = [optimum_at(1e8), optimum_at(1e8)];
        assert!(predict(&same, Target::Steps(1)).is_err());

        let other = ScaleComposition::new(
            3e8,
            MixtureWeights::normalized([("books", 1.0), ("wiki", 1.0), ("github", 1.0)])
                .expect("w"),
        );
        let err = predict(&[optimum_at(1e8), other], Target::Steps(1)).expect_err("mismatch");
        assert!(err.to_string().contains("wiki"), "{err}");

        let zero = composition(&[0.0, 10.0, 10.0]);
        assert!(predict(&[zero, optimum_at(3e8)], Target::Steps(1)).is_err());

        // books shrinks while c4 grows: the total along the path has a positive minimum.
        let scales = [
            composition(&[50.0, 50.0, 1.0]),
            composition(&[25.0, 175.0, 1.0]),
        ];
        let err = predict(&scales, Target::TotalTokens(10.0)).expect_err("below the minimum");
        assert!(err.to_string().contains("smallest total"), "{err}");
        let p = predict(&scales, Target::TotalTokens(1000.0)).expect("above it");
        assert!((p.total_tokens - 1000.0).abs() < 1e-6);
        assert!(solve_total(&[1.0, 2.0], &[-0.5, 0.0], 10.0).is_err());
        assert!(predict(&scales, Target::Param(f64::NAN)).is_err());
    }

    #[test]
    fn compositions_read_from_weights_report_and_prediction_json() {
        let plain = ScaleComposition::from_json(3e8, r#"{"weights": {"a": 1, "b": 3}}"#, "w.json")
            .expect("plain weights");
        assert_eq!(plain.weights.get("b"), Some(0.75));
        assert!(plain.on_bound.is_empty());

        let csv = "perturbed,multiplier,a,b\n,1,10,10\na,0.2,10.5,10.1\na,3,9.8,9.99\nb,0.2,10.001,10.001\nb,3,10,9.9999\n";
        let report =
            crate::ddo_from_csv(csv.as_bytes(), &crate::DdoOptions::default()).expect("ddo");
        let json = serde_json::to_string(&report).expect("serialise");
        let from_report = ScaleComposition::from_json(1e8, &json, "report.json").expect("report");
        assert_eq!(from_report.weights, report.weights);
        let bound: Vec<String> = report
            .domains
            .iter()
            .filter(|d| d.on_bound)
            .map(|d| d.name.clone())
            .collect();
        assert_eq!(from_report.on_bound, bound);
        assert_eq!(bound, vec!["b".to_owned()], "{}", report.render_table());

        let p = predict(&[optimum_at(1e8), optimum_at(3e8)], Target::Steps(1)).expect("predict");
        let chained = ScaleComposition::from_json(
            p.total_tokens,
            &serde_json::to_string(&p).expect("json"),
            "p",
        )
        .expect("prediction json");
        assert_eq!(chained.weights, p.weights);

        let err = ScaleComposition::from_json(1e8, r#"{"weight": {}}"#, "`w.json`")
            .expect_err("no weights");
        assert!(err.to_string().contains("`w.json`"), "{err}");
    }

    #[test]
    fn scale_specs_parse() {
        let (total, path) = parse_scale_spec("3e8=out/w.json").expect("spec");
        assert_eq!(total, 3e8);
        assert_eq!(path, PathBuf::from("out/w.json"));
        assert!(parse_scale_spec("w.json").is_err());
        assert!(parse_scale_spec("-1=w.json").is_err());
        assert!(parse_scale_spec("3e8=").is_err());
        let err = ScaleComposition::from_spec("3e8=/nonexistent/w.json").expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/w.json"), "{err}");
    }
}
