//! `prepare`: one domain's raw documents become training and held-out text, with the paper's
//! recipe (Kang et al. keep documents of at least 1000 characters and cut one 1000-character
//! block from each):
//!
//! 1. lossy UTF-8 cleaning (see [`super::docs`]);
//! 2. documents shorter than `min_chars` characters are dropped;
//! 3. exact duplicates are dropped by a 128-bit blake3 hash of the cleaned text, and so are
//!    documents whose block duplicates an earlier block (licence headers in code, say);
//! 4. one block of `block_chars` characters is cut from each document: the first window, or
//!    one at a seeded random offset (`block: random`); `block_chars: 0` keeps documents whole;
//! 5. the held-out set is fixed per domain and never reweighted later:
//!    - `holdout: docs` (default): the `k` documents with the smallest hashes, where
//!      `k = min(val_max_docs, round(val_fraction * kept))`, at least one when two or more
//!      documents are kept. The hash is of the whole cleaned document, so the split does not
//!      move when the block, the seed or other documents change;
//!    - `holdout: tail`, for a domain with few long documents (books): each document's last
//!      `val_fraction` of characters is held out and its block cut from the rest.
//!
//! Outputs: `train.jsonl` and `val.jsonl` (`{"text": ...}` per line, in source order) and
//! `stats.json`. Memory: one document at a time, plus 32 bytes per kept document for the
//! duplicate check (document and block hashes) (`dedup: false` drops it); the kept blocks wait in a scratch file between
//! the two passes.

use std::collections::{BinaryHeap, HashSet};
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use autoscale_engine::{Implementation, ParamSpec, ParamType, StageContext, StageError, StageKind};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::docs::{Format, ReadOptions, for_each_doc, source_files};
use super::{
    DataError, OutFile, SplitMix64, bool_param, choice_param, domain_of, float_param, int_param,
    one_input, str_param, write_json,
};

pub(crate) const TRAIN_FILE: &str = "train.jsonl";
pub(crate) const VAL_FILE: &str = "val.jsonl";
pub(crate) const STATS_FILE: &str = "stats.json";

pub struct PrepareKind;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "format",
        ParamType::String,
        "auto (by file name: .jsonl/.ndjson, .txt; each optionally .zst/.gz), jsonl or text [default: auto]",
    ),
    ParamSpec::optional(
        "text_field",
        ParamType::String,
        "the JSON field with the text [default: text]",
    ),
    ParamSpec::optional(
        "separator",
        ParamType::String,
        "splits text files into documents [default: one document per file]",
    ),
    ParamSpec::optional(
        "min_chars",
        ParamType::Int,
        "drop documents shorter than this many characters [default: 1000]",
    ),
    ParamSpec::optional(
        "block_chars",
        ParamType::Int,
        "cut one block of this many characters from each document; 0 keeps it whole [default: 1000]",
    ),
    ParamSpec::optional(
        "block",
        ParamType::String,
        "first (the first window) or random (a seeded random window) [default: first]",
    ),
    ParamSpec::optional(
        "seed",
        ParamType::Int,
        "seed of the random windows [default: 0]",
    ),
    ParamSpec::optional(
        "holdout",
        ParamType::Any,
        "docs (hold out whole documents by hash) or tail (each document's tail; for books), or a map domain: docs|tail, e.g. {books: tail} [default: docs]",
    ),
    ParamSpec::optional(
        "domain",
        ParamType::String,
        "the domain, for a `holdout` map [default: the stage id's fan-out value, `prepare[books]` -> books]",
    ),
    ParamSpec::optional(
        "val_fraction",
        ParamType::Float,
        "fraction held out: of documents (docs) or of each document's characters (tail) [default: 0.01]",
    ),
    ParamSpec::optional(
        "val_max_docs",
        ParamType::Int,
        "at most this many held-out documents (docs) [default: 10000]",
    ),
    ParamSpec::optional(
        "dedup",
        ParamType::Bool,
        "drop exact duplicates [default: true]",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Holdout {
    Docs,
    Tail,
}

#[derive(Debug, Clone)]
struct PrepareConfig {
    read: ReadOptions,
    min_chars: usize,
    block_chars: usize,
    random_block: bool,
    seed: u64,
    holdout: Holdout,
    val_fraction: f64,
    val_max_docs: u64,
    dedup: bool,
}

impl PrepareConfig {
    /// `domain` picks the entry of a `holdout` map; `None` only checks the map.
    fn from_params(params: &Map<String, Value>, domain: Option<&str>) -> Result<Self, DataError> {
        let format = choice_param(params, "format", &Format::NAMES)?;
        let val_fraction = float_param(params, "val_fraction", 0.01)?;
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(DataError::Param {
                name: "val_fraction".into(),
                message: format!("must be between 0 and 1 (exclusive), not {val_fraction}"),
            });
        }
        let separator = match params.get("separator") {
            None | Some(Value::Null) => None,
            Some(_) => Some(str_param(params, "separator", "")?.to_string()),
        };
        if separator.as_deref() == Some("") {
            return Err(DataError::Param {
                name: "separator".into(),
                message: "must not be empty".into(),
            });
        }
        Ok(Self {
            read: ReadOptions {
                format: Format::parse(format).unwrap_or(Format::Auto),
                text_field: str_param(params, "text_field", "text")?.to_string(),
                separator,
            },
            min_chars: usize_param(params, "min_chars", 1000)?,
            block_chars: usize_param(params, "block_chars", 1000)?,
            random_block: choice_param(params, "block", &["first", "random"])? == "random",
            seed: int_param(params, "seed", 0)?,
            holdout: holdout(params, domain)?,
            val_fraction,
            val_max_docs: int_param(params, "val_max_docs", 10_000)?,
            dedup: bool_param(params, "dedup", true)?,
        })
    }
}

