//! Pipeline files: parsing, overrides (`--set`, overlay files), fan-out, interpolation and
//! validation. Everything is checked before anything runs, and every error carries its location.

mod raw;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use serde_saphyr::{Location, Spanned};

use crate::error::{ConfigError, ConfigErrors, SourceLoc, did_you_mean, known_list, suggest};
use crate::kind::{KindRegistry, ParamType};
use raw::{RawOverlay, RawPipeline, RawStage};

/// A validated pipeline with its fan-out expanded and every param resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// The workspace: file inputs are relative to it, and commands run in it.
    pub root: PathBuf,
    pub params: BTreeMap<String, Param>,
    /// In file order, each fan-out expanded in place.
    pub stages: Vec<Stage>,
    index: HashMap<String, usize>,
    /// Fan-out groups: the template's id and the ids of its expansions.
    groups: BTreeMap<String, Vec<usize>>,
}

/// A top-level param.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub ty: ParamType,
    pub value: Value,
    pub help: Option<String>,
}

/// One (expanded) stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub id: String,
    /// The id as written, before fan-out.
    pub template: String,
    pub kind: String,
    pub params: Map<String, Value>,
    pub inputs: BTreeMap<String, InputRef>,
    pub resources: Resources,
    pub retries: u32,
    /// Declared env variables and their values now; part of the key.
    pub env: BTreeMap<String, String>,
    pub location: SourceLoc,
    /// The fan-out this stage belongs to (its template id), if any.
    pub group: Option<String>,
    /// A run-time fan-out placeholder: its children come from this stage's `fanout.json`.
    pub fanout_from: Option<String>,
    /// Where this stage's Slurm job goes, over autoscale.toml's `[slurm]`; not in the key
    /// (where a result was computed does not change it).
    pub slurm: Option<SlurmSettings>,
}

/// A stage's `slurm:` block: the `sbatch` settings it overrides for `--executor slurm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time`, e.g. `4:00:00`.
    pub time: Option<String>,
    /// More `sbatch` arguments, after the config's `extra`.
    #[serde(default)]
    pub extra: Vec<String>,
}

/// One child of a run-time fan-out, as a stage lists it in its `fanout.json`:
/// `{"children": [{"id": "base", "params": {...}}, ...]}`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutChild {
    pub id: String,
    #[serde(default)]
    pub params: Map<String, Value>,
}

/// The most `retries:` a stage may ask for.
pub const MAX_RETRIES: u32 = 100;
/// The most stages one fan-out (`matrix`, `foreach` or a run-time `fanout.json`) may expand to.
pub const MAX_FANOUT: usize = 10_000;
/// The most stages a pipeline may have once expanded.
pub const MAX_STAGES: usize = 100_000;
/// The largest pipeline or overlay file read; a bigger one is a mistake (`/dev/zero`, a data
/// file named by accident), not a pipeline.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// The file a stage writes to fan out the stages that name it in `fanout:`.
pub const FANOUT_FILE: &str = "fanout.json";

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutList {
    pub children: Vec<FanoutChild>,
}

/// Where a stage input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputRef {
    /// Another stage's output, or a path inside it.
    Stage { id: String, path: String },
    /// Every expansion of a fanned-out stage.
    Group { template: String, ids: Vec<String> },
    /// A file or directory of the workspace.
    File(PathBuf),
}

impl InputRef {
    pub fn stage_ids(&self) -> Vec<&str> {
        match self {
            InputRef::Stage { id, .. } => vec![id.as_str()],
            InputRef::Group { ids, .. } => ids.iter().map(String::as_str).collect(),
            InputRef::File(_) => Vec::new(),
        }
    }
}

/// What a stage needs while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpus: u32,
    pub gpus: u32,
    pub memory_mb: Option<u64>,
    pub require_gpu: bool,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1,
            gpus: 0,
            memory_mb: None,
            require_gpu: false,
        }
    }
}

/// Ways to change a pipeline without editing it.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// YAML files layered over the pipeline, in order.
    pub overlays: Vec<PathBuf>,
    /// `name=value` for a pipeline param, `stage.name=value` for a stage param.
    pub sets: Vec<String>,
}

impl Pipeline {
    /// Reads, overrides, expands and validates a pipeline file.
    pub fn load(
        file: &Path,
        overrides: &Overrides,
        kinds: &KindRegistry,
    ) -> Result<Self, ConfigErrors> {
        let text = read_yaml_file(file, "pipeline")
            .map_err(|e| e.or_hint("check the path; pipelines live in `pipelines/`"))?;
        Self::parse(file, &text, overrides, kinds)
    }

