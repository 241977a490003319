//! Errors a person can act on: each names the file, line and column, and gives a hint.

use autoscale_errors::Hint;
use std::fmt;
use std::path::PathBuf;

/// Where in the user's input something came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceLoc {
    File {
        path: PathBuf,
        line: u64,
        column: u64,
    },
    /// A `--set` given on the command line.
    CommandLine(String),
}

impl fmt::Display for SourceLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceLoc::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            SourceLoc::CommandLine(arg) => write!(f, "command line `--set {arg}`"),
        }
    }
}

/// One problem with a pipeline, overlay or `--set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
    pub location: Option<SourceLoc>,
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(message: impl Into<String>, location: Option<SourceLoc>) -> Self {
        Self {
            message: message.into(),
            location,
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A hint, unless the error has one already.
    pub fn or_hint(self, hint: impl Into<String>) -> Self {
        if self.hint.is_some() {
            self
        } else {
            self.hint(hint)
        }
    }

    /// The error as said of input `name` of stage `stage`, at `location`.
    pub fn at_input(self, name: &str, stage: &str, location: Option<SourceLoc>) -> Self {
        Self {
            message: format!("input `{name}` of stage `{stage}`: {}", self.message),
            location,
            ..self
        }
    }

    /// The source line the location points at, for a snippet.
    pub fn source_line(&self) -> Option<(u64, u64, String)> {
        let SourceLoc::File { path, line, column } = self.location.as_ref()? else {
            return None;
        };
        let text = std::fs::read_to_string(path).ok()?;
        let src = text
            .lines()
            .nth(usize::try_from(*line).ok()?.checked_sub(1)?)?;
        Some((*line, *column, src.to_string()))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(loc) = &self.location {
            write!(f, " (at {loc})")?;
        }
        Ok(())
    }
}

/// Every problem found in one pass: validation reports them all, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// Errors of the engine at large.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the pipeline is not valid")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Cache(#[from] autoscale_cache::CacheError),
    #[error("cannot read `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Resources { message: String, hint: String },
    #[error("no stage `{id}` in the pipeline")]
    UnknownStage { id: String, hint: Option<String> },
    /// The cache refused a finished stage's result (a full disk, lost permissions): not the
    /// user's input, and nothing was cached half-way.
    #[error("could not commit to the cache: {message}")]
    Commit { message: String },
}

impl Hint for EngineError {
    fn hint(&self) -> Option<String> {
        match self {
            EngineError::Resources { hint, .. } => Some(hint.clone()),
            EngineError::UnknownStage { hint, .. } => hint.clone(),
            EngineError::Commit { .. } => Some(
                "check free space and permissions of the cache directory; the stages that \
                 ran are not cached, and a rerun runs them again"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// "did you mean `x`?" for the closest of `known` to `name`, when one is close enough.
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(name, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

/// `known: a, b, c` for a hint when nothing is close.
pub fn known_list<'a>(what: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = known.into_iter().map(|k| format!("`{k}`")).collect();
    format!("known {what}: {}", names.join(", "))
}

pub(crate) fn suggest<'a>(
    what: &str,
    name: &str,
    known: impl IntoIterator<Item = &'a str> + Clone,
) -> String {
    did_you_mean(name, known.clone()).unwrap_or_else(|| known_list(what, known))
}