/// `holdout`: a mode, or a map from domain to mode (unlisted domains: docs).
fn holdout(params: &Map<String, Value>, domain: Option<&str>) -> Result<Holdout, DataError> {
    let parse = |v: &Value| match v.as_str() {
        Some("docs") => Ok(Holdout::Docs),
        Some("tail") => Ok(Holdout::Tail),
        _ => Err(DataError::Param {
            name: "holdout".into(),
            message: format!("must be `docs`, `tail` or a map of them by domain, not `{v}`"),
        }),
    };
    match params.get("holdout") {
        None | Some(Value::Null) => Ok(Holdout::Docs),
        Some(Value::Object(by_domain)) => {
            for mode in by_domain.values() {
                parse(mode)?;
            }
            domain
                .and_then(|d| by_domain.get(d))
                .map_or(Ok(Holdout::Docs), parse)
        }
        Some(mode) => parse(mode),
    }
}

fn usize_param(params: &Map<String, Value>, name: &str, default: u64) -> Result<usize, DataError> {
    let n = int_param(params, name, default)?;
    usize::try_from(n).map_err(|_| DataError::Param {
        name: name.into(),
        message: format!("is too large: {n}"),
    })
}

/// Documents, characters and UTF-8 bytes of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct SplitCount {
    pub docs: u64,
    pub chars: u64,
    pub bytes: u64,
}

impl SplitCount {
    fn add(&mut self, text: &str) {
        self.docs += 1;
        self.chars += text.chars().count() as u64;
        self.bytes += text.len() as u64;
    }
}

/// `stats.json`: what happened to the domain's documents. Deterministic: no timings.
#[derive(Debug, Clone, Default, Serialize)]
struct PrepareStats {
    docs_read: u64,
    /// Documents that had bytes that were not UTF-8, or NULs.
    cleaned: u64,
    too_short: u64,
    duplicates: u64,
    duplicate_blocks: u64,
    kept: u64,
    holdout: Option<Holdout>,
    train: SplitCount,
    val: SplitCount,
}

impl StageKind for PrepareKind {
    fn name(&self) -> &'static str {
        "prepare"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::PREPARE
    }

    fn summary(&self) -> &'static str {
        "cleans, filters, deduplicates and blocks one domain's documents; fixed held-out split"
    }

    fn params(&self) -> &[ParamSpec] {
        PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        PrepareConfig::from_params(params, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let domain = str_param(ctx.params, "domain", domain_of(ctx.stage_id))?;
        let config = PrepareConfig::from_params(ctx.params, Some(domain))?;
        let source = one_input(ctx, "source")?;
        let started = Instant::now();
        let stats = prepare(ctx, &source, &config)?;
        let mut meta = serde_json::to_value(&stats).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut meta {
            m.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
        }
        Ok(meta)
    }
}

