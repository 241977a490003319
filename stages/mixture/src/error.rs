//! The one error type of the crate: every variant names the input it concerns (CSV line,
//! column, domain, option) so a person can fix it without reading the source.

use autoscale_errors::Hint;
use std::path::PathBuf;

/// Everything that can go wrong in mixture math. `hint()` adds a suggested fix where one exists.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    #[error("cannot read `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed CSV{}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Csv {
        line: Option<u64>,
        #[source]
        source: csv::Error,
    },
    #[error("CSV is missing the `{column}` column (found: {found})")]
    MissingColumn { column: &'static str, found: String },
    #[error("CSV line {line}, column `{column}`: `{value}` {reason}")]
    BadValue {
        line: u64,
        column: String,
        value: String,
        reason: String,
    },
    #[error("CSV has no base run (a row with an empty `perturbed` and multiplier 1)")]
    MissingBaseRow,
    #[error("CSV line {line}: unknown perturbed domain `{domain}` (evaluation domains: {known})")]
    UnknownPerturbedDomain {
        line: u64,
        domain: String,
        known: String,
    },
    #[error("CSV line {line} repeats the run on line {first_line} ({run})")]
    DuplicateRow {
        line: u64,
        first_line: u64,
        run: String,
    },
    #[error("domain `{domain}` has {found} perturbed run(s); DDO fits need at least 2 multipliers")]
    TooFewMultipliers { domain: String, found: usize },
    #[error("domain `{domain}`: the objective does not decrease with more data ({detail})")]
    NotDecreasing { domain: String, detail: String },
    #[error("domain `{domain}`: cannot fit (x + a)^(-b) + c: {reason}")]
    FitFailed { domain: String, reason: String },
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: String, reason: String },
    #[error("unknown domain `{domain}` in {context} (known: {known})")]
    UnknownDomain {
        domain: String,
        context: String,
        known: String,
    },
    #[error("domains differ between {left} and {right}: {detail}")]
    DomainMismatch {
        left: String,
        right: String,
        detail: String,
    },
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("cannot parse mixture JSON from {origin}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Hint for MixError {
    /// A suggested fix, for the renderer's `hint:` line; `None` where the message says it all.
    fn hint(&self) -> Option<String> {
        let hint = match self {
            Self::MissingColumn { .. } => {
                "the header must be `perturbed,multiplier,<domain>,...` with one perplexity column per evaluation domain"
            }
            Self::BadValue { .. } => {
                "perplexities and multipliers must be finite positive numbers such as `12.5`"
            }
            Self::MissingBaseRow => {
                "add the base run as a row like `,1,<ppl>,<ppl>,...` (empty `perturbed`)"
            }
            Self::UnknownPerturbedDomain { .. } => {
                "`perturbed` must name one of the perplexity columns; add a column for the domain or fix its spelling"
            }
            Self::DuplicateRow { .. } => "keep one row per (perturbed, multiplier) pair",
            Self::TooFewMultipliers { .. } => {
                "train the domain at two multipliers besides the base, e.g. x0.2 and x3 (`autoscale mix plan`)"
            }
            Self::NotDecreasing { .. } => {
                "check that the runs for this domain are labelled with the right multipliers; if the domain truly does not help, drop it from the mixture"
            }
            Self::DomainMismatch { .. } => "every composition must name the same domains",
            Self::Unreachable { .. } => "choose a larger target or extrapolate by steps instead",
            _ => return None,
        };
        Some(hint.to_owned())
    }
}

impl MixError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
