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
    #[error("output path `{0}` escapes the output directory or is not valid UTF-8")]
    BadOutputPath(PathBuf),
    #[error("output `{path}` is a {what}; outputs must be regular files or directories")]
    UnsupportedFileType { path: PathBuf, what: &'static str },
    #[error("blob {digest} is missing from the cache")]
    MissingBlob { digest: String },
    #[error(transparent)]
    Remote(#[from] crate::RemoteError),
}

impl CacheError {
    /// What the person can do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            CacheError::Remote(e) => e.hint(),
            _ => None,
        }
    }
}
