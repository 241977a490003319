//! The pipeline file as written, with the YAML location of everything an error may point at.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipeline {
    pub name: Spanned<String>,
    /// The workspace root, relative to the pipeline file's directory.
    #[serde(default)]
    pub root: Option<Spanned<String>>,
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
    /// Env variables every stage's key depends on.
    #[serde(default)]
    pub env: Vec<Spanned<String>>,
    /// Files or folders outside the workspace root that `file:` inputs may read (relative to
    /// the root, or absolute). Without them, an input outside the root is refused.
    #[serde(default)]
    pub external: Vec<Spanned<String>>,
    /// YAML anchors to reuse in stages (`<<: *name`); ignored otherwise.
    #[serde(default)]
    #[allow(dead_code)]
    pub templates: Option<serde::de::IgnoredAny>,
    pub stages: Vec<RawStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    pub id: Spanned<String>,
    pub kind: Spanned<String>,
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    pub inputs: BTreeMap<String, Spanned<String>>,
    /// Shorthand for the `command` kind's `cmd` param.
    #[serde(default)]
    pub cmd: Option<Spanned<String>>,
    /// Shorthand for the `command` kind's `outputs` param.
    #[serde(default)]
    pub outputs: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub resources: Option<RawResources>,
    #[serde(default)]
    pub retries: Option<Spanned<u32>>,
    #[serde(default)]
    pub env: Vec<Spanned<String>>,
    /// One stage per combination of the axes' values.
    #[serde(default)]
    pub matrix: Option<Spanned<BTreeMap<String, Vec<Value>>>>,
    /// One stage per item; `${item}` is the item.
    #[serde(default)]
    pub foreach: Option<Spanned<Vec<Value>>>,
    /// Run-time fan-out: one stage per child listed in this stage's `fanout.json`.
    #[serde(default)]
    pub fanout: Option<Spanned<String>>,
    /// Settings for `--executor slurm` over autoscale.toml's `[slurm]`; not part of the key.
    #[serde(default)]
    pub slurm: Option<crate::pipeline::SlurmSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResources {
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Megabytes, or a string such as `2GiB`.
    #[serde(default)]
    pub memory: Option<Spanned<Value>>,
    /// Fail instead of falling back to the CPU when no GPU is free.
    #[serde(default)]
    pub require_gpu: Option<bool>,
}

/// A second YAML file layered over the pipeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverlay {
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    pub stages: BTreeMap<String, RawStageOverlay>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStageOverlay {
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
}