    /// As [`Pipeline::load`], from text already read.
    pub fn parse(
        file: &Path,
        text: &str,
        overrides: &Overrides,
        kinds: &KindRegistry,
    ) -> Result<Self, ConfigErrors> {
        let raw: RawPipeline = serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| yaml_error(file, &e))?;
        Loader {
            file,
            kinds,
            errors: Vec::new(),
        }
        .build(raw, overrides)
    }

    pub fn stage(&self, id: &str) -> Option<&Stage> {
        self.index.get(id).map(|&i| &self.stages[i])
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The fan-out groups: template id and its expansions' indices.
    pub fn groups(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.groups
    }

    /// Indices of the stages `i` reads from.
    pub fn dependencies(&self, i: usize) -> Vec<usize> {
        let stage = &self.stages[i];
        let mut deps: Vec<usize> = stage
            .inputs
            .values()
            .flat_map(InputRef::stage_ids)
            .chain(stage.fanout_from.as_deref())
            .filter_map(|id| self.position(id))
            .collect();
        deps.sort_unstable();
        deps.dedup();
        deps
    }

    /// The closest stage id to `id`, for an error's hint.
    pub fn suggest_stage(&self, id: &str) -> Option<String> {
        did_you_mean(id, self.stages.iter().map(|s| s.id.as_str()))
    }

    /// Only the `targets` and every stage they need, transitively: `autoscale run FILE shard`.
    /// A fanned-out stage's id (its template) names all of its children. An unknown target is
    /// an [`EngineError::UnknownStage`](crate::EngineError::UnknownStage) with a "did you mean".
    pub fn select(&self, targets: &[String]) -> Result<Pipeline, crate::EngineError> {
        if targets.is_empty() {
            return Ok(self.clone());
        }
        let mut wanted = vec![false; self.stages.len()];
        let mut todo = Vec::new();
        for target in targets {
            let found: Vec<usize> = match (self.position(target), self.groups.get(target)) {
                (Some(i), _) => vec![i],
                (None, Some(members)) => members.clone(),
                (None, None) => {
                    let known = self
                        .stages
                        .iter()
                        .map(|s| s.id.as_str())
                        .chain(self.groups.keys().map(String::as_str));
                    let hint = did_you_mean(target, known).or_else(|| {
                        let templates: Vec<&str> = self.templates();
                        Some(known_list("stages", templates))
                    });
                    return Err(crate::EngineError::UnknownStage {
                        id: target.clone(),
                        hint,
                    });
                }
            };
            todo.extend(found);
        }
        while let Some(i) = todo.pop() {
            if std::mem::replace(&mut wanted[i], true) {
                continue;
            }
            todo.extend(self.dependencies(i));
        }
        let mut selected = self.clone();
        selected.stages = self
            .stages
            .iter()
            .zip(&wanted)
            .filter(|(_, w)| **w)
            .map(|(s, _)| s.clone())
            .collect();
        selected.reindex();
        Ok(selected)
    }

    /// The stage ids as written: each fan-out once, by its template id.
    fn templates(&self) -> Vec<&str> {
        let mut seen = std::collections::BTreeSet::new();
        self.stages
            .iter()
            .map(|s| s.group.as_deref().unwrap_or(&s.id))
            .filter(|t| seen.insert(*t))
            .collect()
    }

    /// Run-time fan-out placeholders not yet expanded, with the stage they wait on.
    pub fn fanout_placeholders(&self) -> Vec<(usize, usize)> {
        self.stages
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, self.position(s.fanout_from.as_deref()?)?)))
            .collect()
    }

    /// Replaces a placeholder with one stage per child: the template's params with the child's
    /// laid over them. Stages that read the template now read the whole group.
    pub fn expand_fanout(
        &mut self,
        placeholder: usize,
        children: &[FanoutChild],
    ) -> Result<(), String> {
        let template = self.stages[placeholder].clone();
        if children.len() > MAX_FANOUT {
            return Err(fanout_too_big(&template.id, &children.len().to_string(), None).message);
        }
        let mut expanded = Vec::with_capacity(children.len());
        for child in children {
            if child.id.is_empty()
                || !child
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(format!(
                    "child id `{}` may only use letters, digits, `_`, `-` and `.`",
                    child.id
                ));
            }
            let mut stage = template.clone();
            stage.id = format!("{}[{}]", template.id, child.id);
            stage.group = Some(template.id.clone());
            stage.fanout_from = None;
            for (k, v) in &child.params {
                stage.params.insert(k.clone(), v.clone());
            }
            if self.index.contains_key(&stage.id)
                || expanded.iter().any(|s: &Stage| s.id == stage.id)
            {
                return Err(format!(
                    "child id `{}` is listed twice or collides with another stage",
                    child.id
                ));
            }
            expanded.push(stage);
        }
        self.stages.splice(placeholder..=placeholder, expanded);
        self.reindex();
        let members: Vec<String> = self
            .groups
            .get(&template.id)
            .map(|g| g.iter().map(|&i| self.stages[i].id.clone()).collect())
            .unwrap_or_default();
        for stage in &mut self.stages {
            for input in stage.inputs.values_mut() {
                if let InputRef::Stage { id, path } = input
                    && *id == template.id
                    && path.is_empty()
                {
                    *input = InputRef::Group {
                        template: template.id.clone(),
                        ids: members.clone(),
                    };
                }
            }
        }
        Ok(())
    }

    fn reindex(&mut self) {
        self.index = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        self.groups = BTreeMap::new();
        for (i, s) in self.stages.iter().enumerate() {
            if let Some(g) = &s.group {
                self.groups.entry(g.clone()).or_default().push(i);
            }
        }
    }
}

struct Loader<'a> {
    file: &'a Path,
    kinds: &'a KindRegistry,
    errors: Vec<ConfigError>,
}

/// The stage params an overlay or `--set` gives, by stage template id.
type StageOverrides = BTreeMap<String, BTreeMap<String, (Value, SourceLoc)>>;

