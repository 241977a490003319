//! Baseline mixtures AutoScale is compared against: uniform, natural, LLaMA-1's RedPajama
//! weights, UniMax, temperature sampling and explicit user weights.

use std::collections::BTreeMap;

use crate::{MixError, MixtureWeights, TokenQuantities};

/// LLaMA-1's sampling proportions (Touvron et al. 2023, table 1) under RedPajama-1T subset names.
pub const LLAMA_REDPAJAMA_WEIGHTS: [(&str, f64); 7] = [
    ("common_crawl", 0.67),
    ("c4", 0.15),
    ("github", 0.045),
    ("wikipedia", 0.045),
    ("book", 0.045),
    ("arxiv", 0.025),
    ("stackexchange", 0.02),
];

/// `w_i = 1/m`.
pub fn uniform(domains: &[String]) -> Result<MixtureWeights, MixError> {
    MixtureWeights::uniform(domains.iter().cloned())
}

/// `w_i = N_i / sum_j N_j`: sample in proportion to the tokens available.
pub fn natural(available: &TokenQuantities) -> Result<MixtureWeights, MixError> {
    available.to_weights()
}

/// The RedPajama subset a domain name stands for, ignoring case and punctuation:
/// `CommonCrawl`, `common-crawl` and `cc` all give `common_crawl`; `books` gives `book`.
pub fn redpajama_domain(name: &str) -> Option<&'static str> {
    let key: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Some(match key.as_str() {
        "commoncrawl" | "cc" => "common_crawl",
        "c4" => "c4",
        "github" => "github",
        "wikipedia" | "wiki" => "wikipedia",
        "book" | "books" => "book",
        "arxiv" => "arxiv",
        "stackexchange" => "stackexchange",
        _ => return None,
    })
}

