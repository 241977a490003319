//! The parametric bootstrap behind DDO's and the predictor's intervals: the base replicates
//! measure the runs' noise `sigma` (in units of the objective ratio), so each resample draws
//! every perturbed run's ratio as `y_j + sigma* eps_j` and the paired base run (the first
//! replicate, whose seed the perturbed runs share) as `1 + sigma* eps_0`, renormalises so the
//! base point is 1 again, and redoes the fit
//! and solve (flat domains to the bound, so every resample has an answer). The spread of the
//! answers over a few hundred resamples is the interval. Seeded, so a report is reproducible.
//!
//! `sigma` itself comes from only `K - 1` degrees of freedom, so each resample also redraws it,
//! `sigma* = sigma sqrt((K - 1) / X)` with `X ~ chi^2(K - 1)` (its distribution given the
//! sample under the usual scale-invariant prior); the draws are then Student-t with `K - 1`
//! degrees of freedom. Without that, three base runs underestimate the noise often enough that
//! the 90% intervals of the predictor covered 60-80% in simulation.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{ChiSquared, Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::PowerCurve;
use crate::ddo::{CurvePoint, DdoEvidence, FitDepth, FlatPolicy, Solved, fit_and_solve};

/// How many resamples, the interval's coverage, and the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapOptions {
    /// 0 turns the bootstrap off.
    pub resamples: u32,
    /// The central probability of each interval: 0.9 gives the 5-95% percentiles.
    pub level: f64,
    pub seed: u64,
}

impl BootstrapOptions {
    /// The paper's arXiv number, so every report draws the same resamples unless told not to.
    pub const DEFAULT_SEED: u64 = 2407_20177;
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            resamples: 400,
            level: 0.9,
            seed: Self::DEFAULT_SEED,
        }
    }
}

/// The solved resamples of one DDO, and how many could not be solved.
pub(crate) struct DdoDraws {
    pub solutions: Vec<Option<Solved>>,
    pub failed: u32,
}

/// `options.resamples` refits of `evidence` on ratios redrawn with noise `sigma`, from a
/// generator seeded with `options.seed`.
pub(crate) fn ddo_draws(
    evidence: &DdoEvidence,
    sigma: f64,
    options: &BootstrapOptions,
) -> DdoDraws {
    let mut rng = StdRng::seed_from_u64(options.seed);
    ddo_draws_with(evidence, sigma, options.resamples, &mut rng)
}

pub(crate) fn ddo_draws_with(
    evidence: &DdoEvidence,
    sigma: f64,
    resamples: u32,
    rng: &mut StdRng,
) -> DdoDraws {
    // Resamples start their fits from the point estimate's curves.
    let starts: Vec<Option<PowerCurve>> = fit_and_solve(
        evidence,
        &evidence.points,
        FlatPolicy::Bound,
        FitDepth::Primary(&[]),
    )
    .map(|s| s.fits.iter().map(|f| f.as_ref().map(|f| f.curve)).collect())
    .unwrap_or_default();
    let dof = evidence.base_runs.saturating_sub(1).max(1) as f64;
    let sigma_spread = ChiSquared::new(dof).ok();
    let mut solutions = Vec::with_capacity(resamples as usize);
    let mut failed = 0;
    for _ in 0..resamples {
        let sigma = match &sigma_spread {
            Some(chi) => sigma * (dof / chi.sample(rng).max(f64::MIN_POSITIVE)).sqrt(),
            None => sigma,
        };
        let points = resample_points(evidence, sigma, rng);
        let solved = fit_and_solve(
            evidence,
            &points,
            FlatPolicy::Bound,
            FitDepth::Primary(&starts),
        )
        .ok();
        failed += u32::from(solved.is_none());
        solutions.push(solved);
    }
    DdoDraws { solutions, failed }
}

