//! The data stages, from raw files to tokenized shards, run in-process:
//!
//! | kind | reads | writes |
//! |---|---|---|
//! | `download` | `sources` (https, http, `file://`, local paths) | each source under its `path`, `sources.json` |
//! | `prepare` | one domain's raw documents (RedPajama JSONL, `.zst`/`.gz`, or text files) | `train.jsonl`, `val.jsonl`, `stats.json` |
//! | `tokenizer` | prepared domains (a seeded sample of `train.jsonl`), or nothing for `gpt2` | `tokenizer.json`, `info.json` |
//! | `shard` | prepared domains and a tokenizer | `<domain>/<split>/shard-NNNNN.arrow`, `manifest.json` |
//!
//! One `prepare` and one `shard` stage per domain (a `foreach` over the domains) keeps each
//! domain under its own key, its input a path inside the corpus (`corpus/${item}.jsonl`):
//!
//! ```yaml
//! - {id: corpus, kind: download, params: {sources: [raw/books.jsonl, raw/web.jsonl]}}
//! - id: prepare
//!   kind: prepare
//!   foreach: [books, web]
//!   inputs: {source: "corpus/${item}.jsonl"}
//!   params: {holdout: {books: tail}}
//! - {id: tokenizer, kind: tokenizer, inputs: {docs: prepare}, params: {vocab_size: 8192}}
//! - id: shard
//!   kind: shard
//!   foreach: [books, web]
//!   inputs: {docs: "prepare[${item}]", tokenizer: tokenizer}
//! ```
//!
//! A new vocab size reruns the tokenizer and the shards, neither the download nor `prepare`. A
//! change to one domain's source reruns the download (its source list changed) and that
//! domain's `prepare`; with a fixed tokenizer (`method: gpt2`) only that domain's shards follow.
//! A BPE trained on the domains retrains, and a new tokenizer means new ids in every domain.
//! Every output is a deterministic function of the inputs and params (no timings, no host
//! names), so a rerun that writes the same bytes leaves the stages below it cached.

mod docs;
mod download;
mod encode;
mod error;
mod gpt2;
mod prepare;
mod shard;
mod tokenizer;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use autoscale_engine::{InputPath, StageContext};
use serde_json::{Map, Value};

pub use download::DownloadKind;
pub use error::DataError;
pub use prepare::PrepareKind;
pub use shard::{ShardKind, ShardManifest, SplitStats};
pub use tokenizer::{ENDOFTEXT, TokenizerKind};

/// Reads a param, or its default when absent; a wrong type is an error, though the engine has
/// usually caught it already.
fn int_param(params: &Map<String, Value>, name: &str, default: u64) -> Result<u64, DataError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().ok_or_else(|| DataError::Param {
            name: name.into(),
            message: format!("must be a whole number >= 0, not `{v}`"),
        }),
    }
}

fn float_param(params: &Map<String, Value>, name: &str, default: f64) -> Result<f64, DataError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| DataError::Param {
                name: name.into(),
                message: format!("must be a number, not `{v}`"),
            }),
    }
}

fn str_param<'a>(
    params: &'a Map<String, Value>,
    name: &str,
    default: &'a str,
) -> Result<&'a str, DataError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_str().ok_or_else(|| DataError::Param {
            name: name.into(),
            message: format!("must be a string, not `{v}`"),
        }),
    }
}

fn bool_param(params: &Map<String, Value>, name: &str, default: bool) -> Result<bool, DataError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| DataError::Param {
            name: name.into(),
            message: format!("must be true or false, not `{v}`"),
        }),
    }
}