impl Loader<'_> {
    fn loc(&self, location: &Location) -> SourceLoc {
        SourceLoc::File {
            path: self.file.to_path_buf(),
            line: location.line(),
            column: location.column(),
        }
    }

    fn err(&mut self, error: ConfigError) {
        self.errors.push(error);
    }

    fn build(mut self, raw: RawPipeline, overrides: &Overrides) -> Result<Pipeline, ConfigErrors> {
        let base_dir = self.file.parent().unwrap_or(Path::new("."));
        let root = match &raw.root {
            Some(r) => base_dir.join(&r.value),
            None => base_dir.to_path_buf(),
        };
        let root = if root.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            root
        };
        if let Some(r) = &raw.root
            && !root.is_dir()
        {
            self.err(
                ConfigError::new(
                    format!(
                        "`root: {}` is not a directory (`{}`)",
                        r.value,
                        std::path::absolute(&root)
                            .unwrap_or_else(|_| root.clone())
                            .display()
                    ),
                    Some(self.loc(&r.referenced)),
                )
                .hint("`root` is the workspace folder, relative to the pipeline file's folder"),
            );
        }
        let mut params = self.declare_params(&raw.params);
        let stage_ids: Vec<&str> = raw.stages.iter().map(|s| s.id.value.as_str()).collect();
        let mut stage_overrides = StageOverrides::new();
        for overlay in &overrides.overlays {
            self.apply_overlay(overlay, &mut params, &stage_ids, &mut stage_overrides);
        }
        for set in &overrides.sets {
            self.apply_set(set, &mut params, &stage_ids, &mut stage_overrides);
        }
        let param_values: BTreeMap<String, Value> = params
            .iter()
            .map(|(k, p)| (k.clone(), p.value.clone()))
            .collect();
        let mut global_env = Vec::new();
        for name in &raw.env {
            global_env.push(name.value.clone());
        }

        let mut stages = Vec::new();
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut first_seen: HashMap<String, SourceLoc> = HashMap::new();
        for rs in &raw.stages {
            let loc = self.loc(&rs.id.referenced);
            if !valid_id(&rs.id.value) {
                self.err(
                    ConfigError::new(
                        format!("stage id `{}` has characters ids may not use", rs.id.value),
                        Some(loc.clone()),
                    )
                    .hint("use letters, digits, `_` and `-`"),
                );
                continue;
            }
            if let Some(first) = first_seen.get(&rs.id.value) {
                self.err(
                    ConfigError::new(
                        format!("duplicate stage id `{}`", rs.id.value),
                        Some(loc.clone()),
                    )
                    .hint(format!(
                        "the first `{}` is at {first}; give each stage its own id",
                        rs.id.value
                    )),
                );
                continue;
            }
            first_seen.insert(rs.id.value.clone(), loc.clone());
            let expanded = self.expand(
                rs,
                &param_values,
                stage_overrides.get(&rs.id.value),
                &global_env,
                &root,
            );
            let is_group = rs.matrix.is_some() || rs.foreach.is_some();
            for stage in expanded {
                if is_group {
                    groups
                        .entry(rs.id.value.clone())
                        .or_default()
                        .push(stages.len());
                }
                stages.push(stage);
            }
        }

        let mut index = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            if let Some(prev) = index.insert(s.id.clone(), i) {
                let first = stages[prev].location.clone();
                self.err(
                    ConfigError::new(
                        format!("duplicate stage id `{}` after fan-out", s.id),
                        Some(s.location.clone()),
                    )
                    .hint(format!("it collides with the stage at {first}")),
                );
            }
        }
        if stages.len() > MAX_STAGES {
            self.err(
                ConfigError::new(
                    format!(
                        "the pipeline expands to {} stages, more than the {MAX_STAGES} allowed",
                        stages.len()
                    ),
                    None,
                )
                .hint("split it into several pipelines that share one cache"),
            );
            return Err(ConfigErrors(self.errors));
        }
        let external: Vec<PathBuf> = raw.external.iter().map(|e| root.join(&e.value)).collect();
        self.resolve_inputs(&mut stages, &index, &groups, &root, &external);
        if self.errors.is_empty() {
            let pipeline = Pipeline {
                name: raw.name.value.clone(),
                file: self.file.to_path_buf(),
                root,
                params,
                stages,
                index,
                groups,
            };
            if let Err(cycle) = crate::graph::find_cycle(&pipeline) {
                self.err(cycle);
            }
            if self.errors.is_empty() {
                return Ok(pipeline);
            }
        }
        Err(ConfigErrors(self.errors))
    }

    fn declare_params(
        &mut self,
        raw: &BTreeMap<String, Spanned<Value>>,
    ) -> BTreeMap<String, Param> {
        let mut params = BTreeMap::new();
        for (name, spanned) in raw {
            let loc = self.loc(&spanned.referenced);
            let spec = match &spanned.value {
                Value::Object(map) if map.contains_key("type") || map.contains_key("default") => {
                    map
                }
                value => {
                    params.insert(
                        name.clone(),
                        Param {
                            ty: ParamType::of(value),
                            value: value.clone(),
                            help: None,
                        },
                    );
                    continue;
                }
            };
            for key in spec.keys() {
                if !["type", "default", "help"].contains(&key.as_str()) {
                    self.err(
                        ConfigError::new(
                            format!("unknown field `{key}` in the declaration of param `{name}`"),
                            Some(loc.clone()),
                        )
                        .hint(suggest(
                            "fields",
                            key,
                            ["type", "default", "help"],
                        )),
                    );
                }
            }
            let ty = match spec.get("type") {
                None => spec
                    .get("default")
                    .map(ParamType::of)
                    .unwrap_or(ParamType::Any),
                Some(Value::String(t)) => match ParamType::parse(t) {
                    Some(ty) => ty,
                    None => {
                        self.err(
                            ConfigError::new(
                                format!("unknown type `{t}` for param `{name}`"),
                                Some(loc.clone()),
                            )
                            .hint(suggest(
                                "types",
                                t,
                                ParamType::NAMES,
                            )),
                        );
                        continue;
                    }
                },
                Some(other) => {
                    self.err(
                        ConfigError::new(
                            format!("the type of param `{name}` must be a name, not `{other}`"),
                            Some(loc.clone()),
                        )
                        .hint(known_list("types", ParamType::NAMES)),
                    );
                    continue;
                }
            };
            let value = spec.get("default").cloned().unwrap_or(Value::Null);
            if !value.is_null() && !ty.accepts(&value) {
                self.err(wrong_type(
                    &format!("param `{name}`"),
                    ty,
                    &value,
                    Some(loc.clone()),
                ));
                continue;
            }
            let help = spec.get("help").and_then(Value::as_str).map(str::to_string);
            params.insert(name.clone(), Param { ty, value, help });
        }
        params
    }

    fn set_param(
        &mut self,
        params: &mut BTreeMap<String, Param>,
        name: &str,
        value: Value,
        loc: SourceLoc,
        raw_text: Option<&str>,
    ) {
        let Some(param) = params.get_mut(name) else {
            let hint = suggest("params", name, params.keys().map(String::as_str));
            self.err(ConfigError::new(format!("unknown param `{name}`"), Some(loc)).hint(hint));
            return;
        };
        // `--set name=123` for a string param means the text, not a number.
        let value = match (param.ty, raw_text, &value) {
            (ParamType::String, Some(text), v) if !v.is_string() => Value::String(text.to_string()),
            _ => value,
        };
        if !param.ty.accepts(&value) {
            self.err(wrong_type(
                &format!("param `{name}`"),
                param.ty,
                &value,
                Some(loc),
            ));
            return;
        }
        param.value = value;
    }

    fn apply_overlay(
        &mut self,
        path: &Path,
        params: &mut BTreeMap<String, Param>,
        stage_ids: &[&str],
        stages: &mut StageOverrides,
    ) {
        let text = match read_yaml_file(path, "overlay") {
            Ok(t) => t,
            Err(e) => {
                self.err(e);
                return;
            }
        };
        let overlay: RawOverlay = match serde_saphyr::from_str_with_options(&text, yaml_options()) {
            Ok(o) => o,
            Err(e) => {
                self.errors.extend(yaml_error(path, &e).0);
                return;
            }
        };
        let overlay_loc = |l: &Location| SourceLoc::File {
            path: path.to_path_buf(),
            line: l.line(),
            column: l.column(),
        };
        for (name, value) in overlay.params {
            self.set_param(
                params,
                &name,
                value.value,
                overlay_loc(&value.referenced),
                None,
            );
        }
        for (stage, o) in overlay.stages {
            if !stage_ids.contains(&stage.as_str()) {
                let loc = o.params.values().next().map(|v| overlay_loc(&v.referenced));
                self.err(
                    ConfigError::new(format!("overlay names unknown stage `{stage}`"), loc)
                        .hint(suggest("stages", &stage, stage_ids.iter().copied())),
                );
                continue;
            }
            for (name, value) in o.params {
                stages
                    .entry(stage.clone())
                    .or_default()
                    .insert(name, (value.value, overlay_loc(&value.referenced)));
            }
        }
    }

    fn apply_set(
        &mut self,
        set: &str,
        params: &mut BTreeMap<String, Param>,
        stage_ids: &[&str],
        stages: &mut StageOverrides,
    ) {
        let loc = SourceLoc::CommandLine(set.to_string());
        let Some((key, text)) = set.split_once('=') else {
            self.err(
                ConfigError::new(format!("`--set {set}` has no `=`"), Some(loc))
                    .hint("write `--set name=value` or `--set stage.param=value`"),
            );
            return;
        };
        let value: Value = serde_saphyr::from_str_with_options(text, yaml_options())
            .unwrap_or_else(|_| Value::String(text.to_string()));
        match key.split_once('.') {
            None => self.set_param(params, key, value, loc, Some(text)),
            Some((stage, name)) => {
                if !stage_ids.contains(&stage) {
                    self.err(
                        ConfigError::new(
                            format!("`--set` names unknown stage `{stage}`"),
                            Some(loc),
                        )
                        .hint(suggest(
                            "stages",
                            stage,
                            stage_ids.iter().copied(),
                        )),
                    );
                    return;
                }
                stages
                    .entry(stage.to_string())
                    .or_default()
                    .insert(name.to_string(), (value, loc));
            }
        }
    }

    /// One stage per fan-out combination (one stage when there is no fan-out).
    fn expand(
        &mut self,
        rs: &RawStage,
        params: &BTreeMap<String, Value>,
        overrides: Option<&BTreeMap<String, (Value, SourceLoc)>>,
        global_env: &[String],
        root: &Path,
    ) -> Vec<Stage> {
        let combos: Vec<Vec<(String, Value)>> = match (&rs.matrix, &rs.foreach) {
            (Some(_), Some(f)) => {
                let loc = self.loc(&f.referenced);
                self.err(
                    ConfigError::new(
                        format!("stage `{}` has both `matrix` and `foreach`", rs.id.value),
                        Some(loc),
                    )
                    .hint("use one: `foreach` is a matrix with the single axis `item`"),
                );
                return Vec::new();
            }
            (Some(m), None) => {
                let count = m
                    .value
                    .values()
                    .try_fold(1usize, |n, values| n.checked_mul(values.len()));
                if count.is_none_or(|n| n > MAX_FANOUT) {
                    let loc = self.loc(&m.referenced);
                    let count = count.map_or_else(|| "too many".to_string(), |n| n.to_string());
                    self.err(fanout_too_big(&rs.id.value, &count, Some(loc)));
                    return Vec::new();
                }
                let mut combos = vec![Vec::new()];
                for (axis, values) in &m.value {
                    if values.is_empty() {
                        let loc = self.loc(&m.referenced);
                        self.err(
                            ConfigError::new(
                                format!("matrix axis `{axis}` of stage `{}` is empty", rs.id.value),
                                Some(loc),
                            )
                            .hint("give each axis at least one value"),
                        );
                        return Vec::new();
                    }
                    combos = combos
                        .into_iter()
                        .flat_map(|c| {
                            values
                                .iter()
                                .map(move |v| [c.clone(), vec![(axis.clone(), v.clone())]].concat())
                        })
                        .collect();
                }
                combos
            }
            (None, Some(f)) if f.value.len() > MAX_FANOUT => {
                let loc = self.loc(&f.referenced);
                self.err(fanout_too_big(
                    &rs.id.value,
                    &f.value.len().to_string(),
                    Some(loc),
                ));
                return Vec::new();
            }
            (None, Some(f)) => f
                .value
                .iter()
                .map(|v| vec![("item".to_string(), v.clone())])
                .collect(),
            (None, None) => vec![Vec::new()],
        };
        let fanned = rs.matrix.is_some() || rs.foreach.is_some();
        if let (true, Some(f)) = (fanned, &rs.fanout) {
            let loc = self.loc(&f.referenced);
            self.err(
                ConfigError::new(
                    format!(
                        "stage `{}` has both a static fan-out (`matrix`/`foreach`) and `fanout`",
                        rs.id.value
                    ),
                    Some(loc),
                )
                .hint("use one kind of fan-out per stage"),
            );
            return Vec::new();
        }
        let kind = rs.kind.value.clone();
        let Some(kind_impl) = self.kinds.get(&kind).cloned() else {
            let loc = self.loc(&rs.kind.referenced);
            let hint = suggest("stage kinds", &kind, self.kinds.names());
            self.err(
                ConfigError::new(format!("unknown stage kind `{kind}`"), Some(loc)).hint(hint),
            );
            return Vec::new();
        };
        let stage_loc = self.loc(&rs.id.referenced);
        if let Some(r) = &rs.retries
            && r.value > MAX_RETRIES
        {
            self.err(
                ConfigError::new(
                    format!(
                        "stage `{}`: `retries: {}` is more than the {MAX_RETRIES} allowed",
                        rs.id.value, r.value
                    ),
                    Some(self.loc(&r.referenced)),
                )
                .hint(
                    "a stage that fails that often needs a fix, not more attempts; use at most 100",
                ),
            );
        }
        let mut out = Vec::new();
        for combo in combos {
            let id = if fanned {
                let labels: Vec<String> = combo.iter().map(|(_, v)| label(v)).collect();
                format!("{}[{}]", rs.id.value, labels.join(","))
            } else {
                rs.id.value.clone()
            };
            let ctx = Interp {
                params,
                matrix: &combo,
                fanned,
            };
            let mut stage_params = Map::new();
            let mut param_locs: BTreeMap<String, SourceLoc> = BTreeMap::new();
            for (name, value) in &rs.params {
                param_locs.insert(name.clone(), self.loc(&value.referenced));
                stage_params.insert(name.clone(), value.value.clone());
            }
            if let Some(cmd) = &rs.cmd {
                param_locs.insert("cmd".into(), self.loc(&cmd.referenced));
                stage_params.insert("cmd".into(), Value::String(cmd.value.clone()));
            }
            if let Some(outputs) = &rs.outputs {
                param_locs.insert("outputs".into(), self.loc(&outputs.referenced));
                stage_params.insert(
                    "outputs".into(),
                    outputs.value.iter().cloned().map(Value::String).collect(),
                );
            }
            if (rs.cmd.is_some() || rs.outputs.is_some()) && kind != "command" {
                self.err(ConfigError::new(format!("stage `{id}`: `cmd` and `outputs` belong to `command` stages, not `{kind}`"), Some(stage_loc.clone())).hint("put this kind's settings under `params:`"));
            }
            if let Some(ov) = overrides {
                for (name, (value, loc)) in ov {
                    param_locs.insert(name.clone(), loc.clone());
                    stage_params.insert(name.clone(), value.clone());
                }
            }
            // Interpolate, then type-check against the kind.
            let mut resolved = Map::new();
            for (name, value) in stage_params {
                let loc = param_locs
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| stage_loc.clone());
                match ctx.value(&value) {
                    Ok(v) => {
                        resolved.insert(name, v);
                    }
                    Err(e) => {
                        self.err(e.at(loc));
                        // Keep the raw value so the one mistake is reported once.
                        resolved.insert(name, value);
                    }
                }
            }
            let specs = kind_impl.params();
            for (name, value) in &resolved {
                let loc = param_locs
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| stage_loc.clone());
                match specs.iter().find(|s| s.name == name) {
                    Some(spec) if !spec.ty.accepts(value) => {
                        self.err(wrong_type(
                            &format!("param `{name}` of stage `{id}`"),
                            spec.ty,
                            value,
                            Some(loc),
                        ));
                    }
                    Some(_) => {}
                    None if kind_impl.open_params() => {}
                    None => {
                        let hint = suggest(
                            &format!("params of `{kind}`"),
                            name,
                            specs.iter().map(|s| s.name),
                        );
                        self.err(
                            ConfigError::new(
                                format!("unknown param `{name}` for a `{kind}` stage"),
                                Some(loc),
                            )
                            .hint(hint),
                        );
                    }
                }
            }
            for spec in specs
                .iter()
                .filter(|s| s.required && !resolved.contains_key(s.name))
            {
                self.err(
                    ConfigError::new(
                        format!("stage `{id}` is missing the required param `{}`", spec.name),
                        Some(stage_loc.clone()),
                    )
                    .hint(format!(
                        "`{}` ({}): {}",
                        spec.name,
                        spec.ty.name(),
                        spec.help
                    )),
                );
            }
            if let Err(message) = kind_impl.check(&resolved) {
                self.err(ConfigError::new(
                    format!("stage `{id}`: {message}"),
                    Some(stage_loc.clone()),
                ));
            }
            let mut inputs = BTreeMap::new();
            for (name, spanned) in &rs.inputs {
                let loc = self.loc(&spanned.referenced);
                if !valid_input_name(name) {
                    self.err(
                        ConfigError::new(
                            format!("input name `{name}` of stage `{id}` is not a valid name"),
                            Some(loc.clone()),
                        )
                        .hint("use letters, digits and `_`; it becomes an env variable"),
                    );
                }
                match ctx.string(&spanned.value) {
                    Ok(text) => {
                        // Placeholder until `resolve_inputs` knows every stage.
                        inputs.insert(name.clone(), (text, loc));
                    }
                    Err(e) => self.err(e.at(loc)),
                }
            }
            let resources = self.resources(rs, &id);
            let mut env = BTreeMap::new();
            for name in global_env
                .iter()
                .cloned()
                .chain(rs.env.iter().map(|e| e.value.clone()))
            {
                let value = std::env::var(&name).unwrap_or_default();
                env.insert(name, value);
            }
            out.push(Stage {
                id,
                template: rs.id.value.clone(),
                kind: kind.clone(),
                params: resolved,
                inputs: inputs
                    .into_iter()
                    .map(|(name, (text, _))| (name, pending_input(&text, root)))
                    .collect(),
                resources,
                retries: rs.retries.as_ref().map_or(0, |r| r.value),
                env,
                location: stage_loc.clone(),
                group: fanned.then(|| rs.id.value.clone()),
                fanout_from: rs.fanout.as_ref().map(|f| f.value.clone()),
                slurm: rs.slurm.clone(),
            });
        }
        out
    }

    fn resources(&mut self, rs: &RawStage, id: &str) -> Resources {
        let Some(r) = &rs.resources else {
            return Resources::default();
        };
        let memory_mb = match &r.memory {
            None => None,
            Some(m) => {
                match parse_memory(&m.value) {
                    Some(mb) => Some(mb),
                    None => {
                        let loc = self.loc(&m.referenced);
                        self.err(ConfigError::new(format!("stage `{id}`: cannot read memory `{}`", m.value), Some(loc)).hint("give megabytes as a number, or a string such as `512MiB` or `2GiB`"));
                        None
                    }
                }
            }
        };
        Resources {
            cpus: r.cpus.unwrap_or(1).max(1),
            gpus: r.gpus.unwrap_or(0),
            memory_mb,
            require_gpu: r.require_gpu.unwrap_or(false),
        }
    }

    /// Turns input texts into references now that every stage id is known.
    fn resolve_inputs(
        &mut self,
        stages: &mut [Stage],
        index: &HashMap<String, usize>,
        groups: &BTreeMap<String, Vec<usize>>,
        root: &Path,
        external: &[PathBuf],
    ) {
        // Where the root and the allowed outside paths really are (symlinks resolved).
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let external: Vec<PathBuf> = external
            .iter()
            .filter_map(|e| e.canonicalize().ok())
            .collect();
        let ids: Vec<String> = stages.iter().map(|s| s.id.clone()).collect();
        let known: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .chain(groups.keys().map(String::as_str))
            .collect();
        for stage in stages.iter_mut() {
            if let Some(src) = &stage.fanout_from
                && !index.contains_key(src)
            {
                let hint = suggest("stages", src, known.iter().copied());
                self.errors.push(
                    ConfigError::new(
                        format!(
                            "`fanout` of stage `{}` names unknown stage `{src}`",
                            stage.id
                        ),
                        Some(stage.location.clone()),
                    )
                    .hint(hint),
                );
            }
            for (name, input) in stage.inputs.iter_mut() {
                let InputRef::Stage { id: text, .. } = input else {
                    if let InputRef::File(p) = input
                        && let Some(error) = file_input_error(p, &root, &external)
                    {
                        self.errors.push(error.at_input(
                            name,
                            &stage.id,
                            Some(stage.location.clone()),
                        ));
                    }
                    continue;
                };
                let (target, sub) = split_ref(text);
                let (target, sub) = (target.to_string(), sub.trim_matches('/').to_string());
                let target = target.as_str();
                if Path::new(&sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    self.errors.push(
                        ConfigError::new(
                            format!(
                                "input `{name}` of stage `{}`: `{text}` leaves the output folder of `{target}`",
                                stage.id
                            ),
                            Some(stage.location.clone()),
                        )
                        .hint("a stage input is `ID` or `ID/PATH` with PATH inside ID's outputs, without `..`"),
                    );
                    continue;
                }
                if index.contains_key(target) {
                    *input = InputRef::Stage {
                        id: target.to_string(),
                        path: sub,
                    };
                } else if let Some(members) = groups.get(target) {
                    *input = InputRef::Group {
                        template: target.to_string(),
                        ids: members.iter().map(|&i| ids[i].clone()).collect(),
                    };
                } else {
                    let hint = suggest("stages", target, known.iter().copied());
                    self.errors.push(
                        ConfigError::new(
                            format!(
                                "input `{name}` of stage `{}` refers to unknown stage `{target}`",
                                stage.id
                            ),
                            Some(stage.location.clone()),
                        )
                        .hint(format!("{hint} (a file input is written `file:PATH`)")),
                    );
                }
            }
        }
    }
}