/// LLaMA-1's weights over `domains`. Each domain maps to a RedPajama subset through `mapping`
/// (your name -> RedPajama name), else by [`redpajama_domain`]. Domains sharing a subset split
/// its weight equally; subsets nobody maps to are dropped and the rest renormalised.
pub fn llama_redpajama(
    domains: &[String],
    mapping: &BTreeMap<String, String>,
) -> Result<MixtureWeights, MixError> {
    let known = || {
        LLAMA_REDPAJAMA_WEIGHTS
            .iter()
            .map(|(d, _)| *d)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(unused) = mapping.keys().find(|k| !domains.contains(k)) {
        return Err(MixError::UnknownDomain {
            domain: unused.clone(),
            context: "the RedPajama mapping".to_owned(),
            known: domains.join(", "),
        });
    }
    let mut subset_of = Vec::with_capacity(domains.len());
    for d in domains {
        let via = mapping.get(d).map_or(d.as_str(), String::as_str);
        let subset = redpajama_domain(via).ok_or_else(|| MixError::UnknownDomain {
            domain: via.to_owned(),
            context: "LLaMA's RedPajama weights (map it onto one of them)".to_owned(),
            known: known(),
        })?;
        subset_of.push(subset);
    }
    MixtureWeights::normalized(domains.iter().zip(&subset_of).map(|(d, subset)| {
        let share = subset_of.iter().filter(|s| *s == subset).count() as f64;
        let weight = LLAMA_REDPAJAMA_WEIGHTS
            .iter()
            .find(|(name, _)| name == subset)
            .map_or(0.0, |(_, w)| *w);
        (d.clone(), weight / share)
    }))
}

/// UniMax (Chung et al. 2023): spend `budget` tokens as uniformly as possible, but never more
/// than `max_epochs` passes over any domain. Domains are visited from the smallest; each gets
/// `min(remaining / domains_left, max_epochs * N_i)`, so what a small domain cannot absorb is
/// spread over the larger ones.
pub fn unimax(
    available: &TokenQuantities,
    budget: f64,
    max_epochs: f64,
) -> Result<MixtureWeights, MixError> {
    if !(budget.is_finite() && budget > 0.0) {
        return Err(MixError::invalid(
            "UniMax budget",
            format!("{budget}; must be positive"),
        ));
    }
    if !(max_epochs.is_finite() && max_epochs > 0.0) {
        return Err(MixError::invalid(
            "UniMax epoch cap",
            format!("{max_epochs}; must be positive"),
        ));
    }
    let capacity = available.total() * max_epochs;
    if capacity < budget * (1.0 - 1e-12) {
        return Err(MixError::invalid(
            "UniMax budget",
            format!(
                "{budget:e} tokens exceed {max_epochs} epoch(s) of all {:e} available; raise the cap or lower the budget",
                available.total()
            ),
        ));
    }
    let mut by_size: Vec<(&str, f64)> = available.iter().collect();
    by_size.sort_by(|p, q| p.1.total_cmp(&q.1));
    let mut remaining = budget;
    let count = by_size.len();
    let mut alloc = Vec::with_capacity(count);
    for (k, (d, n)) in by_size.into_iter().enumerate() {
        let take = (remaining / (count - k) as f64).min(max_epochs * n);
        remaining -= take;
        alloc.push((d, take));
    }
    MixtureWeights::normalized(alloc)
}

/// Temperature sampling: `w_i ∝ p_i^(1/T)` with `p` the natural proportions. `T = 1` is
/// natural; `T -> inf` tends to uniform over the domains with any data.
pub fn temperature(available: &TokenQuantities, t: f64) -> Result<MixtureWeights, MixError> {
    if t.is_nan() || t <= 0.0 {
        return Err(MixError::invalid(
            "temperature",
            format!("{t}; must be positive"),
        ));
    }
    let total = available.total();
    MixtureWeights::normalized(available.iter().map(|(d, n)| {
        // 0^0 is 1 in IEEE; a domain without data must stay at 0 even as T grows.
        let w = if n > 0.0 {
            (n / total).powf(1.0 / t)
        } else {
            0.0
        };
        (d, w)
    }))
}

/// User weights over `domains`: non-negative, renormalised; domains left out get 0 and names
/// outside `domains` are rejected.
pub fn explicit(
    domains: &[String],
    weights: &BTreeMap<String, f64>,
) -> Result<MixtureWeights, MixError> {
    if let Some(unknown) = weights.keys().find(|k| !domains.contains(k)) {
        return Err(MixError::UnknownDomain {
            domain: unknown.clone(),
            context: "explicit weights".to_owned(),
            known: domains.join(", "),
        });
    }
    MixtureWeights::normalized(
        domains
            .iter()
            .map(|d| (d.clone(), weights.get(d).copied().unwrap_or(0.0))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn available() -> TokenQuantities {
        TokenQuantities::new([("a", 1e6), ("b", 1e7), ("c", 1e9), ("d", 4e9)]).expect("valid")
    }

    fn sum(w: &MixtureWeights) -> f64 {
        w.iter().map(|(_, x)| x).sum()
    }

    #[test]
    fn every_baseline_sums_to_one() {
        let doms = names(&["a", "b", "c", "d"]);
        let all = [
            uniform(&doms).expect("uniform"),
            natural(&available()).expect("natural"),
            unimax(&available(), 2e9, 4.0).expect("unimax"),
            temperature(&available(), 3.0).expect("temperature"),
            explicit(
                &doms,
                &BTreeMap::from([("a".to_owned(), 2.0), ("c".to_owned(), 6.0)]),
            )
            .expect("explicit"),
            llama_redpajama(
                &names(&["CommonCrawl", "Books", "github"]),
                &BTreeMap::new(),
            )
            .expect("llama"),
        ];
        for w in &all {
            assert!((sum(w) - 1.0).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(all[4].get("a"), Some(0.25));
        assert_eq!(all[4].get("b"), Some(0.0));
    }

    #[test]
    fn unimax_caps_epochs_and_redistributes() {
        let (budget, cap) = (2e9, 4.0);
        let w = unimax(&available(), budget, cap).expect("feasible");
        for (d, n) in available().iter() {
            let epochs = w.get(d).expect("present") * budget / n;
            assert!(epochs <= cap * (1.0 + 1e-12), "{d}: {epochs} epochs");
        }
        // a and b hit the cap; c and d split the rest equally (c holds 1e9, cap 4e9 > share).
        assert!((w.get("a").expect("a") * budget - 4e6).abs() < 1.0);
        assert!((w.get("b").expect("b") * budget - 4e7).abs() < 1.0);
        assert!((w.get("c").expect("c") - w.get("d").expect("d")).abs() < 1e-12);
        assert!(unimax(&available(), 1e11, 4.0).is_err());
    }

    #[test]
    fn temperature_interpolates_natural_to_uniform() {
        let nat = natural(&available()).expect("natural");
        let t1 = temperature(&available(), 1.0).expect("t=1");
        for (d, w) in nat.iter() {
            assert!((t1.get(d).expect("present") - w).abs() < 1e-12);
        }
        let hot = temperature(&available(), 1e6).expect("hot");
        for (_, w) in hot.iter() {
            assert!((w - 0.25).abs() < 1e-4, "{hot:?}");
        }
        let inf = temperature(&available(), f64::INFINITY).expect("inf");
        assert!(inf.iter().all(|(_, w)| (w - 0.25).abs() < 1e-12));
        assert!(temperature(&available(), 0.0).is_err());
        assert!(temperature(&available(), f64::NAN).is_err());
    }

    #[test]
    fn llama_weights_follow_the_paper_and_the_mapping() {
        let all: Vec<String> = LLAMA_REDPAJAMA_WEIGHTS
            .iter()
            .map(|(d, _)| (*d).to_owned())
            .collect();
        let w = llama_redpajama(&all, &BTreeMap::new()).expect("all subsets");
        assert!((w.get("common_crawl").expect("cc") - 0.67).abs() < 1e-12);
        assert!((w.get("stackexchange").expect("se") - 0.02).abs() < 1e-12);

        let mine = names(&["web", "code"]);
        let mapping = BTreeMap::from([
            ("web".to_owned(), "common_crawl".to_owned()),
            ("code".to_owned(), "GitHub".to_owned()),
        ]);
        let w = llama_redpajama(&mine, &mapping).expect("mapped");
        assert!((w.get("web").expect("web") - 0.67 / 0.715).abs() < 1e-12);

        let err = llama_redpajama(&names(&["web"]), &BTreeMap::new()).expect_err("unmapped");
        assert!(err.to_string().contains("`web`") && err.to_string().contains("common_crawl"));
    }

    #[test]
    fn explicit_rejects_unknown_and_negative() {
        let doms = names(&["a", "b"]);
        let err = explicit(&doms, &BTreeMap::from([("z".to_owned(), 1.0)])).expect_err("unknown");
        assert!(err.to_string().contains("`z`"), "{err}");
        assert!(explicit(&doms, &BTreeMap::from([("a".to_owned(), -1.0)])).is_err());
        assert!(explicit(&doms, &BTreeMap::new()).is_err());
    }
}