/// One of `allowed`, or an error listing them.
fn choice_param<'a>(
    params: &'a Map<String, Value>,
    name: &str,
    allowed: &[&'a str],
) -> Result<&'a str, DataError> {
    let value = str_param(params, name, allowed[0])?;
    allowed
        .iter()
        .find(|a| **a == value)
        .copied()
        .ok_or_else(|| DataError::Param {
            name: name.into(),
            message: format!(
                "must be one of {}, not `{value}`",
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// The input `name`, which must be one path.
fn one_input(ctx: &StageContext<'_>, name: &'static str) -> Result<PathBuf, DataError> {
    match ctx.inputs.get(name) {
        Some(InputPath::One(p)) => Ok(p.clone()),
        Some(InputPath::Many(_)) => Err(DataError::Input {
            name,
            message: "is a fanned-out stage; name one of its children, e.g. `stage[a]`".into(),
        }),
        None => Err(DataError::Input {
            name,
            message: "is missing".into(),
        }),
    }
}

/// The domain a fan-out child stands for: `prepare[books]` is `books`; an id without brackets
/// is itself.
fn domain_of(id: &str) -> &str {
    match (id.find('['), id.rfind(']')) {
        (Some(open), Some(close)) if close > open => &id[open + 1..close],
        _ => id,
    }
}

/// Prepared domains handed to `tokenizer` or `shard`: a fanned-out `prepare` (one directory per
/// child), or one directory that is itself a prepared domain (`train.jsonl` inside) or holds
/// one per subdirectory. Sorted by domain.
fn prepared_domains(
    input: &InputPath,
    name: &'static str,
    single: &str,
) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut domains: Vec<(String, PathBuf)> = match input {
        InputPath::Many(members) => members
            .iter()
            .map(|(id, dir)| (domain_of(id).to_string(), dir.clone()))
            .collect(),
        InputPath::One(dir) if dir.join(prepare::TRAIN_FILE).is_file() => {
            vec![(single.to_string(), dir.clone())]
        }
        InputPath::One(dir) => {
            let entries = fs::read_dir(dir).map_err(|source| DataError::Read {
                path: dir.clone(),
                source,
            })?;
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| DataError::Read {
                    path: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                if path.join(prepare::TRAIN_FILE).is_file() {
                    found.push((entry.file_name().to_string_lossy().into_owned(), path));
                }
            }
            found
        }
    };
    if domains.is_empty() {
        return Err(DataError::Input {
            name,
            message: format!(
                "holds no prepared domain (a directory with `{}`)",
                prepare::TRAIN_FILE
            ),
        });
    }
    domains.sort();
    if let Some(w) = domains.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(DataError::Input {
            name,
            message: format!("names the domain `{}` twice", w[0].0),
        });
    }
    Ok(domains)
}

/// A file written whole: a buffered writer that must be finished, so a write error is never
/// lost in a drop.
struct OutFile {
    path: PathBuf,
    out: BufWriter<fs::File>,
}

impl OutFile {
    fn create(path: &Path) -> Result<Self, DataError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| DataError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let file = fs::File::create(path).map_err(|source| DataError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), DataError> {
        self.out
            .write_all(bytes)
            .map_err(|source| DataError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// One `{"text": ...}` line.
    fn write_doc(&mut self, text: &str) -> Result<(), DataError> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            text: &'a str,
        }
        let mut line = serde_json::to_vec(&Line { text })
            .map_err(|e| DataError::Internal(format!("cannot encode a document as JSON: {e}")))?;
        line.push(b'\n');
        self.write_all(&line)
    }

    fn finish(self) -> Result<(), DataError> {
        let path = self.path;
        self.out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_data())
            .map_err(|source| DataError::Write { path, source })
    }
}

/// `value` as pretty JSON in `path`.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), DataError> {
    let mut text = serde_json::to_vec_pretty(value)
        .map_err(|e| DataError::Internal(format!("cannot encode JSON: {e}")))?;
    text.push(b'\n');
    let mut out = OutFile::create(path)?;
    out.write_all(&text)?;
    out.finish()
}

/// A small seeded generator (splitmix64): sampling and windows must not depend on a crate's
/// idea of randomness, which may change between versions and would change cached outputs.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, by rejection so it is exact; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_of_takes_the_fanout_value() {
        assert_eq!(domain_of("prepare[books]"), "books");
        assert_eq!(domain_of("prepare"), "prepare");
    }

    #[test]
    fn splitmix_is_seeded_and_below_stays_below() {
        let a: Vec<u64> = (0..4)
            .scan(SplitMix64::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(SplitMix64::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], SplitMix64::new(8).next_u64());
        let mut r = SplitMix64::new(1);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = r.below(5);
            assert!(x < 5);
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "every value comes up: {seen:?}");
    }

    #[test]
    fn a_wrong_choice_lists_the_allowed_ones() {
        let params: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"block": "middle"})).expect("map");
        let err = choice_param(&params, "block", &["first", "random"])
            .expect_err("middle is not allowed")
            .to_string();
        assert!(err.contains("`first`, `random`"), "{err}");
    }
}