/// Reads a pipeline or overlay file: a regular file of at most [`MAX_FILE_BYTES`], in UTF-8
/// (an invalid byte is reported with its line, column and offset).
fn read_yaml_file(path: &Path, what: &str) -> Result<String, ConfigError> {
    use std::io::Read;
    let cannot = |e: &dyn std::fmt::Display| {
        ConfigError::new(
            format!("cannot read {what} file `{}`: {e}", path.display()),
            None,
        )
    };
    let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
    let meta = file.metadata().map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file").hint(format!("name a YAML {what} file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(
            cannot(&format!("it is larger than {} MiB", MAX_FILE_BYTES >> 20))
                .hint(format!("is `{}` really a {what} file?", path.display())),
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = valid.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        ConfigError::new(
            format!(
                "{what} file is not valid UTF-8 (byte offset {})",
                valid.len()
            ),
            Some(SourceLoc::File {
                path: path.to_path_buf(),
                line: line as u64,
                column: column as u64,
            }),
        )
        .hint("save the file as UTF-8")
    })
}

fn fanout_too_big(stage: &str, count: &str, loc: Option<SourceLoc>) -> ConfigError {
    ConfigError::new(
        format!("stage `{stage}` fans out to {count} stages, more than the {MAX_FANOUT} allowed"),
        loc,
    )
    .hint("fewer axes or values; a search that big belongs in several pipelines")
}

