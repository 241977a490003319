//! The one way the engine knows stages: the [`StageKind`] trait, and a registry of kinds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

use crate::pipeline::FanoutChild;

/// The type a param must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Float,
    String,
    Bool,
    List,
    Map,
    /// Anything; the kind checks it itself.
    Any,
}

impl ParamType {
    pub fn name(self) -> &'static str {
        match self {
            ParamType::Int => "int",
            ParamType::Float => "float",
            ParamType::String => "string",
            ParamType::Bool => "bool",
            ParamType::List => "list",
            ParamType::Map => "map",
            ParamType::Any => "any",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "int" => ParamType::Int,
            "float" => ParamType::Float,
            "string" | "str" => ParamType::String,
            "bool" => ParamType::Bool,
            "list" => ParamType::List,
            "map" => ParamType::Map,
            "any" => ParamType::Any,
            _ => return None,
        })
    }

    pub const NAMES: [&'static str; 7] = ["int", "float", "string", "bool", "list", "map", "any"];

    /// The type a YAML value has on its own.
    pub fn of(value: &Value) -> Self {
        match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => ParamType::Int,
            Value::Number(_) => ParamType::Float,
            Value::String(_) => ParamType::String,
            Value::Bool(_) => ParamType::Bool,
            Value::Array(_) => ParamType::List,
            Value::Object(_) => ParamType::Map,
            Value::Null => ParamType::Any,
        }
    }

    /// Whether `value` fits; an int is a fine float.
    pub fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (ParamType::Any, _) => true,
            (ParamType::Float, Value::Number(_)) => true,
            (t, v) => t == ParamType::of(v),
        }
    }
}

/// One param a kind takes.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub required: bool,
    pub help: &'static str,
}

impl ParamSpec {
    pub const fn required(name: &'static str, ty: ParamType, help: &'static str) -> Self {
        Self {
            name,
            ty,
            required: true,
            help,
        }
    }

    pub const fn optional(name: &'static str, ty: ParamType, help: &'static str) -> Self {
        Self {
            name,
            ty,
            required: false,
            help,
        }
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{message}")]
    Failed {
        message: String,
        hint: Option<String>,
    },
    #[error("interrupted")]
    Cancelled,
}

impl autoscale_errors::Hint for StageError {
    fn hint(&self) -> Option<String> {
        match self {
            StageError::Failed { hint, .. } => hint.clone(),
            StageError::Cancelled => None,
        }
    }
}

impl StageError {
    pub fn failed(message: impl Into<String>) -> Self {
        StageError::Failed {
            message: message.into(),
            hint: None,
        }
    }
}

/// A stage's input as handed to its kind.
#[derive(Debug, Clone)]
pub enum InputPath {
    /// One path: a file, or an output directory.
    One(PathBuf),
    /// A fanned-out stage: one output directory per expanded child, by child id.
    Many(BTreeMap<String, PathBuf>),
}

/// Everything a kind gets to run one stage.
pub struct StageContext<'a> {
    pub stage_id: &'a str,
    pub params: &'a Map<String, Value>,
    pub inputs: &'a BTreeMap<String, InputPath>,
    /// Where the stage writes its outputs; only this directory is cached.
    pub out_dir: PathBuf,
    /// Survives a killed run of the same key (checkpoints); removed once the stage commits.
    pub scratch_dir: PathBuf,
    /// The pipeline's workspace root, the working directory of commands.
    pub work_dir: PathBuf,
    /// Everything the stage prints goes here; it is kept with the result.
    pub log_path: PathBuf,
    /// The CUDA devices this stage owns, or `None` to run on the CPU.
    pub devices: Option<Vec<crate::Device>>,
    /// The values of the env variables the stage declared.
    pub env: &'a BTreeMap<String, String>,
    pub cancel: &'a AtomicBool,
    pub progress: &'a (dyn Fn(Value) + Sync),
    /// Told the process group of each process the stage starts (see
    /// [`StageContext::started_group`]).
    pub on_group: &'a (dyn Fn(rustix::process::Pid) + Sync),
}

impl StageContext<'_> {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// A kind that starts a process group calls this at once: the engine records the group
    /// in the key's lock file, so that if this engine dies without taking the group along, the
    /// next run that takes the lock kills it before it stages anything.
    pub fn started_group(&self, pgid: rustix::process::Pid) {
        (self.on_group)(pgid);
    }
}

/// What a kind's results are made by, as its stage keys record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Implementation {
    /// Bumped whenever the kind's outputs for the same inputs may change.
    pub version: u32,
    /// The versions of the libraries that shape its results (`tokenizers 0.22.2`, libtorch),
    /// known without loading them; empty when none does.
    pub libraries: &'static str,
}

impl Implementation {
    /// What a key records beside the version: the libraries, if any.
    pub fn libraries(&self) -> Option<&'static str> {
        (!self.libraries.is_empty()).then_some(self.libraries)
    }
}

/// The class of device a stage runs on, as far as its results can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClass {
    Cpu,
    Cuda,
}

/// A kind of stage: `command`, `ddo`, `train`...
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// What makes the kind's results: part of every key of its stages, and of nothing else, so
    /// that a result is never served for code that would compute it differently while an edit
    /// of the engine or another kind leaves it cached. The built-in kinds take theirs from the
    /// committed table `stages/implementations.toml`.
    fn implementation(&self) -> Implementation;
    /// For a kind whose results depend on the class of device it runs on: what it computes
    /// with there (`cpu fp32`, `cuda bf16-matmul`). The key records it, so a result made on
    /// one class is never served for the other, a CPU fallback's included. A stage runs on
    /// `cuda` when it asks for GPUs and the run has them (or sends its stages to an executor
    /// that places GPU requests), else on `cpu`. `None` (the default): the key names no device.
    fn device_identity(&self, _class: DeviceClass) -> Option<&'static str> {
        None
    }
    fn summary(&self) -> &'static str;
    /// The params it takes.
    fn params(&self) -> &[ParamSpec];
    /// Whether params beyond [`StageKind::params`] are allowed (for templating, say).
    fn open_params(&self) -> bool {
        false
    }
    /// Checks the params together, beyond their types; an `Err` names what is wrong.
    fn check(&self, _params: &Map<String, Value>) -> Result<(), String> {
        Ok(())
    }
    /// For a kind whose `fanout.json` is a function of its params alone (`ddo_plan`): the
    /// children it will list, so that `status` and `dag` show a run-time fan-out before its
    /// source has run. `None` (the default): known only once it has run.
    fn planned_fanout(
        &self,
        _params: &Map<String, Value>,
    ) -> Option<Result<Vec<FanoutChild>, String>> {
        None
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError>;
}

/// The kinds a pipeline may use, by name.
#[derive(Clone, Default)]
pub struct KindRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl KindRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, kind: Arc<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + Clone + '_ {
        self.kinds.keys().copied()
    }
}
