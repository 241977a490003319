//! Where a remote cache is and how it is used: the location URL, the mode, the time-out, each
//! read from flags, the environment or an `autoscale.toml`, and layered in that order.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::RemoteError;

/// The environment variable naming the remote cache.
pub const ENV_URL: &str = "AUTOSCALE_REMOTE";
/// The environment variable setting its mode.
pub const ENV_MODE: &str = "AUTOSCALE_REMOTE_MODE";
/// The environment variable setting the per-request time-out, in seconds.
pub const ENV_TIMEOUT: &str = "AUTOSCALE_REMOTE_TIMEOUT";
/// The project config file, looked for in the working directory and the pipeline's root.
pub const CONFIG_FILE: &str = "autoscale.toml";

/// Time-out of one small request (a manifest, an existence check) unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// How the remote cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteMode {
    /// Local misses are looked up in the remote; nothing is uploaded.
    ReadOnly,
    /// Local misses are looked up in the remote, and what runs here is uploaded.
    ReadWrite,
    /// The remote is ignored.
    Off,
}

impl RemoteMode {
    pub const NAMES: [&'static str; 3] = ["read-only", "read-write", "off"];

    pub fn as_str(self) -> &'static str {
        match self {
            RemoteMode::ReadOnly => "read-only",
            RemoteMode::ReadWrite => "read-write",
            RemoteMode::Off => "off",
        }
    }
}

impl fmt::Display for RemoteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RemoteMode {
    type Err = RemoteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "read-only" | "readonly" | "ro" => Ok(RemoteMode::ReadOnly),
            "read-write" | "readwrite" | "rw" => Ok(RemoteMode::ReadWrite),
            "off" | "none" => Ok(RemoteMode::Off),
            _ => Err(RemoteError::BadMode {
                mode: s.chars().take(40).collect(),
            }),
        }
    }
}

/// A remote cache's location, as parsed from its URL. It never holds credentials: those come
/// from the standard AWS environment and credential chain when the store is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteLocation {
    /// A shared directory (an NFS mount): `file:///path` or a plain path.
    Directory(PathBuf),
    /// An S3 or S3-compatible bucket and a key prefix in it: `s3://bucket/prefix`.
    S3 { bucket: String, prefix: String },
}

impl RemoteLocation {
    /// Parses `s3://bucket/prefix`, `file:///path` or a plain path; a relative path is taken
    /// relative to `base` (the directory of the config file that named it, or the working
    /// directory).
    pub fn parse(url: &str, base: Option<&Path>) -> Result<Self, RemoteError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(RemoteError::BadUrl {
                url: String::new(),
                hint: "write `s3://bucket/prefix`, `file:///shared/cache` or a directory path"
                    .into(),
            });
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(RemoteLocation::Directory(absolute(Path::new(url), base)));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return Err(RemoteError::BadUrl {
                        url: safe_url(url),
                        hint: "a file URL names an absolute path: `file:///shared/cache`".into(),
                    });
                }
                Ok(RemoteLocation::Directory(PathBuf::from(path)))
            }
            "s3" | "s3a" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.contains('@') || bucket.contains(':') {
                    return Err(RemoteError::BadUrl {
                        url: safe_url(url),
                        hint: "credentials never go in the URL: set AWS_ACCESS_KEY_ID and \
                               AWS_SECRET_ACCESS_KEY (or use a profile, web identity or \
                               instance credentials)"
                            .into(),
                    });
                }
                if bucket.is_empty() || prefix.contains('?') || prefix.contains('#') {
                    return Err(RemoteError::BadUrl {
                        url: safe_url(url),
                        hint: "write `s3://bucket` or `s3://bucket/some/prefix`; the endpoint \
                               and region come from AWS_ENDPOINT_URL and AWS_REGION"
                            .into(),
                    });
                }
                let prefix = prefix
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join("/");
                if prefix.split('/').any(|p| p == "." || p == "..") {
                    return Err(RemoteError::BadUrl {
                        url: safe_url(url),
                        hint: "the prefix may not contain `.` or `..` segments".into(),
                    });
                }
                Ok(RemoteLocation::S3 {
                    bucket: bucket.to_string(),
                    prefix,
                })
            }
            "gs" | "az" | "abfs" | "abfss" | "azure" | "adl" | "http" | "https" => {
                Err(RemoteError::BadUrl {
                    url: safe_url(url),
                    hint: "this build speaks S3 (`s3://`) and shared directories; GCS and Azure \
                           come with object_store's `gcp` and `azure` features, which are not \
                           enabled in cache/Cargo.toml. An S3-compatible endpoint is set with \
                           AWS_ENDPOINT_URL and an `s3://bucket` URL"
                        .into(),
                })
            }
            _ => Err(RemoteError::BadUrl {
                url: safe_url(url),
                hint: "write `s3://bucket/prefix`, `file:///shared/cache` or a directory path"
                    .into(),
            }),
        }
    }
}

