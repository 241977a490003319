//! `shard`: prepared documents become token ids in Arrow IPC files.
//!
//! Per domain and split (`train`, `val`), documents are encoded in order, each followed by the
//! end-of-text token, and the token stream is cut into shards of exactly `shard_tokens` tokens
//! (the last one shorter; a document may continue in the next shard). Layout:
//!
//! ```text
//! <out>/manifest.json                       tokens, documents, bytes per domain and split,
//!                                           the tokenizer's digest, every shard file
//! <out>/<domain>/<split>/shard-00000.arrow  Arrow IPC stream, uncompressed buffers,
//!                                           one column `token` (uint16 when the vocabulary
//!                                           fits, else uint32), record batches of <= 1 Mi tokens
//! ```
//!
//! Text that spells `<|endoftext|>` is encoded as text (HF `encode_special_tokens`), so the
//! end-of-text id marks real document ends only.
//!
//! The stream format is what `pyarrow.ipc.open_stream` and HF `datasets.Dataset.from_file`
//! read. Buffers are uncompressed so that the trainer reads windows of ids in place, with one
//! `pread` each, instead of decoding a whole selection first. The price is disk: zstd stored the
//! demo's shards (a 1,024-id vocabulary) in 2.7× less space; a larger vocabulary compresses less,
//! and a remote cache still compresses the blobs it stores where that saves a tenth.
//!
//! Memory is bounded: documents are read in batches of a few MiB, encoded in parallel with
//! rayon, and written out before the next batch is read.

use std::collections::BTreeMap;
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::docs::{FileFormat, ReadOptions, for_each_doc};
use super::encode::DocEncoder;
use super::tokenizer::{ENDOFTEXT, load};
use super::{DataError, domain_of, int_param, prepare, prepared_domains, str_param, write_json};
use arrow_array::{ArrayRef, RecordBatch, UInt16Array, UInt32Array};
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow_schema::{DataType, Field, Schema};
use autoscale_engine::{Implementation, ParamSpec, ParamType, StageContext, StageError, StageKind};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub(crate) const MANIFEST_FILE: &str = "manifest.json";
const SPLITS: [(&str, &str); 2] = [("train", prepare::TRAIN_FILE), ("val", prepare::VAL_FILE)];
/// Text per encode batch: enough to keep every core busy, small enough to stay flat.
const BATCH_BYTES: usize = 4 << 20;
/// Tokens per Arrow record batch.
const RECORD_TOKENS: u64 = 1 << 20;

pub struct ShardKind;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "shard_tokens",
        ParamType::Int,
        "tokens per shard file; the last one of a split is shorter [default: 67108864]",
    ),
    ParamSpec::optional(
        "domain",
        ParamType::String,
        "the domain's name when input `docs` is one prepared domain [default: the stage id's fan-out value, `shard[books]` -> books]",
    ),
];

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// `arrow-ipc-stream`.
    pub format: String,
    /// `none`: the ids are stored as they are, to be read in place.
    pub compression: String,
    /// The one column: `token`.
    pub column: String,
    /// `uint16` or `uint32`.
    pub dtype: String,
    pub shard_tokens: u64,
    pub eot: String,
    pub eot_id: u32,
    pub vocab_size: u32,
    /// blake3 of the `tokenizer.json` bytes.
    pub tokenizer_blake3: String,
    /// domain -> split -> counts.
    pub domains: BTreeMap<String, BTreeMap<String, SplitStats>>,
}

/// One split of one domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Tokens, end-of-text tokens included.
    pub tokens: u64,
    pub documents: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// Entropy in nats of the split's unigram token distribution, `-sum_t p_t ln p_t` over
    /// its own tokens: the loss of a model that learned only token frequencies. A trained
    /// model's held-out loss below it shows it learned more than that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unigram_entropy: Option<f64>,
    pub shards: Vec<ShardFile>,
}

/// Token counts of one split, for its unigram entropy.
#[derive(Default)]
struct UnigramCounts(Vec<u64>);

impl UnigramCounts {
    fn add(&mut self, ids: &[u32]) {
        for &id in ids {
            let i = id as usize;
            if i >= self.0.len() {
                self.0.resize(i + 1, 0);
            }
            self.0[i] += 1;
        }
    }

