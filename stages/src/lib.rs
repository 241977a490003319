//! The built-in stage kinds. Each implements the engine's [`StageKind`] trait; none of them
//! schedules or caches anything: that is the engine's job.

mod command;

use std::sync::Arc;

use autoscale_engine::KindRegistry;
#[allow(unused_imports)]
use autoscale_engine::StageKind;

pub use command::CommandKind;

/// Every built-in kind, ready to hand to the engine.
pub fn builtin_kinds() -> KindRegistry {
    let mut kinds = KindRegistry::new();
    kinds.register(Arc::new(CommandKind));
    kinds
}
