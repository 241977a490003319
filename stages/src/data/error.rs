//! What can go wrong in the data stages, each with the path or URL it concerns and a hint.

use std::io;
use std::path::PathBuf;

use autoscale_engine::StageError;
use autoscale_errors::Hint;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("param `{name}` {message}")]
    Param { name: String, message: String },

    #[error("input `{name}` {message}")]
    Input { name: &'static str, message: String },

    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{path}` line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: u64,
        message: String,
    },

    #[error("no documents found under `{path}`")]
    NoSourceFiles { path: PathBuf },

    #[error("cannot download `{url}` ({attempts} attempt(s)): {reason}")]
    Download {
        url: String,
        reason: String,
        attempts: u32,
        /// Every attempt failed before a server answered: no route, no DNS, refused.
        offline: bool,
    },

    #[error("`{url}` does not match its declared {algo}: expected {expected}, got {actual}")]
    Checksum {
        url: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },

    #[error("tokenizer `{path}`: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("cannot train the tokenizer: {0}")]
    Training(String),

    #[error("cannot write the Arrow shard `{path}`")]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow_schema::ArrowError,
    },

    #[error("{0}")]
    Internal(String),

    #[error("interrupted")]
    Cancelled,
}

impl Hint for DataError {
    /// What the person can do about it.
    fn hint(&self) -> Option<String> {
        Some(match self {
            DataError::Param { .. } => "`autoscale kinds` lists each kind's params".into(),
            DataError::Input { .. } => {
                "check the stage's `inputs`; the data kinds' module docs list what each reads"
                    .into()
            }
            DataError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                "the file is not there; check the path, or the stage that should write it".into()
            }
            DataError::Write { source, .. } if source.raw_os_error() == Some(28) => {
                "the disk is full; free space or point --cache-dir elsewhere".into()
            }
            DataError::BadLine { .. } => {
                "each line must be one JSON object with the text field (RedPajama layout); a truncated last line means an incomplete download".into()
            }
            DataError::NoSourceFiles { .. } => {
                "`prepare` reads `.jsonl`/`.ndjson` (JSON Lines) and `.txt` files, optionally `.zst` or `.gz`; set `format` to read other names".into()
            }
            DataError::Download { offline: true, .. } => {
                "the machine looks offline (no server could be reached); check the network, or use a `file://` URL or a local path to a copy".into()
            }
            DataError::Download { .. } => {
                "check the URL; a partial file is kept, so rerunning resumes it".into()
            }
            DataError::Checksum { .. } => {
                "the file is not the one the pipeline declares: fix the URL or the checksum; nothing was kept".into()
            }
            DataError::Tokenizer { .. } => {
                "the tokenizer input must be a `tokenizer` stage or a Hugging Face `tokenizer.json`".into()
            }
            DataError::Training(_) => {
                "give the tokenizer more documents, or a smaller `vocab_size`".into()
            }
            _ => return None,
        })
    }
}

impl From<DataError> for StageError {
    fn from(e: DataError) -> Self {
        if matches!(e, DataError::Cancelled) {
            return StageError::Cancelled;
        }
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        StageError::Failed {
            message,
            hint: e.hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    #[test]
    fn the_stage_error_carries_the_cause_and_the_hint() {
        let e = DataError::Read {
            path: "corpus/books.jsonl".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "No such file"),
        };
        let StageError::Failed { message, hint } = StageError::from(e) else {
            panic!("a read error is a failure");
        };
        assert_eq!(message, "cannot read `corpus/books.jsonl`: No such file");
        assert!(hint.expect("hint").contains("not there"));
    }

    #[test]
    fn an_offline_download_says_so() {
        let e = DataError::Download {
            url: "https://example.com/a.jsonl".into(),
            reason: "cannot resolve host".into(),
            attempts: 3,
            offline: true,
        };
        assert!(e.hint().expect("hint").contains("offline"));
        assert!(matches!(
            StageError::from(DataError::Cancelled),
            StageError::Cancelled
        ));
    }
}