/// 128 bits of blake3: plenty to tell documents apart, small enough to keep one per document.
fn hash128(text: &str) -> u128 {
    let digest = blake3::hash(text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_bytes()[..16]);
    u128::from_le_bytes(bytes)
}

/// Characters `start..start + len` of `text` (to its end when `len` is `None`, clamped).
fn char_range(text: &str, start: usize, len: Option<usize>) -> &str {
    let mut indices = text.char_indices().map(|(i, _)| i).chain([text.len()]);
    let from = indices.nth(start).unwrap_or(text.len());
    let to = match len {
        None => text.len(),
        Some(0) => from,
        Some(n) => indices.nth(n - 1).unwrap_or(text.len()),
    };
    &text[from..to]
}

/// One block of `config.block_chars` characters of `text` (which has `chars` characters).
fn block<'t>(text: &'t str, chars: usize, hash: u128, config: &PrepareConfig) -> &'t str {
    let len = config.block_chars;
    if len == 0 || chars <= len {
        return text;
    }
    let start = if config.random_block {
        // Seeded per document, so one document's window does not depend on the others.
        let mut rng = SplitMix64::new(config.seed ^ (hash as u64) ^ ((hash >> 64) as u64));
        rng.below((chars - len + 1) as u64) as usize
    } else {
        0
    };
    char_range(text, start, Some(len))
}

/// The scratch file between the passes: per kept document, its hash, its training text and
/// (tail hold-out) its held-out text.
struct Spool {
    out: BufWriter<fs::File>,
    path: std::path::PathBuf,
}

impl Spool {
    fn write(&mut self, hash: u128, train: &str, val: &str) -> Result<(), DataError> {
        let err = |source| DataError::Write {
            path: self.path.clone(),
            source,
        };
        let mut put = |bytes: &[u8]| self.out.write_all(bytes);
        put(&hash.to_le_bytes()).map_err(err)?;
        for text in [train, val] {
            put(&(text.len() as u64).to_le_bytes()).map_err(err)?;
            put(text.as_bytes()).map_err(err)?;
        }
        Ok(())
    }
}

fn read_record(
    reader: &mut impl Read,
    path: &Path,
) -> Result<Option<(u128, String, String)>, DataError> {
    let err = |source| DataError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut hash = [0u8; 16];
    match reader.read_exact(&mut hash) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    let mut texts = [String::new(), String::new()];
    for text in &mut texts {
        let mut len = [0u8; 8];
        reader.read_exact(&mut len).map_err(err)?;
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        reader.read_exact(&mut bytes).map_err(err)?;
        *text = String::from_utf8(bytes).map_err(|e| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })?;
    }
    let [train, val] = texts;
    Ok(Some((u128::from_le_bytes(hash), train, val)))
}

