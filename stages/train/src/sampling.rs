//! Mixture sampling: from per-domain token quantities to the exact sequence of training
//! windows, drawn deterministically from a seed.
//!
//! Semantics, in order:
//!
//! 1. **Quantities.** A run asks for `tokens: {domain: n}` (DDO's runs: "domain i's quantity
//!    times r, the others unchanged", so the total changes), or `weights` plus `total_tokens`
//!    (weights are normalised; quantity = weight × total).
//! 2. **Selection.** Domain d gets `s_d = round(q_d / seq_len)` windows of `seq_len + 1` tokens
//!    (each trains `seq_len` next-token targets; at least one when `q_d > 0`). A domain's
//!    training stream is cut into windows at stride `seq_len`; the selection walks fresh seeded
//!    permutations of them, so a domain asked for more than it holds repeats (whole passes,
//!    then a partial one), and never repeats a window before every window has been drawn.
//! 3. **Passes.** The run trains `epochs` passes over the selection (the reference
//!    implementation trains 3 over its selected data), each pass in a new seeded order that
//!    interleaves all domains.
//!
//! **Budget.** Every trained token counts, repeats included: a run trains
//! `epochs × Σ_d s_d × seq_len` tokens. `epochs` in the report is how many times each domain's
//! unique training tokens were seen: `epochs × s_d / windows_d` (above 1: the domain repeated).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::TrainError;
use crate::rng::SplitMix64;

/// What a run asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum MixtureRequest {
    /// Training tokens per domain for one pass.
    Tokens(BTreeMap<String, f64>),
    /// Weights (normalised here) of a total.
    Weights {
        weights: BTreeMap<String, f64>,
        total_tokens: f64,
    },
}

impl MixtureRequest {
    /// Tokens per domain for one pass. Domains asked for zero tokens are dropped.
    pub fn quantities(&self) -> Result<BTreeMap<String, f64>, TrainError> {
        let out: BTreeMap<String, f64> = match self {
            MixtureRequest::Tokens(tokens) => {
                for (d, &n) in tokens {
                    if !n.is_finite() || n < 0.0 {
                        return Err(TrainError::param(
                            "tokens",
                            format!("domain `{d}` asks for {n} tokens; give a count of at least 0"),
                        ));
                    }
                }
                tokens.clone()
            }
            MixtureRequest::Weights {
                weights,
                total_tokens,
            } => {
                if !total_tokens.is_finite() || *total_tokens <= 0.0 {
                    return Err(TrainError::param(
                        "total_tokens",
                        format!("{total_tokens} is not a positive number of tokens"),
                    ));
                }
                for (d, &w) in weights {
                    if !w.is_finite() || w < 0.0 {
                        return Err(TrainError::param(
                            "weights",
                            format!("domain `{d}` has weight {w}; weights are at least 0"),
                        ));
                    }
                }
                let sum: f64 = weights.values().sum();
                if sum <= 0.0 {
                    return Err(TrainError::param("weights", "the weights sum to 0"));
                }
                weights
                    .iter()
                    .map(|(d, w)| (d.clone(), w / sum * total_tokens))
                    .collect()
            }
        };
        let out: BTreeMap<String, f64> = out.into_iter().filter(|(_, n)| *n > 0.0).collect();
        if out.is_empty() {
            return Err(TrainError::param_hint(
                "tokens",
                "the mixture asks for no tokens at all",
                "give `tokens: {domain: n}`, or `weights` and `total_tokens`",
            ));
        }
        Ok(out)
    }
}

/// One domain's share of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainDraw {
    pub domain: String,
    /// Tokens asked for, per pass.
    pub requested_tokens: f64,
    /// Windows drawn per pass.
    pub sequences: u64,
    /// Windows the domain's training data holds.
    pub windows: u64,
    /// Tokens trained over the whole run, repeats included.
    pub trained_tokens: u64,
    /// How many times the domain's training data is seen over the whole run.
    pub epochs: f64,
}

/// Which window a training sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// Index into [`SequencePlan::domains`].
    pub domain: u32,
    pub window: u32,
}