/// What is wrong with a `file:` input, if anything: missing, not a regular file or folder (a
/// device or FIFO would hang the hasher), or outside the workspace root (by where a symlink
/// resolves) and not listed under `external:`.
fn file_input_error(path: &Path, root: &Path, external: &[PathBuf]) -> Option<ConfigError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => {
            return Some(
                ConfigError::new(format!("file `{}` does not exist", path.display()), None)
                    .hint("file inputs are relative to the pipeline's `root`"),
            );
        }
    };
    if !meta.is_file() && !meta.is_dir() {
        return Some(
            ConfigError::new(
                format!(
                    "`{}` is not a regular file or folder (a device, FIFO or socket)",
                    path.display()
                ),
                None,
            )
            .hint("inputs are hashed by content; copy the data into a file"),
        );
    }
    let resolved = path.canonicalize().ok()?;
    if resolved.starts_with(root) || external.iter().any(|e| resolved.starts_with(e)) {
        return None;
    }
    Some(
        ConfigError::new(
            format!(
                "`{}` is outside the workspace root `{}`",
                path.display(),
                root.display()
            ),
            None,
        )
        .hint(format!(
            "list it (or a folder above it) under `external:` in the pipeline to read it: \
             external: [\"{}\"]",
            resolved.display()
        )),
    )
}