/// One resample of every domain's points; see the module docs.
pub(crate) fn resample_points(
    evidence: &DdoEvidence,
    sigma: f64,
    rng: &mut StdRng,
) -> Vec<Vec<CurvePoint>> {
    let mut eps = || -> f64 { StandardNormal.sample(rng) };
    // One run, not the replicates' mean: the ratios divide by the paired first replicate. The
    // draws are independent, which overstates the noise when a seed's luck is shared by the
    // runs it seeds (that part cancels in the ratios): the intervals err on the wide side.
    let base = 1.0 + sigma * eps();
    evidence
        .points
        .iter()
        .map(|points| {
            points
                .iter()
                .map(|p| CurvePoint {
                    multiplier: p.multiplier,
                    ratio: if p.multiplier == 1.0 {
                        1.0
                    } else {
                        (p.ratio + sigma * eps()) / base
                    },
                })
                .collect()
        })
        .collect()
}

/// Per domain, the central `level` percentile interval of the weights over the solved draws;
/// `None` when none was solved.
pub(crate) fn weight_intervals(draws: &[Option<Solved>], level: f64) -> Option<Vec<[f64; 2]>> {
    let solved: Vec<&Solved> = draws.iter().flatten().collect();
    let m = solved.first()?.weights.len();
    Some(
        (0..m)
            .map(|i| {
                let mut values: Vec<f64> = solved.iter().map(|s| s.weights[i]).collect();
                percentile_interval(&mut values, level)
            })
            .collect(),
    )
}

/// The `(1 - level) / 2` and `(1 + level) / 2` quantiles, interpolated linearly.
pub(crate) fn percentile_interval(values: &mut [f64], level: f64) -> [f64; 2] {
    values.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let pos = p * (values.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
    };
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    [q(tail), q(1.0 - tail)]
}