/// Every training sequence of a run, in order.
#[derive(Debug, Clone)]
pub struct SequencePlan {
    pub seq_len: u64,
    pub passes: u32,
    pub domains: Vec<DomainDraw>,
    order: Vec<Draw>,
}

impl SequencePlan {
    /// `windows`: how many training windows of `seq_len + 1` tokens each domain holds.
    pub fn new(
        quantities: &BTreeMap<String, f64>,
        windows: &BTreeMap<String, u64>,
        seq_len: u64,
        passes: u32,
        seed: u64,
    ) -> Result<Self, TrainError> {
        if passes == 0 {
            return Err(TrainError::param("epochs", "must be at least 1"));
        }
        let mut domains = Vec::new();
        let mut selection: Vec<Draw> = Vec::new();
        for (i, (domain, &q)) in quantities.iter().enumerate() {
            let available =
                windows
                    .get(domain)
                    .copied()
                    .ok_or_else(|| TrainError::UnknownDomain {
                        domain: domain.clone(),
                        known: windows.keys().cloned().collect(),
                    })?;
            let sequences = ((q / seq_len as f64).round() as u64).max(1);
            if available == 0 {
                return Err(TrainError::param_hint(
                    "seq_len",
                    format!(
                        "domain `{domain}` has too little training text for one window of {} tokens",
                        seq_len + 1
                    ),
                    "lower `seq_len`, or leave the domain out of the mixture",
                ));
            }
            if available > u64::from(u32::MAX) {
                return Err(TrainError::param_hint(
                    "seq_len",
                    format!("domain `{domain}` holds {available} windows, more than 2^32"),
                    "split the domain in two",
                ));
            }
            let mut left = sequences;
            let mut pass = 0u64;
            while left > 0 {
                let mut perm: Vec<u32> = (0..available as u32).collect();
                SplitMix64::for_stream(seed, &[b"select", domain.as_bytes(), &pass.to_le_bytes()])
                    .shuffle(&mut perm);
                let take = left.min(available) as usize;
                selection.extend(perm[..take].iter().map(|&w| Draw {
                    domain: i as u32,
                    window: w,
                }));
                left -= take as u64;
                pass += 1;
            }
            domains.push(DomainDraw {
                domain: domain.clone(),
                requested_tokens: q,
                sequences,
                windows: available,
                trained_tokens: u64::from(passes) * sequences * seq_len,
                epochs: f64::from(passes) * sequences as f64 / available as f64,
            });
        }
        let mut order = Vec::with_capacity(selection.len() * passes as usize);
        for pass in 0..passes {
            let mut this = selection.clone();
            SplitMix64::for_stream(seed, &[b"order", &pass.to_le_bytes()]).shuffle(&mut this);
            order.extend(this);
        }
        Ok(Self {
            seq_len,
            passes,
            domains,
            order,
        })
    }

