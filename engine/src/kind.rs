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
    pub devices: Option<Vec<u32>>,
    /// The values of the env variables the stage declared.
    pub env: &'a BTreeMap<String, String>,
    pub cancel: &'a AtomicBool,
    pub progress: &'a (dyn Fn(Value) + Sync),
}

impl StageContext<'_> {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A kind of stage: `command`, `ddo`, `train`...
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's outputs for the same inputs change; part of every key.
    fn version(&self) -> u32;
    /// The identity of code outside this binary that makes the kind's results (the `train`
    /// kind's trainer binary and the libtorch it links), known without starting that code; part
    /// of every key when set, so a result is never served for a different implementation.
    fn implementation(&self) -> Option<&str> {
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