/// Sample standard deviation; 0 for fewer than two values.
pub(crate) fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::PowerLawMix;
    use crate::{DdoOptions, ScaleComposition, Target, ddo, predict, predict_with_bootstrap};

    /// The DDO tests' synthetic law, whose ratio curves DDO's model fits exactly.
    const AB: [(f64, f64); 3] = [(2.0, 1.0), (0.5, 3.0), (2.0, 3.0)];

    fn options(resamples: u32) -> DdoOptions {
        DdoOptions {
            bootstrap: BootstrapOptions {
                resamples,
                ..BootstrapOptions::default()
            },
            ..DdoOptions::default()
        }
    }

    fn composition(report: &crate::DdoReport, total: f64) -> ScaleComposition {
        let json = serde_json::to_string(report).expect("json");
        ScaleComposition::from_json(total, &json, "report").expect("composition")
    }

    #[test]
    fn zero_noise_intervals_collapse_to_the_point() {
        let problem = PowerLawMix::exact(&AB, 3e8, 20.0);
        let mut rng = StdRng::seed_from_u64(1);
        // Three base replicates that agree exactly: sigma is measured, and it is 0.
        let runs = problem.runs(3e8, &[0.2, 3.0], 3, 0.0, &mut rng);
        let report = ddo(&runs, &options(50)).expect("ddo");
        assert_eq!(report.noise.sigma, Some(0.0));
        for d in &report.domains {
            let [lo, hi] = d.interval.expect("interval");
            assert!(
                (lo - d.weight).abs() < 1e-9 && (hi - d.weight).abs() < 1e-9,
                "{d:?}"
            );
        }
        let large = problem.runs(9e8, &[0.2, 3.0], 3, 0.0, &mut rng);
        let large = ddo(&large, &options(50)).expect("ddo");
        let scales = [composition(&report, 3e8), composition(&large, 9e8)];
        let p = predict_with_bootstrap(&scales, Target::TotalTokens(3e9), &options(50).bootstrap)
            .expect("predict");
        for d in &p.domains {
            let [lo, hi] = d.interval.expect("interval");
            assert!(
                (lo - d.weight).abs() < 1e-9 && (hi - d.weight).abs() < 1e-9,
                "{d:?}"
            );
        }
    }

    /// Coverage of the 90% intervals over 100 independent noisy DDOs of a problem whose true
    /// optimum is known: the law DDO's model fits exactly, sigma = 0.02 of the objective
    /// (the domains' signals |y(0.2) - y(3)| are 0.25, 2.9 and 0.086, so 4 to 140 sigma), 4
    /// base runs, 200 resamples each. Measured: 95, 91 and 93 of 100 for the three domains
    /// (89, 79 and 87 before the resamples redrew sigma, see the module docs).
    #[test]
    fn ddo_intervals_cover_the_true_optimum() {
        let total = 3e8;
        let problem = PowerLawMix::exact(&AB, total, 20.0);
        let floors = [0.2 * total / 3.0; 3];
        let truth: Vec<f64> = problem
            .optimum(total, &floors)
            .iter()
            .map(|n| n / total)
            .collect();
        let mut rng = StdRng::seed_from_u64(11);
        let mut covered = [0; 3];
        for _ in 0..100 {
            let runs = problem.runs(total, &[0.2, 3.0], 4, 0.02, &mut rng);
            let report = ddo(&runs, &options(200)).expect("ddo");
            for (i, d) in report.domains.iter().enumerate() {
                let [lo, hi] = d.interval.expect("interval");
                covered[i] += usize::from(lo <= truth[i] && truth[i] <= hi);
            }
        }
        eprintln!("DDO 90% interval coverage of the true optimum, of 100: {covered:?}");
        assert!(covered.iter().all(|c| *c >= 80), "{covered:?}");
    }

    /// Coverage of the predicted weights' 90% intervals of the prediction DDO would make
    /// without noise (the interval is about noise, not about the model's bias): a law with
    /// every domain well inside DDO's bound at 1e8 and 3e8 tokens, predicted at 9e8, sigma
    /// 0.01 against signals of 0.17 to 0.63, 4 base runs. Measured: 94, 97 and 97 of 100.
    /// (Where a domain sits near the bound, resamples cross it and the censored rule takes
    /// over in some of them; coverage then drops, e.g. to 60-65 for `AB`'s domains.)
    #[test]
    fn predicted_intervals_cover_the_noiseless_prediction() {
        let problem = PowerLawMix::exact(&[(2.0, 1.0), (1.0, 2.0), (2.0, 2.0)], 1e8, 20.0);
        let (n1, n2, target) = (1e8, 3e8, Target::TotalTokens(9e8));
        let mut rng = StdRng::seed_from_u64(5);
        let exact = |total: f64, rng: &mut StdRng| {
            let runs = problem.runs(total, &[0.2, 3.0], 2, 0.0, rng);
            composition(&ddo(&runs, &options(0)).expect("ddo"), total)
        };
        let noiseless = [exact(n1, &mut rng), exact(n2, &mut rng)];
        let truth = predict(&noiseless, target).expect("predict");
        let mut covered = [0; 3];
        for _ in 0..100 {
            let scales: Vec<ScaleComposition> = [n1, n2]
                .iter()
                .map(|&total| {
                    let runs = problem.runs(total, &[0.2, 3.0], 4, 0.01, &mut rng);
                    composition(&ddo(&runs, &options(0)).expect("ddo"), total)
                })
                .collect();
            let bootstrap = BootstrapOptions {
                resamples: 200,
                ..BootstrapOptions::default()
            };
            let p = predict_with_bootstrap(&scales, target, &bootstrap).expect("predict");
            for (i, (d, t)) in p.domains.iter().zip(&truth.domains).enumerate() {
                let [lo, hi] = d.interval.expect("interval");
                covered[i] += usize::from(lo <= t.weight && t.weight <= hi);
            }
        }
        eprintln!(
            "predicted 90% interval coverage of the noiseless prediction, of 100: {covered:?}"
        );
        assert!(covered.iter().all(|c| *c >= 80), "{covered:?}");
    }
}