    /// Training sequences over the whole run.
    pub fn len(&self) -> u64 {
        self.order.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn get(&self, i: u64) -> Option<Draw> {
        self.order.get(i as usize).copied()
    }

    /// Tokens trained over the whole run.
    pub fn tokens(&self) -> u64 {
        self.len() * self.seq_len
    }

    /// Optimizer steps at `sequences_per_step`; the last one may be short.
    pub fn steps(&self, sequences_per_step: u64) -> u64 {
        self.len().div_ceil(sequences_per_step.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    fn map(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn windows(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn weights_and_totals_become_quantities() {
        let q = MixtureRequest::Weights {
            weights: map(&[("a", 1.0), ("b", 3.0), ("c", 0.0)]),
            total_tokens: 1000.0,
        }
        .quantities()
        .unwrap();
        assert_eq!(q, map(&[("a", 250.0), ("b", 750.0)]));
        let err = MixtureRequest::Weights {
            weights: map(&[("a", -1.0)]),
            total_tokens: 10.0,
        }
        .quantities()
        .unwrap_err();
        assert!(err.to_string().contains("weight -1"), "{err}");
        assert!(
            MixtureRequest::Tokens(map(&[("a", 0.0)]))
                .quantities()
                .is_err()
        );
    }

    #[test]
    fn ddo_perturbation_changes_one_domain_and_the_total() {
        // DDO: domain `b` times 3, the others unchanged.
        let w = windows(&[("a", 1000), ("b", 1000), ("c", 1000)]);
        let base = SequencePlan::new(
            &map(&[("a", 6400.0), ("b", 6400.0), ("c", 6400.0)]),
            &w,
            64,
            1,
            0,
        )
        .unwrap();
        let up = SequencePlan::new(
            &map(&[("a", 6400.0), ("b", 19200.0), ("c", 6400.0)]),
            &w,
            64,
            1,
            0,
        )
        .unwrap();
        assert_eq!(base.domains[1].sequences, 100);
        assert_eq!(up.domains[1].sequences, 300);
        assert_eq!(up.domains[0].sequences, base.domains[0].sequences);
        assert_eq!(up.tokens(), base.tokens() + 200 * 64);
    }

    #[test]
    fn a_small_domain_repeats_and_reports_its_epochs() {
        let w = windows(&[("big", 1000), ("small", 10)]);
        let plan =
            SequencePlan::new(&map(&[("big", 640.0), ("small", 25.0 * 8.0)]), &w, 8, 1, 3).unwrap();
        let small = &plan.domains[1];
        assert_eq!(small.sequences, 25);
        assert!((small.epochs - 2.5).abs() < 1e-12, "{}", small.epochs);
        // Every window is drawn twice before any is drawn a third time.
        let mut counts = [0u32; 10];
        for i in 0..plan.len() {
            let d = plan.get(i).unwrap();
            if d.domain == 1 {
                counts[d.window as usize] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c == 2 || c == 3), "{counts:?}");
        assert_eq!(counts.iter().sum::<u32>(), 25);
        assert!(plan.domains[0].epochs < 0.1);
    }

    #[test]
    fn passes_repeat_the_selection_and_count_as_budget() {
        let w = windows(&[("a", 50), ("b", 50)]);
        let q = map(&[("a", 80.0), ("b", 160.0)]);
        let one = SequencePlan::new(&q, &w, 8, 1, 0).unwrap();
        let three = SequencePlan::new(&q, &w, 8, 3, 0).unwrap();
        assert_eq!(three.len(), 3 * one.len());
        assert_eq!(three.domains[1].trained_tokens, 3 * 20 * 8);
        assert!((three.domains[0].epochs - 3.0 * 10.0 / 50.0).abs() < 1e-12);
        // Each pass holds the same windows, in a different order.
        let pass = |p: &SequencePlan, k: u64| -> Vec<Draw> {
            (k * one.len()..(k + 1) * one.len())
                .map(|i| p.get(i).unwrap())
                .collect()
        };
        let (p0, p1) = (pass(&three, 0), pass(&three, 1));
        assert_ne!(p0, p1);
        let key = |d: &Draw| (d.domain, d.window);
        let (mut s0, mut s1) = (p0.clone(), p1.clone());
        s0.sort_by_key(key);
        s1.sort_by_key(key);
        assert_eq!(s0, s1);
    }

    #[test]
    fn the_draw_is_a_function_of_the_seed() {
        let w = windows(&[("a", 100), ("b", 100)]);
        let q = map(&[("a", 400.0), ("b", 400.0)]);
        let x = SequencePlan::new(&q, &w, 8, 1, 5).unwrap();
        let y = SequencePlan::new(&q, &w, 8, 1, 5).unwrap();
        let z = SequencePlan::new(&q, &w, 8, 1, 6).unwrap();
        let all = |p: &SequencePlan| (0..p.len()).map(|i| p.get(i).unwrap()).collect::<Vec<_>>();
        assert_eq!(all(&x), all(&y));
        assert_ne!(all(&x), all(&z));
        assert_eq!(x.steps(16), 7);
    }

    #[test]
    fn missing_or_too_small_domains_are_errors() {
        let w = windows(&[("a", 0)]);
        let err = SequencePlan::new(&map(&[("a", 10.0)]), &w, 8, 1, 0).unwrap_err();
        assert!(err.hint().unwrap().contains("seq_len"), "{err}");
        let err = SequencePlan::new(&map(&[("zz", 10.0)]), &w, 8, 1, 0).unwrap_err();
        assert!(matches!(err, TrainError::UnknownDomain { .. }));
    }
}
