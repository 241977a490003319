//! AutoScale mixture math (Kang et al., "AutoScale: Automatic Prediction of Compute-optimal
//! Data Compositions for Training LLMs", arXiv 2407.20177), usable without any training on
//! results users bring from their own trainers:
//!
//! - [`ddo`]: Direct Data Optimization at one scale — the proxy-run [`plan`], the CSV of
//!   results, per-domain fits of `(x + a)^(-b) + c` and the exact KKT solve for the weights;
//! - [`predict`]: the AutoScale extrapolation of optimal compositions to larger scales;
//! - a parametric bootstrap of both, from the noise measured on replicated base runs;
//! - [`baselines`]: uniform, natural, LLaMA/RedPajama, UniMax, temperature and explicit weights.
//!
//! Nothing here prints: results are serde values, with `render_table` methods for humans.

pub mod baselines;
mod bootstrap;
mod ddo;
mod error;
mod fit;
mod predict;
mod table;
#[cfg(test)]
mod testkit;
mod types;

pub use bootstrap::BootstrapOptions;
pub use ddo::{
    CurvePoint, DdoEvidence, DdoOptions, DdoReport, DdoRuns, DomainResult, FlatPolicy,
    MultiplierSolution, Noise, Objective, PerturbedRun, PlanOptions, PlannedRun, Replicate, ddo,
    ddo_from_csv, ddo_from_csv_path, parse_ddo_csv, plan, render_plan_table, solve_multipliers,
};
pub use error::MixError;
pub use fit::{CurveFit, PowerCurve, fit_power_curve};
pub use predict::{
    FittedScale, PredictedDomain, Prediction, ScaleComposition, Target, parse_scale_spec, predict,
    predict_with_bootstrap,
};
pub use types::{MixtureWeights, TokenQuantities};