impl fmt::Display for RemoteLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteLocation::Directory(path) => write!(f, "{}", path.display()),
            RemoteLocation::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            RemoteLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A URL as it may appear in a message: anything that could be a secret (user info, query,
/// fragment) is cut, and it is kept short.
fn safe_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("{scheme}{authority}{path}")
        .chars()
        .take(200)
        .collect()
}

fn absolute(path: &Path, base: Option<&Path>) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match base {
        Some(base) => base.join(path),
        None => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Remote cache settings from one source; [`RemoteConfig::or`] layers sources, the first that
/// sets a field winning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteConfig {
    pub url: Option<String>,
    pub mode: Option<RemoteMode>,
    pub timeout: Option<Duration>,
    /// Where a relative directory path in `url` is resolved.
    pub base_dir: Option<PathBuf>,
    /// Where `url` was set (`--remote`, `AUTOSCALE_REMOTE`, a config file), for messages.
    pub origin: Option<String>,
}

/// `[remote]` of `autoscale.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteSection {
    url: Option<String>,
    mode: Option<String>,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    remote: Option<RemoteSection>,
}

impl RemoteConfig {
    /// `AUTOSCALE_REMOTE`, `AUTOSCALE_REMOTE_MODE` and `AUTOSCALE_REMOTE_TIMEOUT`.
    pub fn from_env() -> Result<Self, RemoteError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, RemoteError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mode = set(ENV_MODE).map(|m| m.parse()).transpose()?;
        let timeout = match set(ENV_TIMEOUT) {
            Some(t) => Some(parse_timeout(&t).ok_or_else(|| RemoteError::BadTimeout {
                origin: ENV_TIMEOUT.into(),
                value: t.chars().take(40).collect(),
            })?),
            None => None,
        };
        let url = set(ENV_URL);
        Ok(Self {
            origin: url.as_ref().map(|_| ENV_URL.to_string()),
            url,
            mode,
            timeout,
            base_dir: None,
        })
    }

    /// The `[remote]` table of a config file; `None` when the file does not exist.
    pub fn from_file(path: &Path) -> Result<Option<Self>, RemoteError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RemoteError::ConfigIo {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_toml(path, &text).map(Some)
    }

    fn from_toml(path: &Path, text: &str) -> Result<Self, RemoteError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| RemoteError::Config {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let Some(section) = file.remote else {
            return Ok(Self::default());
        };
        let mode = match &section.mode {
            Some(m) => Some(m.parse::<RemoteMode>().map_err(|_| RemoteError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "[remote] mode = {m:?} is unknown; known modes: {}",
                    RemoteMode::NAMES.join(", ")
                ),
            })?),
            None => None,
        };
        Ok(Self {
            origin: section.url.as_ref().map(|_| path.display().to_string()),
            url: section.url,
            mode,
            timeout: section.timeout_secs.map(Duration::from_secs),
            base_dir: path.parent().map(Path::to_path_buf),
        })
    }

    /// These settings, with those this one leaves unset taken from `lower`.
    pub fn or(self, lower: RemoteConfig) -> RemoteConfig {
        let (url, base_dir, origin) = if self.url.is_some() {
            (self.url, self.base_dir, self.origin)
        } else {
            (lower.url, lower.base_dir, lower.origin)
        };
        RemoteConfig {
            url,
            mode: self.mode.or(lower.mode),
            timeout: self.timeout.or(lower.timeout),
            base_dir,
            origin,
        }
    }

    /// The mode in force: `read-write` when a URL is set and no mode is, `off` without a URL.
    pub fn effective_mode(&self) -> RemoteMode {
        match (&self.url, self.mode) {
            (None, _) => RemoteMode::Off,
            (Some(_), Some(mode)) => mode,
            (Some(_), None) => RemoteMode::ReadWrite,
        }
    }
}

