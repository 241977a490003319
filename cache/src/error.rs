use autoscale_errors::Hint;
use std::path::PathBuf;

/// Everything that can go wrong in the cache, each with the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O failed on `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache manifest `{path}` is unreadable")]
    BadManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cache manifest `{path}` has schema version {found}, this autoscale reads {expected}")]
    SchemaVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "output path `{0}` is not a plain relative path inside the output directory (`/`-separated, no empty, `.` or `..` part, no NUL, valid UTF-8)"
    )]
    BadOutputPath(PathBuf),
    #[error("output path `{0}` is listed twice, or as a file and as a folder")]
    ConflictingOutputPath(PathBuf),
    #[error("output `{path}` is a {what}; outputs must be regular files or directories")]
    UnsupportedFileType { path: PathBuf, what: &'static str },
    #[error("blob {digest} is missing from the cache")]
    MissingBlob { digest: String },
    #[error(transparent)]
    Remote(#[from] crate::RemoteError),
}

impl Hint for CacheError {
    /// What the person can do about it, when there is something to say.
    fn hint(&self) -> Option<String> {
        match self {
            CacheError::Remote(e) => e.hint(),
            _ => None,
        }
    }
}