/// The stage id at the start of a reference (`id`, `id/path`, `fan[a,b]/path`) and the path.
fn split_ref(text: &str) -> (&str, &str) {
    let end = match text.find('[') {
        Some(open) => text[open..]
            .find(']')
            .map_or(text.len(), |close| open + close + 1),
        None => text.find('/').unwrap_or(text.len()),
    };
    text.split_at(end)
}

fn pending_input(text: &str, root: &Path) -> InputRef {
    match text.strip_prefix("file:") {
        Some(path) => InputRef::File(root.join(path)),
        None => InputRef::Stage {
            id: text.to_string(),
            path: String::new(),
        },
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_input_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// How a fan-out value reads inside an id.
fn label(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_memory(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let num: f64 = num.parse().ok()?;
            let factor = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "m" | "mb" | "mib" => 1.0,
                "g" | "gb" | "gib" => 1024.0,
                "t" | "tb" | "tib" => 1024.0 * 1024.0,
                "k" | "kb" | "kib" => 1.0 / 1024.0,
                _ => return None,
            };
            Some((num * factor).ceil() as u64)
        }
        _ => None,
    }
}

fn wrong_type(what: &str, ty: ParamType, value: &Value, loc: Option<SourceLoc>) -> ConfigError {
    ConfigError::new(
        format!(
            "{what} expects {}, got {} `{value}`",
            ty.name(),
            ParamType::of(value).name()
        ),
        loc,
    )
    .hint(match ty {
        ParamType::Int | ParamType::Any => format!("give an {} value", ty.name()),
        _ => format!("give a {} value", ty.name()),
    })
}

