//! Synthetic mixture problems with known optima, for the tests: the shifted power law
//! `L(N) = sum_i beta_i (N_i + A_i)^(-gamma_i) + l` (see `Synthetic` in the DDO tests for the
//! case where DDO's ratio model is exact), its optimum at any total, and DDO runs on it with
//! seeded noise.

use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{DdoRuns, PerturbedRun};

pub(crate) struct PowerLawMix {
    pub names: Vec<String>,
    pub beta: Vec<f64>,
    /// `A_i`, in tokens.
    pub shift: Vec<f64>,
    pub gamma: Vec<f64>,
    pub irreducible: f64,
}

impl PowerLawMix {
    /// The case DDO's model fits exactly: with `N_i^0 = base_total / m`, `A_i = a_i N_i^0`,
    /// `gamma_i = b_i`, `beta_i = o0 (N_i^0)^(b_i)` and `l = o0 (1 - sum_i (1 + a_i)^(-b_i))`,
    /// each perturbed run's ratio is exactly `(n + a_i)^(-b_i) + c_i`.
    pub fn exact(ab: &[(f64, f64)], base_total: f64, o0: f64) -> Self {
        let n0 = base_total / ab.len() as f64;
        Self {
            names: (0..ab.len()).map(|i| format!("d{i}")).collect(),
            beta: ab.iter().map(|(_, b)| o0 * n0.powf(*b)).collect(),
            shift: ab.iter().map(|(a, _)| a * n0).collect(),
            gamma: ab.iter().map(|(_, b)| *b).collect(),
            irreducible: o0 * (1.0 - ab.iter().map(|(a, b)| (1.0 + a).powf(-b)).sum::<f64>()),
        }
    }

    /// A random problem of 3 to 5 domains around a base total of `n1` tokens: each domain's
    /// term is worth `10^U(-2, -0.3)` of loss at the uniform base, so some domains barely
    /// matter (and land on DDO's bound) while others dominate.
    pub fn random(rng: &mut StdRng, n1: f64) -> Self {
        let m = rng.random_range(3..=5);
        let n0 = n1 / m as f64;
        let mut p = Self {
            names: (0..m).map(|i| format!("d{i}")).collect(),
            beta: Vec::new(),
            shift: Vec::new(),
            gamma: Vec::new(),
            irreducible: 1.5,
        };
        for _ in 0..m {
            let gamma = rng.random_range(0.15..0.7);
            let a = rng.random_range(0.0..1.5);
            let worth = 10f64.powf(rng.random_range(-2.0..-0.3));
            p.gamma.push(gamma);
            p.shift.push(a * n0);
            p.beta.push(worth * (n0 * (1.0 + a)).powf(gamma));
        }
        p
    }

    pub fn loss(&self, tokens: &[f64]) -> f64 {
        tokens
            .iter()
            .enumerate()
            .map(|(i, n)| self.beta[i] * (n + self.shift[i]).powf(-self.gamma[i]))
            .sum::<f64>()
            + self.irreducible
    }

    /// The tokens minimising the loss at `total` with `N_i >= floors[i]`, by KKT:
    /// `N_i(lambda) = max(floor_i, (gamma_i beta_i / lambda)^(1/(gamma_i + 1)) - A_i)`.
    pub fn optimum(&self, total: f64, floors: &[f64]) -> Vec<f64> {
        let at = |ln_l: f64| -> Vec<f64> {
            (0..self.beta.len())
                .map(|i| {
                    let g = self.gamma[i];
                    let free = (((g * self.beta[i]).ln() - ln_l) / (g + 1.0)).exp() - self.shift[i];
                    free.max(floors[i])
                })
                .collect()
        };
        let sum = |ln_l: f64| at(ln_l).iter().sum::<f64>();
        let (mut lo, mut hi) = (-10.0, 10.0);
        while sum(lo) < total {
            lo -= 10.0;
        }
        while sum(hi) > total {
            hi += 10.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if sum(mid) > total {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        at(0.5 * (lo + hi))
    }

    /// The true optimal weights at `total`, starving no domain (`N_i >= 0`).
    pub fn optimal_weights(&self, total: f64) -> Vec<f64> {
        self.optimum(total, &vec![0.0; self.beta.len()])
            .iter()
            .map(|n| n / total)
            .collect()
    }

    /// DDO's runs at `base_total` with a uniform base: `base_runs` replicates of the base
    /// run, then each domain at each multiplier. Every run's objective is its loss times
    /// `1 + sigma eps` (every evaluation column carries it, so the mean objective does).
    pub fn runs(
        &self,
        base_total: f64,
        multipliers: &[f64],
        base_runs: usize,
        sigma: f64,
        rng: &mut StdRng,
    ) -> DdoRuns {
        let m = self.names.len();
        let n0 = base_total / m as f64;
        let mut noisy = |tokens: &[f64]| -> Vec<f64> {
            let eps: f64 = StandardNormal.sample(rng);
            vec![self.loss(tokens) * (1.0 + sigma * eps); m]
        };
        let base: Vec<Vec<f64>> = (0..base_runs).map(|_| noisy(&vec![n0; m])).collect();
        let mut perturbed = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            for &r in multipliers {
                let mut tokens = vec![n0; m];
                tokens[i] *= r;
                perturbed.push(PerturbedRun {
                    domain: name.clone(),
                    multiplier: r,
                    perplexities: noisy(&tokens),
                    line: 0,
                });
            }
        }
        DdoRuns {
            eval_domains: self.names.clone(),
            base,
            perturbed,
        }
    }
}
