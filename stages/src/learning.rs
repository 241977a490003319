//! Did the proxy runs learn? DDO fits how the loss responds to each domain's data; before a run
//! has learned more than token frequencies, that response is noise. The check compares the
//! base runs' held-out loss per domain with the domain's unigram entropy (the loss of a model
//! that knows only token frequencies, counted by the `shard` kind on the domain's own training
//! tokens). The `ddo` kind writes the result as `learning.json`; the report shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::ShardManifest;

/// How far below the mean unigram entropy the base runs' mean held-out loss must be, in nats,
/// for the proxies to count as having learned.
pub const REQUIRED_MARGIN: f64 = 0.5;

/// `learning.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Learning {
    /// Mean over the domains below of the base runs' held-out loss (nats per token).
    pub base_mean_loss: f64,
    /// Mean over the same domains of their unigram entropy (nats).
    pub unigram_mean: f64,
    /// `unigram_mean - base_mean_loss`.
    pub margin: f64,
    pub required: f64,
    pub learned: bool,
    /// Per domain: the base runs' mean loss and the domain's unigram entropy.
    pub domains: BTreeMap<String, LearningDomain>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearningDomain {
    pub loss: f64,
    pub unigram: f64,
}

impl Learning {
    /// `base_ppl`: each base replicate's validation perplexity by domain. Domains without a
    /// unigram entropy in the manifest (evaluation-only, or an old manifest) are left out;
    /// `None` when no domain remains.
    pub fn check(base_ppl: &[BTreeMap<String, f64>], manifest: &ShardManifest) -> Option<Self> {
        let mut domains = BTreeMap::new();
        for (domain, splits) in &manifest.domains {
            let Some(unigram) = splits.get("train").and_then(|s| s.unigram_entropy) else {
                continue;
            };
            let losses: Vec<f64> = base_ppl
                .iter()
                .filter_map(|run| run.get(domain).map(|p| p.ln()))
                .collect();
            if losses.is_empty() {
                continue;
            }
            let loss = losses.iter().sum::<f64>() / losses.len() as f64;
            domains.insert(domain.clone(), LearningDomain { loss, unigram });
        }
        if domains.is_empty() {
            return None;
        }
        let n = domains.len() as f64;
        let base_mean_loss = domains.values().map(|d| d.loss).sum::<f64>() / n;
        let unigram_mean = domains.values().map(|d| d.unigram).sum::<f64>() / n;
        let margin = unigram_mean - base_mean_loss;
        Some(Self {
            base_mean_loss,
            unigram_mean,
            margin,
            required: REQUIRED_MARGIN,
            learned: margin >= REQUIRED_MARGIN,
            domains,
        })
    }

    /// The loud warning when the proxies have not learned; `None` when they have.
    pub fn warning(&self) -> Option<String> {
        (!self.learned).then(|| {
            format!(
                "the base runs have not learned enough for DDO to mean much: their mean held-out loss {:.3} is {:.3} nats below the mean unigram entropy {:.3} of the domains (needs at least {}); train the proxies on more tokens or with more optimizer steps",
                self.base_mean_loss, self.margin, self.unigram_mean, self.required
            )
        })
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "base runs' mean held-out loss {:.3} nats, {:.3} below the mean unigram entropy {:.3} ({})",
            self.base_mean_loss,
            self.margin,
            self.unigram_mean,
            if self.learned {
                "learned".to_owned()
            } else {
                format!("NOT learned: needs at least {}", self.required)
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitStats;

    fn manifest(entropies: &[(&str, f64)]) -> ShardManifest {
        ShardManifest {
            format: "arrow-ipc-stream".into(),
            compression: "none".into(),
            column: "token".into(),
            dtype: "uint16".into(),
            shard_tokens: 1,
            eot: "<|endoftext|>".into(),
            eot_id: 0,
            vocab_size: 2,
            tokenizer_blake3: String::new(),
            domains: entropies
                .iter()
                .map(|(d, h)| {
                    let stats = SplitStats {
                        unigram_entropy: Some(*h),
                        ..SplitStats::default()
                    };
                    (
                        (*d).to_owned(),
                        BTreeMap::from([("train".to_owned(), stats)]),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_margin_is_the_mean_entropy_minus_the_mean_base_loss_over_replicates() {
        let m = manifest(&[("a", 6.0), ("b", 5.0)]);
        let run =
            |a: f64, b: f64| BTreeMap::from([("a".to_owned(), a.exp()), ("b".to_owned(), b.exp())]);
        // Replicates average per domain: a = 5.0, b = 4.0; mean loss 4.5, mean entropy 5.5.
        let learning = Learning::check(&[run(4.8, 4.1), run(5.2, 3.9)], &m).expect("check");
        assert!((learning.base_mean_loss - 4.5).abs() < 1e-12);
        assert!((learning.margin - 1.0).abs() < 1e-12);
        assert!(learning.learned && learning.warning().is_none());
        let unlearned = Learning::check(&[run(5.9, 4.9)], &m).expect("check");
        assert!(!unlearned.learned);
        assert!(
            unlearned
                .warning()
                .expect("warning")
                .contains("not learned")
        );
        // A manifest without entropies (made before they were recorded): no check.
        let mut old = m.clone();
        for splits in old.domains.values_mut() {
            splits.get_mut("train").expect("train").unigram_entropy = None;
        }
        assert!(Learning::check(&[run(5.0, 4.0)], &old).is_none());
    }
}
