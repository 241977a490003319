//! The autoscale engine: a YAML pipeline becomes a DAG of stages whose results are cached under
//! content-addressed keys, and only stages whose key is not cached run.
//!
//! The engine knows stages only through the [`StageKind`] trait; the `autoscale-stages` crate
//! provides the built-in kinds. It never prints: it returns values and emits [`Event`]s.

pub mod devices;
pub mod error;
pub mod executor;
pub mod files;
pub mod graph;
pub mod key;
pub mod kind;
mod local;
pub use local::log_tail;
pub mod pipeline;
pub mod plan;
pub mod process;
pub mod run;
mod scheduler;
pub mod stamp;

pub use devices::{Device, GpuSpec};
pub use error::{ConfigError, ConfigErrors, EngineError, SourceLoc};
pub use executor::{Executor, ExecutorFailure, Submission};
pub use key::{CACHE_SCHEMA, KeyRecord};
pub use kind::{
    DeviceClass, Implementation, InputPath, KindRegistry, ParamSpec, ParamType, StageContext,
    StageError, StageKind,
};
pub use pipeline::{FanoutChild, InputRef, Overrides, Pipeline, Resources, SlurmSettings, Stage};
pub use plan::{Explanation, StageState, StageStatus};
pub use run::{Engine, Event, Outcome, RunOptions, RunSummary};
