//! The autoscale engine: a YAML pipeline becomes a DAG of stages whose results are cached under
//! content-addressed keys, and only stages whose key is not cached run.
//!
//! The engine knows stages only through the [`StageKind`] trait; the `autoscale-stages` crate
//! provides the built-in kinds. It never prints: it returns values and emits [`Event`]s.

pub mod devices;
pub mod error;
pub mod files;
pub mod graph;
pub mod key;
pub mod kind;
pub mod pipeline;
pub mod process;
pub mod run;
pub mod stamp;

pub use devices::GpuSpec;
pub use error::{ConfigError, ConfigErrors, EngineError, SourceLoc};
pub use key::{CACHE_SCHEMA, KeyRecord};
pub use kind::{
    InputPath, KindRegistry, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
pub use pipeline::{FanoutChild, InputRef, Overrides, Pipeline, Resources, Stage};
pub use run::{
    Engine, Event, Explanation, Outcome, RunOptions, RunSummary, StageState, StageStatus,
    error_text,
};