fn parse_timeout(text: &str) -> Option<Duration> {
    let t = text.trim().trim_end_matches('s');
    let secs: f64 = t.parse().ok()?;
    (secs.is_finite() && secs > 0.0 && secs <= 3600.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    #[test]
    fn locations_parse_and_refuse_what_they_cannot_serve() {
        assert_eq!(
            RemoteLocation::parse("s3://team-cache/a//b/", None).unwrap(),
            RemoteLocation::S3 {
                bucket: "team-cache".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            RemoteLocation::parse("file:///nfs/cache", None).unwrap(),
            RemoteLocation::Directory("/nfs/cache".into())
        );
        assert_eq!(
            RemoteLocation::parse("shared", Some(Path::new("/proj"))).unwrap(),
            RemoteLocation::Directory("/proj/shared".into())
        );
        let err = RemoteLocation::parse("s3://AKIA:hunter2@bucket/p", None).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            !text.contains("hunter2"),
            "a secret in a URL is not echoed: {text}"
        );
        assert!(matches!(
            RemoteLocation::parse("gs://bucket", None),
            Err(RemoteError::BadUrl { .. })
        ));
        assert!(RemoteLocation::parse("s3://b/../x", None).is_err());
        assert!(RemoteLocation::parse("file://relative", None).is_err());
    }

    #[test]
    fn modes_parse_and_unknown_ones_name_the_known() {
        assert_eq!(
            "read-only".parse::<RemoteMode>().unwrap(),
            RemoteMode::ReadOnly
        );
        assert_eq!("OFF".parse::<RemoteMode>().unwrap(), RemoteMode::Off);
        let err = "write".parse::<RemoteMode>().unwrap_err();
        assert!(err.hint().unwrap_or_default().contains("read-write"));
    }

    #[test]
    fn layers_take_each_field_from_the_first_source_that_sets_it() {
        let flags = RemoteConfig {
            mode: Some(RemoteMode::ReadOnly),
            ..Default::default()
        };
        let env = RemoteConfig::from_vars(|name| match name {
            ENV_URL => Some("s3://env-bucket".into()),
            ENV_TIMEOUT => Some("2.5".into()),
            _ => None,
        })
        .unwrap();
        let file = RemoteConfig::from_toml(
            Path::new("/proj/autoscale.toml"),
            "[remote]\nurl = \"shared\"\nmode = \"off\"\ntimeout_secs = 9\n",
        )
        .unwrap();
        let merged = flags.or(env).or(file.clone());
        assert_eq!(merged.url.as_deref(), Some("s3://env-bucket"));
        assert_eq!(merged.origin.as_deref(), Some(ENV_URL));
        assert_eq!(merged.mode, Some(RemoteMode::ReadOnly));
        assert_eq!(merged.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(file.effective_mode(), RemoteMode::Off);
        assert_eq!(file.base_dir.as_deref(), Some(Path::new("/proj")));
        assert_eq!(RemoteConfig::default().effective_mode(), RemoteMode::Off);
    }

    #[test]
    fn config_file_errors_name_the_file_and_line() {
        let err = RemoteConfig::from_toml(
            Path::new("autoscale.toml"),
            "[remote]\nurl = \"s3://b\"\nmdoe = \"off\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("autoscale.toml"), "{text}");
        assert!(text.contains("mdoe") && text.contains("line 3"), "{text}");
        let err = RemoteConfig::from_toml(Path::new("a.toml"), "[remote]\nmode = \"sometimes\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        assert!(RemoteConfig::from_vars(|n| (n == ENV_TIMEOUT).then(|| "soon".into())).is_err());
    }
}
