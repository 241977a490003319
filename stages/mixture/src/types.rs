//! The two quantities this crate must never confuse: mixture weights (fractions summing to 1)
//! and token quantities (absolute token counts per domain).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MixError;

/// Per-domain sampling weights: finite, non-negative, summing to 1.
///
/// Serialises as a plain `{"domain": weight}` map; deserialising validates and renormalises,
/// so a hand-written file summing to 0.999 is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, f64>", into = "BTreeMap<String, f64>")]
pub struct MixtureWeights(BTreeMap<String, f64>);

impl MixtureWeights {
    /// Validates non-negative finite values with a positive sum, then divides by the sum.
    pub fn normalized<S: Into<String>>(
        weights: impl IntoIterator<Item = (S, f64)>,
    ) -> Result<Self, MixError> {
        let map = collect_non_negative(weights, "mixture weights")?;
        let sum: f64 = map.values().sum();
        if !(sum > 0.0 && sum.is_finite()) {
            return Err(MixError::invalid(
                "mixture weights",
                "weights must have a positive, finite sum",
            ));
        }
        Ok(Self(map.into_iter().map(|(k, v)| (k, v / sum)).collect()))
    }

    /// Equal weight `1/m` for each of `m` domains.
    pub fn uniform<S: Into<String>>(
        domains: impl IntoIterator<Item = S>,
    ) -> Result<Self, MixError> {
        Self::normalized(domains.into_iter().map(|d| (d, 1.0)))
    }

    pub fn get(&self, domain: &str) -> Option<f64> {
        self.0.get(domain).copied()
    }

    /// Domains with their weights, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `N_i = w_i * total`.
    pub fn to_tokens(&self, total_tokens: f64) -> Result<TokenQuantities, MixError> {
        TokenQuantities::new(self.iter().map(|(k, w)| (k, w * total_tokens)))
    }

    /// A fixed-width `domain  weight` table.
    pub fn render_table(&self) -> String {
        let rows = self
            .iter()
            .map(|(d, w)| vec![d.to_owned(), format!("{w:.4}")])
            .collect::<Vec<_>>();
        crate::table::render(&["domain", "weight"], &rows)
    }
}

impl TryFrom<BTreeMap<String, f64>> for MixtureWeights {
    type Error = MixError;
    fn try_from(map: BTreeMap<String, f64>) -> Result<Self, MixError> {
        Self::normalized(map)
    }
}

impl From<MixtureWeights> for BTreeMap<String, f64> {
    fn from(w: MixtureWeights) -> Self {
        w.0
    }
}

/// Per-domain token counts (absolute, not fractions). Kept as `f64` because the AutoScale
/// algebra multiplies them by fractional powers; round only when handing them to a trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, f64>", into = "BTreeMap<String, f64>")]
pub struct TokenQuantities(BTreeMap<String, f64>);

impl TokenQuantities {
    /// Validates finite, non-negative counts.
    pub fn new<S: Into<String>>(
        tokens: impl IntoIterator<Item = (S, f64)>,
    ) -> Result<Self, MixError> {
        collect_non_negative(tokens, "token quantities").map(Self)
    }

    pub fn get(&self, domain: &str) -> Option<f64> {
        self.0.get(domain).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// `w_i = N_i / sum_j N_j`; fails when every count is zero.
    pub fn to_weights(&self) -> Result<MixtureWeights, MixError> {
        MixtureWeights::normalized(self.iter())
    }
}

impl TryFrom<BTreeMap<String, f64>> for TokenQuantities {
    type Error = MixError;
    fn try_from(map: BTreeMap<String, f64>) -> Result<Self, MixError> {
        Self::new(map)
    }
}

impl From<TokenQuantities> for BTreeMap<String, f64> {
    fn from(t: TokenQuantities) -> Self {
        t.0
    }
}

fn collect_non_negative<S: Into<String>>(
    values: impl IntoIterator<Item = (S, f64)>,
    what: &str,
) -> Result<BTreeMap<String, f64>, MixError> {
    let mut map = BTreeMap::new();
    for (name, value) in values {
        let name = name.into();
        if !(value.is_finite() && value >= 0.0) {
            return Err(MixError::invalid(
                what,
                format!("`{name}` is {value}; values must be finite and non-negative"),
            ));
        }
        if map.insert(name.clone(), value).is_some() {
            return Err(MixError::invalid(what, format!("`{name}` appears twice")));
        }
    }
    if map.is_empty() {
        return Err(MixError::invalid(what, "no domains given"));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_renormalise_and_reject_bad_values() {
        let w = MixtureWeights::normalized([("a", 1.0), ("b", 3.0)]).expect("valid");
        assert_eq!(w.get("a"), Some(0.25));
        assert_eq!(w.get("b"), Some(0.75));
        assert!(MixtureWeights::normalized([("a", -1.0), ("b", 3.0)]).is_err());
        assert!(MixtureWeights::normalized([("a", f64::NAN)]).is_err());
        assert!(MixtureWeights::normalized([("a", 0.0)]).is_err());
        assert!(MixtureWeights::normalized([("a", 1.0), ("a", 1.0)]).is_err());
    }

    #[test]
    fn weights_json_round_trip_is_a_plain_map() {
        let w: MixtureWeights = serde_json::from_str(r#"{"a": 2, "b": 2}"#).expect("valid json");
        assert_eq!(w.get("a"), Some(0.5));
        let back = serde_json::to_string(&w).expect("serialise");
        assert_eq!(back, r#"{"a":0.5,"b":0.5}"#);
        assert!(serde_json::from_str::<MixtureWeights>(r#"{"a": -2}"#).is_err());
    }

    #[test]
    fn tokens_and_weights_convert_both_ways() {
        let t = TokenQuantities::new([("a", 100.0), ("b", 300.0)]).expect("valid");
        assert_eq!(t.total(), 400.0);
        let w = t.to_weights().expect("positive");
        let back = w.to_tokens(400.0).expect("valid");
        assert_eq!(back, t);
    }
}