    /// `-sum_t p_t ln p_t` in nats; `None` for an empty split.
    fn entropy(&self) -> Option<f64> {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return None;
        }
        let n = total as f64;
        Some(
            -self
                .0
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n;
                    p * p.ln()
                })
                .sum::<f64>(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFile {
    /// Relative to the stage's output.
    pub file: String,
    pub tokens: u64,
    pub file_bytes: u64,
}

impl StageKind for ShardKind {
    fn name(&self) -> &'static str {
        "shard"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::SHARD
    }

    fn summary(&self) -> &'static str {
        "tokenizes prepared domains into Arrow IPC shards of fixed size (uncompressed, read in place by the trainer), with a manifest"
    }

    fn params(&self) -> &[ParamSpec] {
        PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        shard_tokens(params)
            .map(|_| ())
            .map_err(|e| e.to_string())?;
        let domain = str_param(params, "domain", "x").map_err(|e| e.to_string())?;
        if !valid_name(domain) {
            return Err(format!(
                "param `domain` must be letters, digits, `_`, `-` or `.`, not `{domain}`"
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let started = Instant::now();
        let shard_tokens = shard_tokens(ctx.params)?;
        let single = str_param(ctx.params, "domain", domain_of(ctx.stage_id))?.to_string();
        let docs = ctx.inputs.get("docs").ok_or(DataError::Input {
            name: "docs",
            message: "is missing: a `prepare` stage (or a fanned-out group of them)".into(),
        })?;
        let domains = prepared_domains(docs, "docs", &single)?;
        if let Some((bad, _)) = domains.iter().find(|(d, _)| !valid_name(d)) {
            return Err(DataError::Input {
                name: "docs",
                message: format!("gives the domain name `{bad}`, which cannot be a directory name; set param `domain`"),
            }
            .into());
        }
        let tokenizer_path = super::one_input(ctx, "tokenizer")?;
        let loaded = load(&tokenizer_path)?;
        let (mut tokenizer, digest) = (loaded.tokenizer, loaded.digest);
        // A document that spells `<|endoftext|>` must not fake a document boundary.
        tokenizer.set_encode_special_tokens(true);
        let eot_id = tokenizer
            .token_to_id(ENDOFTEXT)
            .ok_or_else(|| DataError::Tokenizer {
                path: tokenizer_path.clone(),
                message: format!("has no `{ENDOFTEXT}` token to put between documents"),
            })?;
        let vocab_size = tokenizer.get_vocab_size(true) as u32;
        let wide = vocab_size > u32::from(u16::MAX) + 1;
        let mut manifest = ShardManifest {
            format: "arrow-ipc-stream".into(),
            compression: "none".into(),
            column: "token".into(),
            dtype: if wide { "uint32" } else { "uint16" }.into(),
            shard_tokens,
            eot: ENDOFTEXT.into(),
            eot_id,
            vocab_size,
            tokenizer_blake3: digest.to_hex().to_string(),
            domains: BTreeMap::new(),
        };
        let (doc_encoder, fallback) = DocEncoder::new(&tokenizer, &loaded.json);
        // The parsed file is as large as the tokenizer; it is not needed past this point.
        drop(loaded.json);
        if let Some(why) = &fallback {
            (ctx.progress)(json!({"encoder": "tokenizers", "why": why}));
        }
        let encoder = Encoder {
            docs: doc_encoder,
            eot_id,
            wide,
        };
        for (domain, dir) in &domains {
            let mut splits = BTreeMap::new();
            for (split, file) in SPLITS {
                let source = dir.join(file);
                let target = ShardTarget {
                    out_dir: &ctx.out_dir,
                    rel: format!("{domain}/{split}"),
                    shard_tokens,
                    schema: schema(wide, domain, split, eot_id, &manifest.tokenizer_blake3),
                };
                let stats = shard_split(ctx, &encoder, &source, target)?;
                splits.insert(split.to_string(), stats);
            }
            manifest.domains.insert(domain.clone(), splits);
        }
        write_json(&ctx.out_dir.join(MANIFEST_FILE), &manifest)?;
        let (tokens, bytes) = manifest
            .domains
            .values()
            .flat_map(|s| s.values())
            .fold((0, 0), |(t, b), s| (t + s.tokens, b + s.bytes));
        let seconds = started.elapsed().as_secs_f64();
        Ok(json!({
            "encoder": match &fallback {
                None => "byte-level BPE (word cache, HF's BPE model)".to_string(),
                Some(why) => format!("HF tokenizers' encode ({why})"),
            },
            "tokens": tokens,
            "bytes": bytes,
            "seconds": seconds,
            "mb_per_s": bytes as f64 / 1e6 / seconds.max(1e-9),
            "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        }))
    }
}

fn shard_tokens(params: &Map<String, Value>) -> Result<u64, DataError> {
    let n = int_param(params, "shard_tokens", 1 << 26)?;
    if n == 0 {
        return Err(DataError::Param {
            name: "shard_tokens".into(),
            message: "must be at least 1".into(),
        });
    }
    Ok(n)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn schema(wide: bool, domain: &str, split: &str, eot_id: u32, tokenizer: &str) -> Arc<Schema> {
    let dtype = if wide {
        DataType::UInt32
    } else {
        DataType::UInt16
    };
    let metadata: std::collections::HashMap<String, String> = [
        ("domain", domain.to_string()),
        ("split", split.to_string()),
        ("eot_id", eot_id.to_string()),
        ("tokenizer_blake3", tokenizer.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Arc::new(Schema::new_with_metadata(
        vec![Field::new("token", dtype, false)],
        metadata,
    ))
}

/// Documents to token ids, in parallel.
struct Encoder<'t> {
    docs: DocEncoder<'t>,
    eot_id: u32,
    wide: bool,
}

impl Encoder<'_> {
    /// Every document's ids followed by end-of-text, concatenated in order.
    fn encode(&self, docs: &[String]) -> Result<Vec<u32>, DataError> {
        let encoded: Vec<Vec<u32>> = docs
            .par_iter()
            .map(|doc| {
                let mut ids = Vec::with_capacity(doc.len() / 3 + 1);
                self.docs.encode(doc, &mut ids)?;
                ids.push(self.eot_id);
                Ok(ids)
            })
            .collect::<Result<_, DataError>>()?;
        let total = encoded.iter().map(Vec::len).sum();
        let mut ids = Vec::with_capacity(total);
        for e in encoded {
            ids.extend_from_slice(&e);
        }
        if !self.wide
            && let Some(big) = ids.iter().find(|&&id| id > u32::from(u16::MAX))
        {
            return Err(DataError::Internal(format!(
                "token id {big} does not fit the uint16 column"
            )));
        }
        Ok(ids)
    }
}

struct ShardTarget<'a> {
    out_dir: &'a Path,
    /// `<domain>/<split>`.
    rel: String,
    shard_tokens: u64,
    schema: Arc<Schema>,
}

/// Writes fixed-size shards from a token stream.
struct ShardWriter<'a> {
    target: ShardTarget<'a>,
    current: Option<OpenShard>,
    shards: Vec<ShardFile>,
}

struct OpenShard {
    path: PathBuf,
    rel: String,
    writer: StreamWriter<BufWriter<fs::File>>,
    tokens: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(target: ShardTarget<'a>) -> Self {
        Self {
            target,
            current: None,
            shards: Vec::new(),
        }
    }

    fn arrow_err(path: &Path) -> impl Fn(arrow_schema::ArrowError) -> DataError + '_ {
        move |source| DataError::Arrow {
            path: path.to_path_buf(),
            source,
        }
    }

    fn open(&mut self) -> Result<&mut OpenShard, DataError> {
        if self.current.is_none() {
            let rel = format!("{}/shard-{:05}.arrow", self.target.rel, self.shards.len());
            let path = self.target.out_dir.join(&rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|source| DataError::Write {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let file = fs::File::create(&path).map_err(|source| DataError::Write {
                path: path.clone(),
                source,
            })?;
            let options = IpcWriteOptions::default();
            let writer = StreamWriter::try_new_with_options(
                BufWriter::with_capacity(1 << 20, file),
                &self.target.schema,
                options,
            )
            .map_err(Self::arrow_err(&path))?;
            self.current = Some(OpenShard {
                path,
                rel,
                writer,
                tokens: 0,
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| DataError::Internal("no open shard".into()))
    }

    /// Appends `ids`, closing each shard as it fills.
    fn push(&mut self, mut ids: &[u32]) -> Result<(), DataError> {
        while !ids.is_empty() {
            let shard_tokens = self.target.shard_tokens;
            let schema = self.target.schema.clone();
            let shard = self.open()?;
            let room = shard_tokens - shard.tokens;
            let n = (ids.len() as u64).min(room).min(RECORD_TOKENS) as usize;
            let (now, rest) = ids.split_at(n);
            let column: ArrayRef = match schema.field(0).data_type() {
                DataType::UInt32 => Arc::new(UInt32Array::from(now.to_vec())),
                _ => Arc::new(UInt16Array::from_iter_values(
                    now.iter().map(|&id| id as u16),
                )),
            };
            let batch =
                RecordBatch::try_new(schema, vec![column]).map_err(Self::arrow_err(&shard.path))?;
            shard
                .writer
                .write(&batch)
                .map_err(Self::arrow_err(&shard.path))?;
            shard.tokens += n as u64;
            ids = rest;
            if shard.tokens == shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), DataError> {
        let Some(mut shard) = self.current.take() else {
            return Ok(());
        };
        shard
            .writer
            .finish()
            .map_err(Self::arrow_err(&shard.path))?;
        let file = shard
            .writer
            .into_inner()
            .map_err(Self::arrow_err(&shard.path))?
            .into_inner()
            .map_err(|e| DataError::Write {
                path: shard.path.clone(),
                source: e.into_error(),
            })?;
        file.sync_data().map_err(|source| DataError::Write {
            path: shard.path.clone(),
            source,
        })?;
        let file_bytes = file
            .metadata()
            .map_err(|source| DataError::Read {
                path: shard.path.clone(),
                source,
            })?
            .len();
        self.shards.push(ShardFile {
            file: shard.rel,
            tokens: shard.tokens,
            file_bytes,
        });
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardFile>, DataError> {
        self.close()?;
        Ok(self.shards)
    }
}

fn shard_split(
    ctx: &StageContext<'_>,
    encoder: &Encoder<'_>,
    source: &Path,
    target: ShardTarget<'_>,
) -> Result<SplitStats, DataError> {
    let rel = target.rel.clone();
    let mut writer = ShardWriter::new(target);
    let mut stats = SplitStats::default();
    let mut counts = UnigramCounts::default();
    if !source.exists() {
        return Err(DataError::Read {
            path: source.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "a prepared domain has train.jsonl and val.jsonl",
            ),
        });
    }
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut last_progress = Instant::now();
    let mut flush = |batch: &mut Vec<String>,
                     stats: &mut SplitStats,
                     counts: &mut UnigramCounts,
                     writer: &mut ShardWriter<'_>|
     -> Result<(), DataError> {
        if ctx.cancelled() {
            return Err(DataError::Cancelled);
        }
        let ids = encoder.encode(batch)?;
        counts.add(&ids);
        stats.tokens += ids.len() as u64;
        stats.documents += batch.len() as u64;
        stats.bytes += batch.iter().map(|d| d.len() as u64).sum::<u64>();
        writer.push(&ids)?;
        batch.clear();
        if last_progress.elapsed().as_secs_f64() > 1.0 {
            (ctx.progress)(json!({
                "shard": rel,
                "documents": stats.documents,
                "tokens": stats.tokens,
                "bytes": stats.bytes,
            }));
            last_progress = Instant::now();
        }
        Ok(())
    };
    let files = [(source.to_path_buf(), FileFormat::Jsonl)];
    for_each_doc(&files, &ReadOptions::default(), |doc| {
        batch_bytes += doc.text.len();
        batch.push(doc.text);
        if batch_bytes >= BATCH_BYTES {
            flush(&mut batch, &mut stats, &mut counts, &mut writer)?;
            batch_bytes = 0;
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        flush(&mut batch, &mut stats, &mut counts, &mut writer)?;
    }
    stats.shards = writer.finish()?;
    stats.unigram_entropy = counts.entropy();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use arrow_array::Array;
    use arrow_ipc::reader::StreamReader;

    use super::*;
    use crate::data::prepare::PrepareKind;
    use crate::data::test_support::{Harness, fixture, params, read_docs};
    use crate::data::tokenizer::TokenizerKind;
    use autoscale_engine::InputPath;

    /// All tokens of one shard file.
    fn read_shard(path: &Path) -> (Vec<u32>, Arc<Schema>) {
        let file = fs::File::open(path).expect("open shard");
        let reader = StreamReader::try_new(file, None).expect("arrow stream");
        let schema = reader.schema();
        let mut ids = Vec::new();
        for batch in reader {
            let batch = batch.expect("batch");
            let col = batch.column(0);
            if let Some(a) = col.as_any().downcast_ref::<UInt16Array>() {
                ids.extend(a.values().iter().map(|&v| u32::from(v)));
            } else if let Some(a) = col.as_any().downcast_ref::<UInt32Array>() {
                ids.extend(a.values().iter().copied());
            } else {
                panic!("unexpected column type {:?}", col.data_type());
            }
        }
        (ids, schema)
    }

    #[test]
    fn a_fixture_domain_becomes_fixed_size_shards_that_decode_back() {
        let h = Harness::new();
        let prepared = h.run_one(
            &PrepareKind,
            &params(json!({"val_fraction": 0.1})),
            &[("source", fixture("latex.jsonl"))],
        );
        let tok = h.run_one(&TokenizerKind, &params(json!({"method": "gpt2"})), &[]);
        let inputs = BTreeMap::from([
            ("docs".to_string(), InputPath::One(prepared.clone())),
            ("tokenizer".to_string(), InputPath::One(tok.clone())),
        ]);
        let (out, meta) = h
            .run_inputs(
                &ShardKind,
                &params(json!({"shard_tokens": 3000})),
                inputs.clone(),
                "shard[latex]",
            )
            .expect("shard");
        let manifest: ShardManifest =
            serde_json::from_str(&fs::read_to_string(out.join(MANIFEST_FILE)).expect("manifest"))
                .expect("manifest json");
        assert_eq!(manifest.dtype, "uint16");
        assert_eq!(manifest.eot_id, 50256);
        let train = &manifest.domains["latex"]["train"];
        let docs = read_docs(&prepared.join(prepare::TRAIN_FILE));
        assert_eq!(train.documents, docs.len() as u64);
        assert_eq!(
            train.bytes,
            docs.iter().map(|d| d.len() as u64).sum::<u64>()
        );
        assert!(train.shards.len() >= 2, "{:?}", train.shards);
        let mut all = Vec::new();
        for (i, s) in train.shards.iter().enumerate() {
            let (ids, schema) = read_shard(&out.join(&s.file));
            assert_eq!(ids.len() as u64, s.tokens);
            if i + 1 < train.shards.len() {
                assert_eq!(s.tokens, 3000, "every shard but the last is full");
            }
            assert_eq!(schema.metadata()["domain"], "latex");
            assert_eq!(
                schema.metadata()["tokenizer_blake3"],
                manifest.tokenizer_blake3
            );
            all.extend(ids);
        }
        assert_eq!(all.len() as u64, train.tokens);
        // The unigram entropy, recounted from the shards themselves.
        let mut freq: BTreeMap<u32, f64> = BTreeMap::new();
        for &t in &all {
            *freq.entry(t).or_default() += 1.0;
        }
        let n = all.len() as f64;
        let entropy: f64 = -freq.values().map(|c| c / n * (c / n).ln()).sum::<f64>();
        let recorded = train.unigram_entropy.expect("train entropy");
        assert!(
            (recorded - entropy).abs() < 1e-9 * entropy,
            "{recorded} vs {entropy}"
        );
        assert!(entropy > 1.0 && entropy < (freq.len() as f64).ln() + 1e-9);
        assert!(manifest.domains["latex"]["val"].unigram_entropy.is_some());
        assert_eq!(
            meta["tokens"].as_u64(),
            Some(train.tokens + manifest.domains["latex"]["val"].tokens)
        );
        // Split at end-of-text: each piece decodes to its document, in order.
        let tokenizer = load(&tok).expect("tokenizer").tokenizer;
        let pieces: Vec<&[u32]> = all.split(|&t| t == 50256).collect();
        assert_eq!(
            pieces.len(),
            docs.len() + 1,
            "one end-of-text after each document"
        );
        for (piece, doc) in pieces.iter().zip(&docs) {
            assert_eq!(&tokenizer.decode(piece, false).expect("decode"), doc);
        }

        // The same inputs give the same bytes (so an upstream rerun can stop here).
        let (again, _) = h
            .run_inputs(
                &ShardKind,
                &params(json!({"shard_tokens": 3000})),
                inputs,
                "shard[latex]",
            )
            .expect("shard again");
        for s in &train.shards {
            assert_eq!(
                fs::read(out.join(&s.file)).expect("a"),
                fs::read(again.join(&s.file)).expect("b")
            );
        }
    }

    #[test]
    fn a_group_of_domains_shards_each_and_a_big_vocab_is_uint32() {
        let h = Harness::new();
        let mut members = BTreeMap::new();
        for d in ["code", "web"] {
            let out = h.run_one(
                &PrepareKind,
                &params(json!({"val_fraction": 0.1})),
                &[("source", fixture(&format!("{d}.jsonl")))],
            );
            members.insert(format!("prepare[{d}]"), out);
        }
        // A tokenizer.json whose vocabulary outgrows uint16.
        let mut tokenizer =
            load(&h.run_one(&TokenizerKind, &params(json!({"method": "gpt2"})), &[]))
                .expect("gpt2")
                .tokenizer;
        let extra: Vec<tokenizers::AddedToken> = (0..20_000)
            .map(|i| tokenizers::AddedToken::from(format!("<extra_{i}>"), true))
            .collect();
        tokenizer.add_special_tokens(&extra);
        let big = h.dir.path().join("big.json");
        tokenizer.save(&big, false).expect("save");
        let inputs = BTreeMap::from([
            ("docs".to_string(), InputPath::Many(members)),
            ("tokenizer".to_string(), InputPath::One(big)),
        ]);
        let (out, _) = h
            .run_inputs(&ShardKind, &params(json!({})), inputs, "shard")
            .expect("shard");
        let manifest: ShardManifest =
            serde_json::from_str(&fs::read_to_string(out.join(MANIFEST_FILE)).expect("manifest"))
                .expect("json");
        assert_eq!(manifest.dtype, "uint32");
        assert_eq!(manifest.domains.keys().collect::<Vec<_>>(), ["code", "web"]);
        for splits in manifest.domains.values() {
            for s in splits.values() {
                assert_eq!(s.shards.len(), 1);
                let (ids, schema) = read_shard(&out.join(&s.shards[0].file));
                assert_eq!(schema.field(0).data_type(), &DataType::UInt32);
                assert_eq!(ids.len() as u64, s.tokens);
                assert_eq!(
                    ids.iter().filter(|&&t| t == 50256).count() as u64,
                    s.documents
                );
            }
        }
    }

    #[test]
    fn a_tokenizer_without_end_of_text_is_refused() {
        let h = Harness::new();
        let prepared = h.run_one(
            &PrepareKind,
            &params(json!({"val_fraction": 0.1})),
            &[("source", fixture("web.jsonl"))],
        );
        let plain = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let path = h.dir.path().join("plain.json");
        plain.save(&path, false).expect("save");
        let inputs = BTreeMap::from([
            ("docs".to_string(), InputPath::One(prepared)),
            ("tokenizer".to_string(), InputPath::One(path)),
        ]);
        let err = h
            .run_inputs(&ShardKind, &params(json!({})), inputs, "shard[web]")
            .expect_err("no eot");
        assert!(err.to_string().contains("has no `<|endoftext|>`"), "{err}");
        assert!(
            ShardKind
                .check(&params(json!({"shard_tokens": 0})))
                .is_err()
        );
        assert!(ShardKind.check(&params(json!({"domain": "../x"}))).is_err());
    }
}