/// Turns a serde-saphyr error into ours, with its location and a hint.
/// YAML 1.2 core schema for booleans: only `true`/`false` are booleans, so `y`, `no`, `on` and
/// `off` (YAML 1.1 booleans) stay the strings they look like, in `foreach:` lists and params.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

fn yaml_error(file: &Path, e: &serde_saphyr::Error) -> ConfigErrors {
    let location = e.location().map(|l| SourceLoc::File {
        path: file.to_path_buf(),
        line: l.line(),
        column: l.column(),
    });
    let message = e.without_snippet().to_string();
    let message = message.lines().next().unwrap_or("invalid YAML").trim();
    // The location is shown on its own line; don't repeat it in the message.
    let message = match message.rfind(" at line ") {
        Some(at) if message[at..].contains("column") => &message[..at],
        _ => message,
    };
    let mut error = ConfigError::new(message.to_string(), location);
    // The YAML library's own words name its API; say it in the pipeline's terms.
    if let Some(rest) = message.strip_prefix("duplicate mapping key") {
        let key = rest
            .trim_start_matches(':')
            .split(',')
            .next()
            .unwrap_or_default()
            .trim();
        error.message = if key.is_empty() {
            "duplicate key in a mapping".into()
        } else {
            format!("duplicate key `{key}`")
        };
        return ConfigErrors(vec![error.hint(
            "each key may appear once in a mapping; remove or rename one of them",
        )]);
    }
    if message.contains("from_str_multiple") {
        error.message = "the file holds more than one YAML document".into();
        return ConfigErrors(vec![error.hint(
            "a pipeline is one document: remove the `---` line (use `--with FILE` to layer another file)",
        )]);
    }
    if let Some(rest) = message.split("unknown field `").nth(1) {
        let field = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest
            .split("expected ")
            .nth(1)
            .unwrap_or_default()
            .trim_start_matches("one of ")
            .split(',')
            .map(|f| f.trim().trim_matches('`'))
            .filter(|f| !f.is_empty())
            .collect();
        error.message = format!("unknown field `{field}`");
        error = error.hint(
            did_you_mean(field, expected.iter().copied())
                .unwrap_or_else(|| known_list("fields", expected.iter().copied())),
        );
    } else if message.contains("missing field") {
        error = error.hint("see the pipeline format in the README");
    } else {
        error = error.hint("this is not valid YAML for a pipeline; check the syntax at this spot");
    }
    ConfigErrors(vec![error])
}

