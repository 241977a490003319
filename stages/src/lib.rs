//! The built-in stage kinds. Each implements the engine's [`StageKind`] trait; none of them
//! schedules or caches anything: that is the engine's job.

mod command;
mod data;
mod font;
#[cfg(test)]
mod kind_harness;
mod learning;
mod mixture_kinds;
mod report;

use std::sync::Arc;

use autoscale_engine::KindRegistry;
#[allow(unused_imports)]
use autoscale_engine::StageKind;

pub use command::CommandKind;
pub use data::{
    DataError, DownloadKind, ENDOFTEXT, PrepareKind, ShardKind, ShardManifest, SplitStats,
    TokenizerKind,
};
pub use font::FontError;
pub use learning::{Learning, LearningDomain};
pub use mixture_kinds::{
    BaselineError, BaselineMethod, BaselineRequest, DdoKind, DdoPlanFile, DdoPlanKind, MixtureKind,
    PredictKind, baseline_weights,
};
pub use report::{ReportError, ReportKind};

/// Every built-in kind, ready to hand to the engine.
pub fn builtin_kinds() -> KindRegistry {
    let mut kinds = KindRegistry::new();
    kinds.register(Arc::new(CommandKind));
    kinds.register(Arc::new(DownloadKind));
    kinds.register(Arc::new(PrepareKind));
    kinds.register(Arc::new(TokenizerKind));
    kinds.register(Arc::new(ShardKind));
    kinds.register(Arc::new(DdoPlanKind));
    kinds.register(Arc::new(DdoKind));
    kinds.register(Arc::new(PredictKind));
    kinds.register(Arc::new(MixtureKind));
    kinds.register(Arc::new(ReportKind));
    kinds
}