fn prepare(
    ctx: &StageContext<'_>,
    source: &Path,
    config: &PrepareConfig,
) -> Result<PrepareStats, DataError> {
    let files = source_files(source, config.read.format)?;
    fs::create_dir_all(&ctx.scratch_dir).map_err(|source| DataError::Write {
        path: ctx.scratch_dir.clone(),
        source,
    })?;
    let spool_path = ctx.scratch_dir.join("prepare.spool");
    let spool_file = fs::File::create(&spool_path).map_err(|source| DataError::Write {
        path: spool_path.clone(),
        source,
    })?;
    let mut spool = Spool {
        out: BufWriter::with_capacity(1 << 20, spool_file),
        path: spool_path.clone(),
    };
    let mut stats = PrepareStats {
        holdout: Some(config.holdout),
        ..PrepareStats::default()
    };
    let mut seen: HashSet<u128> = HashSet::new();
    // The `val_max_docs` smallest hashes: the held-out set is among them.
    let mut smallest: BinaryHeap<u128> = BinaryHeap::new();
    let mut last_progress = Instant::now();

    for_each_doc(&files, &config.read, |doc| {
        stats.docs_read += 1;
        stats.cleaned += u64::from(doc.cleaned);
        if stats.docs_read.is_multiple_of(1024) {
            if ctx.cancelled() {
                return Err(DataError::Cancelled);
            }
            if last_progress.elapsed().as_secs_f64() > 1.0 {
                (ctx.progress)(json!({"docs_read": stats.docs_read, "kept": stats.kept}));
                last_progress = Instant::now();
            }
        }
        let text = doc.text;
        let chars = text.chars().count();
        if chars < config.min_chars {
            stats.too_short += 1;
            return Ok(());
        }
        let hash = hash128(&text);
        if config.dedup && !seen.insert(hash) {
            stats.duplicates += 1;
            return Ok(());
        }
        let (train, val) = match config.holdout {
            Holdout::Docs => (block(&text, chars, hash, config), ""),
            Holdout::Tail => {
                let tail = ((chars as f64 * config.val_fraction).ceil() as usize).clamp(1, chars);
                let head = char_range(&text, 0, Some(chars - tail));
                let rest = char_range(&text, chars - tail, None);
                let val = if config.block_chars == 0 {
                    rest
                } else {
                    char_range(rest, 0, Some(config.block_chars))
                };
                (block(head, chars - tail, hash, config), val)
            }
        };
        // Blocks share the set, told apart from document hashes by the flipped bit.
        let block_hash = if train.len() == text.len() {
            hash
        } else {
            hash128(train)
        } ^ 1;
        if config.dedup && !seen.insert(block_hash) {
            stats.duplicate_blocks += 1;
            return Ok(());
        }
        stats.kept += 1;
        if config.holdout == Holdout::Docs && config.val_max_docs > 0 {
            smallest.push(hash);
            if smallest.len() as u64 > config.val_max_docs {
                smallest.pop();
            }
        }
        spool.write(hash, train, val)
    })?;
    drop(seen);
    spool
        .out
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_data())
        .map_err(|source| DataError::Write {
            path: spool_path.clone(),
            source,
        })?;
    if stats.kept == 0 {
        return Err(DataError::Input {
            name: "source",
            message: format!(
                "has no document of at least {} characters ({} read, {} too short, {} duplicates) under `{}`",
                config.min_chars,
                stats.docs_read,
                stats.too_short,
                stats.duplicates,
                source.display()
            ),
        });
    }

    // Held out: hashes up to the k-th smallest.
    let threshold = match config.holdout {
        Holdout::Tail => None,
        Holdout::Docs => {
            let k = if stats.kept < 2 {
                0
            } else {
                ((stats.kept as f64 * config.val_fraction).round() as u64)
                    .clamp(1, config.val_max_docs.max(1))
                    .min(config.val_max_docs)
            };
            let sorted = smallest.into_sorted_vec();
            (k as usize)
                .checked_sub(1)
                .and_then(|i| sorted.get(i).copied())
        }
    };

    let mut train_out = OutFile::create(&ctx.out_dir.join(TRAIN_FILE))?;
    let mut val_out = OutFile::create(&ctx.out_dir.join(VAL_FILE))?;
    let spool_file = fs::File::open(&spool_path).map_err(|source| DataError::Read {
        path: spool_path.clone(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(1 << 20, spool_file);
    while let Some((hash, train, val)) = read_record(&mut reader, &spool_path)? {
        let held_out = threshold.is_some_and(|t| hash <= t);
        if held_out {
            val_out.write_doc(&train)?;
            stats.val.add(&train);
        } else {
            train_out.write_doc(&train)?;
            stats.train.add(&train);
        }
        if !val.is_empty() {
            val_out.write_doc(&val)?;
            stats.val.add(&val);
        }
    }
    train_out.finish()?;
    val_out.finish()?;
    // A leftover spool would only cost disk: the engine removes scratch once the stage commits.
    let _ = fs::remove_file(&spool_path);
    write_json(&ctx.out_dir.join(STATS_FILE), &stats)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use autoscale_engine::InputPath;

    use super::*;
    use crate::data::test_support::{Harness, fixture, params, read_docs};

    #[test]
    fn char_range_counts_characters_not_bytes() {
        assert_eq!(char_range("héllo wörld", 1, Some(4)), "éllo");
        assert_eq!(char_range("héllo", 3, None), "lo");
        assert_eq!(char_range("héllo", 3, Some(0)), "");
        assert_eq!(char_range("abc", 2, Some(10)), "c");
        assert_eq!(char_range("abc", 5, Some(1)), "");
    }

    #[test]
    fn the_fixture_domain_is_filtered_blocked_and_split_by_hash() {
        let h = Harness::new();
        let p = params(json!({"min_chars": 1000, "block_chars": 1000, "val_fraction": 0.1}));
        let out = h.run_one(&PrepareKind, &p, &[("source", fixture("wikipedia.jsonl"))]);
        let stats: Value =
            serde_json::from_str(&fs::read_to_string(out.join(STATS_FILE)).expect("stats.json"))
                .expect("json");
        let train = read_docs(&out.join(TRAIN_FILE));
        let val = read_docs(&out.join(VAL_FILE));
        assert!(stats["docs_read"].as_u64().expect("docs_read") >= 150);
        assert_eq!(
            stats["kept"].as_u64(),
            Some((train.len() + val.len()) as u64)
        );
        // round(0.1 * kept) documents held out.
        let kept = train.len() + val.len();
        assert_eq!(val.len(), ((kept as f64) * 0.1).round() as usize);
        for doc in train.iter().chain(&val) {
            assert_eq!(doc.chars().count(), 1000, "every block is 1000 characters");
        }
        let train_hashes: HashSet<u128> = train.iter().map(|d| hash128(d)).collect();
        assert!(val.iter().all(|d| !train_hashes.contains(&hash128(d))));
    }

    #[test]
    fn the_split_is_stable_when_other_documents_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let docs: Vec<String> = (0..200)
            .map(|i| format!("document {i} {}", "x".repeat(50)))
            .collect();
        let write = |name: &str, docs: &[String]| {
            let path = dir.path().join(name);
            let lines: String = docs
                .iter()
                .map(|d| format!("{}\n", json!({"text": d})))
                .collect();
            fs::write(&path, lines).expect("write");
            path
        };
        let all = write("all.jsonl", &docs);
        let h = Harness::new();
        let p = params(json!({"min_chars": 10, "block_chars": 0, "val_fraction": 0.05}));
        let val_all: HashSet<String> = read_docs(
            &h.run_one(&PrepareKind, &p, &[("source", all)])
                .join(VAL_FILE),
        )
        .into_iter()
        .collect();
        assert_eq!(val_all.len(), 10);
        // Add 100 more documents: the old held-out documents stay held out unless displaced
        // by a new one with a smaller hash; none moves into training for any other reason.
        let mut more = docs.clone();
        more.extend((200..300).map(|i| format!("document {i} {}", "x".repeat(50))));
        let bigger = write("more.jsonl", &more);
        let h2 = Harness::new();
        let val_more: Vec<String> = read_docs(
            &h2.run_one(&PrepareKind, &p, &[("source", bigger)])
                .join(VAL_FILE),
        );
        assert_eq!(val_more.len(), 15);
        let max_new = val_more.iter().map(|d| hash128(d)).max().expect("val");
        for d in &val_all {
            assert_eq!(
                val_more.contains(d),
                hash128(d) <= max_new,
                "held-out membership is decided by hash alone"
            );
        }
    }

    #[test]
    fn duplicates_short_documents_and_duplicate_blocks_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let header = "Copyright notice. ".repeat(10);
        let lines = [
            json!({"text": "short"}),
            json!({"text": format!("{header} alpha")}),
            json!({"text": format!("{header} alpha")}),
            json!({"text": format!("{header} beta")}),
            json!({"text": "a distinct document that is long enough to keep it"}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let path = dir.path().join("d.jsonl");
        fs::write(&path, text).expect("write");
        let h = Harness::new();
        let p = params(json!({"min_chars": 20, "block_chars": 100, "val_fraction": 0.3}));
        let out = h.run_one(&PrepareKind, &p, &[("source", path)]);
        let stats: Value =
            serde_json::from_str(&fs::read_to_string(out.join(STATS_FILE)).expect("stats"))
                .expect("json");
        assert_eq!(stats["too_short"], 1);
        assert_eq!(stats["duplicates"], 1, "the second alpha");
        assert_eq!(
            stats["duplicate_blocks"], 1,
            "beta's first 100 characters are alpha's"
        );
        assert_eq!(stats["kept"], 2);
        assert_eq!(stats["train"]["docs"], 1);
        assert_eq!(stats["val"]["docs"], 1);
    }

    #[test]
    fn random_blocks_are_seeded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text: String = (0..40)
            .map(|i| {
                format!(
                    "{}\n",
                    json!({"text": format!("{i:03} {}", "abcdefghij".repeat(30))})
                )
            })
            .collect();
        let path = dir.path().join("r.jsonl");
        fs::write(&path, text).expect("write");
        let run = |seed: u64| {
            let h = Harness::new();
            let p = params(
                json!({"min_chars": 10, "block_chars": 50, "block": "random", "seed": seed, "val_fraction": 0.1}),
            );
            let out = h.run_one(&PrepareKind, &p, &[("source", path.clone())]);
            read_docs(&out.join(TRAIN_FILE))
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a, b, "same seed, same windows");
        assert_ne!(a, c, "another seed moves the windows");
        assert!(a.iter().all(|d| d.chars().count() == 50));
        assert!(
            a.iter().any(|d| !d.starts_with(char::is_numeric)),
            "some windows do not start at the beginning"
        );
    }

    #[test]
    fn books_hold_out_the_tail_of_each_document() {
        let h = Harness::new();
        // The map form, as a `foreach` over all domains uses it; the domain is the stage id's.
        let p =
            params(json!({"holdout": {"books": "tail"}, "block_chars": 0, "val_fraction": 0.1}));
        let inputs =
            BTreeMap::from([("source".to_string(), InputPath::One(fixture("books.jsonl")))]);
        let (out, meta) = h
            .run_inputs(&PrepareKind, &p, inputs, "prepare[books]")
            .expect("prepare books");
        assert_eq!(meta["holdout"], "tail");
        let train = read_docs(&out.join(TRAIN_FILE));
        let val = read_docs(&out.join(VAL_FILE));
        let source = read_docs(&fixture("books.jsonl"));
        assert_eq!(train.len(), source.len());
        assert_eq!(val.len(), source.len(), "one tail per book");
        for ((head, tail), whole) in train.iter().zip(&val).zip(&source) {
            assert_eq!(format!("{head}{tail}"), *whole);
            let share = tail.chars().count() as f64 / whole.chars().count() as f64;
            assert!((0.09..0.11).contains(&share), "tail share {share}");
        }
    }

    #[test]
    fn plain_text_with_a_separator_and_an_empty_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("a.txt"),
            format!("{}\n<doc>\n{}", "x".repeat(30), "y".repeat(30)),
        )
        .expect("write");
        let h = Harness::new();
        let p = params(
            json!({"separator": "\n<doc>\n", "min_chars": 30, "block_chars": 0, "val_fraction": 0.5}),
        );
        let out = h.run_one(&PrepareKind, &p, &[("source", dir.path().to_path_buf())]);
        assert_eq!(read_docs(&out.join(TRAIN_FILE)).len(), 1);
        assert_eq!(read_docs(&out.join(VAL_FILE)).len(), 1);

        let h = Harness::new();
        let p = params(json!({"min_chars": 5000}));
        let err = h
            .run(&PrepareKind, &p, &[("source", dir.path().to_path_buf())])
            .expect_err("nothing is long enough");
        assert!(
            err.to_string()
                .contains("no document of at least 5000 characters"),
            "{err}"
        );
    }

    #[test]
    fn bad_params_are_refused_before_running() {
        for (p, needle) in [
            (json!({"val_fraction": 1.5}), "between 0 and 1"),
            (json!({"block": "middle"}), "`first`, `random`"),
            (json!({"format": "csv"}), "`auto`, `jsonl`, `text`"),
            (json!({"separator": ""}), "must not be empty"),
            (
                json!({"holdout": {"books": "end"}}),
                "must be `docs`, `tail`",
            ),
        ] {
            let err = PrepareKind.check(&params(p)).expect_err("refused");
            assert!(err.contains(needle), "{err}");
        }
    }
}
