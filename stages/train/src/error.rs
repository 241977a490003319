//! What can go wrong in a training or evaluation, with what to do about it.

use std::path::PathBuf;

use autoscale_engine::StageError;
use autoscale_errors::Hint;

/// Why a `train` or `eval` job could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("param `{name}`: {message}")]
    Param {
        name: &'static str,
        message: String,
        hint: Option<String>,
    },
    #[error("input `{input}`: {message}")]
    Input {
        input: &'static str,
        message: String,
        hint: Option<String>,
    },
    #[error("{path}: {message}")]
    Data {
        path: PathBuf,
        message: String,
        hint: Option<String>,
    },
    #[error("domain `{domain}` is not in the data")]
    UnknownDomain { domain: String, known: Vec<String> },
    #[error("cannot {what} `{path}`")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("libtorch: {message}")]
    Torch {
        message: String,
        hint: Option<String>,
    },
    #[error("the training process failed: {message}")]
    Child {
        message: String,
        hint: Option<String>,
    },
    #[error("interrupted")]
    Cancelled,
}

impl TrainError {
    pub fn param(name: &'static str, message: impl Into<String>) -> Self {
        TrainError::Param {
            name,
            message: message.into(),
            hint: None,
        }
    }

    pub fn param_hint(
        name: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        TrainError::Param {
            name,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Data {
            path: path.into(),
            message: message.into(),
            hint: None,
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn torch(message: impl Into<String>) -> Self {
        let message = message.into();
        let hint = if message.contains("out of memory") {
            Some("lower `batch_size` (and raise `grad_accum` to keep the tokens per step), or use a smaller `seq_len`".into())
        } else {
            None
        };
        TrainError::Torch { message, hint }
    }

    /// The message with its sources, one line.
    pub fn message(&self) -> String {
        autoscale_errors::one_line(self)
    }
}

impl Hint for TrainError {
    /// What the user can do about it.
    fn hint(&self) -> Option<String> {
        match self {
            TrainError::Param { hint, .. }
            | TrainError::Input { hint, .. }
            | TrainError::Data { hint, .. }
            | TrainError::Torch { hint, .. }
            | TrainError::Child { hint, .. } => hint.clone(),
            TrainError::UnknownDomain { known, .. } => {
                Some(format!("the data has the domains [{}]", known.join(", ")))
            }
            TrainError::Io { .. } | TrainError::Cancelled => None,
        }
    }
}

impl From<TrainError> for StageError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Cancelled => StageError::Cancelled,
            e => StageError::Failed {
                message: e.message(),
                hint: e.hint(),
            },
        }
    }
}