/// `${params.NAME}`, `${matrix.NAME}` and `${item}`: resolved when the pipeline loads. Any other
/// `${...}` is left alone, for the shell or the kind.
struct Interp<'a> {
    params: &'a BTreeMap<String, Value>,
    matrix: &'a [(String, Value)],
    fanned: bool,
}

struct InterpError(ConfigError);

impl InterpError {
    fn at(self, loc: SourceLoc) -> ConfigError {
        ConfigError {
            location: Some(loc),
            ..self.0
        }
    }
}

impl Interp<'_> {
    fn lookup(&self, expr: &str) -> Option<Result<Value, InterpError>> {
        if let Some(name) = expr.strip_prefix("params.") {
            return Some(self.params.get(name).cloned().ok_or_else(|| {
                InterpError(
                    ConfigError::new(
                        format!("`${{{expr}}}` refers to unknown param `{name}`"),
                        None,
                    )
                    .hint(suggest(
                        "params",
                        name,
                        self.params.keys().map(String::as_str),
                    )),
                )
            }));
        }
        let axis = expr
            .strip_prefix("matrix.")
            .or((expr == "item").then_some("item"))?;
        Some(
            self.matrix
                .iter()
                .find(|(a, _)| a == axis)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    let hint = if self.fanned {
                        suggest("axes", axis, self.matrix.iter().map(|(a, _)| a.as_str()))
                    } else {
                        "this stage has no `matrix` or `foreach`".to_string()
                    };
                    InterpError(
                        ConfigError::new(
                            format!("`${{{expr}}}` refers to unknown fan-out axis `{axis}`"),
                            None,
                        )
                        .hint(hint),
                    )
                }),
        )
    }

    fn value(&self, v: &Value) -> Result<Value, InterpError> {
        Ok(match v {
            Value::String(s) => {
                // A string that is exactly one reference keeps the referenced value's type.
                if let Some(expr) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
                    && !expr.contains('}')
                    && let Some(found) = self.lookup(expr)
                {
                    return found;
                }
                Value::String(self.string(s)?)
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.value(i))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.value(v)?)))
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        })
    }

    fn string(&self, s: &str) -> Result<String, InterpError> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let expr = &after[..end];
            match self.lookup(expr) {
                Some(found) => out.push_str(&label(&found?)),
                None => {
                    out.push_str("${");
                    out.push_str(expr);
                    out.push('}');
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}
