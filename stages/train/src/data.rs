//! Training data: per-domain token streams with a fixed held-out split.
//!
//! Three layouts are read; `Corpus::open` tells them apart.
//!
//! **Token shards** (what a tokenizing stage writes): a directory with `manifest.json`
//!
//! ```json
//! {
//!   "format": "autoscale-tokens", "version": 1,
//!   "dtype": "u16",                 // or "u32": little-endian token ids
//!   "vocab_size": 50257, "eot": 50256,
//!   "mask": null,                   // optional: BERT's [MASK] id; else vocab_size is added
//!   "tokenizer": {"name": "gpt2"},  // free-form, recorded with the results
//!   "domains": {
//!     "books": {
//!       "train": {"path": "books/train.bin", "tokens": 1048576, "docs": 812, "bytes": 4390112},
//!       "val":   {"path": "books/val.bin",   "tokens": 20480,   "docs": 16,  "bytes": 86120}
//!     }
//!   }
//! }
//! ```
//!
//! Each `.bin` file is the domain's documents back to back, **each preceded by the `eot` id**,
//! `tokens` ids long (the `eot`s included). `docs` counts documents, `bytes` the UTF-8 bytes of
//! their text (for bits per byte). The `val` split is the fixed held-out set: it is chosen when
//! the shards are written, by document, never by mixture, and is never reweighted. Shards are
//! read a window at a time (`pread`), so they may be far larger than memory.
//!
//! **Arrow IPC shards** (what the `shard` kind writes): a directory whose `manifest.json` says
//! `"format": "arrow-ipc-stream"`, one column of `uint16`/`uint32` ids per shard file, each
//! document *followed* by its end-of-text id, uncompressed. On open, only the record batches'
//! headers are read, into an index (token range -> file and byte offset); a window is then one
//! `pread` from the shard file in place. Nothing is decoded ahead or written to disk, and memory
//! is the index plus one window. Compressed shards (what `shard` wrote before) are refused with
//! a hint to rerun it.
//!
//! **A RedPajama-layout JSONL corpus** (tests, the demo): `DIR/<domain>.jsonl`, one
//! `{"text": ...}` per line. Text is tokenized here, one token per UTF-8 byte plus end-of-text
//! (`257` ids, `eot` = 256). The held-out split is the n-gram proxy's: documents ranked by
//! `sha256(domain + "\n" + text)`, the first ones held out until they hold `val_fraction` of the
//! domain's bytes (at most `val_docs` documents, at least one, leaving one to train on);
//! training documents follow in the same hash order. It depends only on the corpus and those
//! two settings.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::TrainError;

/// The byte-level vocabulary: 256 bytes and end-of-text.
pub const BYTE_VOCAB: i64 = 257;
pub const BYTE_EOT: u32 = 256;

/// The manifest's `format`.
pub const SHARD_FORMAT: &str = "autoscale-tokens";

/// How the JSONL layout holds documents out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub val_fraction: f64,
    pub val_docs: usize,
}

impl Default for HeldOut {
    fn default() -> Self {
        Self {
            val_fraction: 0.1,
            val_docs: 50,
        }
    }
}

/// Token ids and what they mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    pub size: i64,
    pub eot: i64,
    pub mask: Option<i64>,
    /// Free-form description of the tokenizer, recorded with results.
    pub tokenizer: Value,
}

impl Vocabulary {
    pub fn bytes() -> Self {
        Self {
            size: BYTE_VOCAB,
            eot: i64::from(BYTE_EOT),
            mask: None,
            tokenizer: json!({"name": "byte", "eot": BYTE_EOT}),
        }
    }
}

/// One split's tokens: in memory, or in a shard file read on demand.
#[derive(Debug)]
pub enum TokenStore {
    Memory(Vec<u16>),
    File {
        file: File,
        path: PathBuf,
        width: usize,
        len: u64,
    },
    /// Arrow IPC shards read in place (see [`Extent`]).
    Arrow {
        files: Vec<(File, PathBuf)>,
        extents: Vec<Extent>,
        width: usize,
        /// Ids must be below it.
        vocab: i64,
        len: u64,
    },
}

impl TokenStore {
    pub fn len(&self) -> u64 {
        match self {
            TokenStore::Memory(v) => v.len() as u64,
            TokenStore::File { len, .. } | TokenStore::Arrow { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens `start .. start + out.len()`.
    pub fn read(&self, start: u64, out: &mut [i64]) -> Result<(), TrainError> {
        let end = start + out.len() as u64;
        if end > self.len() {
            return Err(TrainError::data(
                self.describe(),
                format!("window {start}..{end} is past the end ({})", self.len()),
            ));
        }
        match self {
            TokenStore::Memory(v) => {
                for (o, &t) in out.iter_mut().zip(&v[start as usize..end as usize]) {
                    *o = i64::from(t);
                }
            }
            TokenStore::File {
                file, path, width, ..
            } => {
                let mut buf = vec![0u8; out.len() * width];
                file.read_exact_at(&mut buf, start * *width as u64)
                    .map_err(|e| TrainError::io("read tokens from", path, e))?;
                decode_ids(&buf, *width, out);
            }
            TokenStore::Arrow {
                files,
                extents,
                width,
                vocab,
                ..
            } => {
                let w = *width;
                let mut buf = vec![0u8; out.len() * w];
                let mut i = extents.partition_point(|e| e.start + e.tokens <= start);
                let (mut pos, mut filled) = (start, 0usize);
                while filled < out.len() {
                    let e = extents.get(i).ok_or_else(|| {
                        TrainError::data(
                            self.describe(),
                            format!("no record batch holds token {pos}"),
                        )
                    })?;
                    let within = pos - e.start;
                    let n = (e.tokens - within).min((out.len() - filled) as u64) as usize;
                    let (file, path) = &files[e.file];
                    file.read_exact_at(
                        &mut buf[filled * w..(filled + n) * w],
                        e.offset + within * w as u64,
                    )
                    .map_err(|err| TrainError::io("read tokens from", path, err))?;
                    filled += n;
                    pos += n as u64;
                    i += 1;
                }
                decode_ids(&buf, w, out);
                if let Some(bad) = out.iter().find(|&&id| id >= *vocab) {
                    return Err(TrainError::data(
                        self.describe(),
                        format!(
                            "token id {bad} in {start}..{end} is outside the vocabulary of {vocab}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> PathBuf {
        match self {
            TokenStore::Memory(_) => PathBuf::from("<tokenized corpus>"),
            TokenStore::File { path, .. } => path.clone(),
            TokenStore::Arrow { files, .. } => files
                .first()
                .and_then(|(_, p)| p.parent())
                .map_or_else(|| PathBuf::from("<empty split>"), Path::to_path_buf),
        }
    }
}

/// A split of one domain.
#[derive(Debug)]
pub struct Split {
    pub tokens: TokenStore,
    pub docs: u64,
    /// UTF-8 bytes of the text the tokens hold (end-of-text markers excluded).
    pub bytes: u64,
}

impl Split {
    /// Windows of `seq_len + 1` tokens at stride `seq_len`: each gives `seq_len` targets.
    pub fn windows(&self, seq_len: u64) -> u64 {
        let n = self.tokens.len();
        if n > seq_len { (n - 1) / seq_len } else { 0 }
    }

    /// Bytes of text per non-`eot` token: 1 for the byte tokenizer.
    pub fn bytes_per_token(&self) -> f64 {
        let text_tokens = self.tokens.len().saturating_sub(self.docs);
        if text_tokens == 0 {
            1.0
        } else {
            self.bytes as f64 / text_tokens as f64
        }
    }
}

#[derive(Debug)]
pub struct Domain {
    pub train: Split,
    pub val: Split,
}

/// Which layout a corpus came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Shards,
    Jsonl,
}

/// Every domain's tokens.
#[derive(Debug)]
pub struct Corpus {
    pub path: PathBuf,
    pub layout: Layout,
    pub vocab: Vocabulary,
    /// The loaded domains.
    pub domains: BTreeMap<String, Domain>,
    /// Every domain the data has, loaded or not.
    pub available: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    dtype: String,
    vocab_size: i64,
    eot: i64,
    #[serde(default)]
    mask: Option<i64>,
    #[serde(default)]
    tokenizer: Value,
    domains: BTreeMap<String, ManifestDomain>,
}

#[derive(Debug, Deserialize)]
struct ManifestDomain {
    train: ManifestSplit,
    val: ManifestSplit,
}

#[derive(Debug, Deserialize, Serialize)]
struct ManifestSplit {
    path: String,
    tokens: u64,
    docs: u64,
    bytes: u64,
}

impl Corpus {
    /// Opens token shards (a directory with `manifest.json`) or a JSONL corpus (a directory of
    /// `<domain>.jsonl`). `only`: load just these domains (all when `None`); each must exist.
    pub fn open(
        path: &Path,
        held_out: HeldOut,
        only: Option<&[String]>,
    ) -> Result<Self, TrainError> {
        if !path.is_dir() {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                message: "is not a directory".into(),
                hint: Some(
                    "`data` is a token-shard directory (manifest.json) or a directory of <domain>.jsonl"
                        .into(),
                ),
            });
        }
        let format = manifest_format(path)?;
        let corpus = if format.as_deref() == Some(SHARD_FORMAT) {
            open_shards(path, only)?
        } else if format.as_deref() == Some(ARROW_FORMAT) {
            open_arrow_shards(path, only)?
        } else {
            open_jsonl(path, held_out, only)?
        };
        if let Some(only) = only {
            for d in only {
                if !corpus.domains.contains_key(d) {
                    return Err(TrainError::UnknownDomain {
                        domain: d.clone(),
                        known: corpus.available.clone(),
                    });
                }
            }
        }
        Ok(corpus)
    }

    pub fn domain(&self, name: &str) -> Result<&Domain, TrainError> {
        self.domains
            .get(name)
            .ok_or_else(|| TrainError::UnknownDomain {
                domain: name.to_string(),
                known: self.available.clone(),
            })
    }

    /// Writes these tokens as shards (u16 ids when they fit) under `dir`: the reference writer of
    /// the format.
    pub fn write_shards(&self, dir: &Path) -> Result<(), TrainError> {
        let width = if self.vocab.size <= 1 << 16 { 2 } else { 4 };
        let mut domains = serde_json::Map::new();
        for (name, domain) in &self.domains {
            let sub = dir.join(name);
            std::fs::create_dir_all(&sub).map_err(|e| TrainError::io("create", &sub, e))?;
            let mut entry = serde_json::Map::new();
            for (split_name, split) in [("train", &domain.train), ("val", &domain.val)] {
                let rel = format!("{name}/{split_name}.bin");
                let file_path = dir.join(&rel);
                let mut ids = vec![0i64; split.tokens.len() as usize];
                split.tokens.read(0, &mut ids)?;
                let mut bytes = Vec::with_capacity(ids.len() * width);
                for id in ids {
                    if width == 2 {
                        bytes.extend_from_slice(&(id as u16).to_le_bytes());
                    } else {
                        bytes.extend_from_slice(&(id as u32).to_le_bytes());
                    }
                }
                std::fs::write(&file_path, bytes)
                    .map_err(|e| TrainError::io("write", &file_path, e))?;
                entry.insert(
                    split_name.into(),
                    serde_json::to_value(ManifestSplit {
                        path: rel,
                        tokens: split.tokens.len(),
                        docs: split.docs,
                        bytes: split.bytes,
                    })
                    .unwrap_or_default(),
                );
            }
            domains.insert(name.clone(), Value::Object(entry));
        }
        let manifest = json!({
            "format": SHARD_FORMAT,
            "version": 1,
            "dtype": if width == 2 { "u16" } else { "u32" },
            "vocab_size": self.vocab.size,
            "eot": self.vocab.eot,
            "mask": self.vocab.mask,
            "tokenizer": self.vocab.tokenizer,
            "domains": domains,
        });
        let path = dir.join("manifest.json");
        let mut f = File::create(&path).map_err(|e| TrainError::io("write", &path, e))?;
        f.write_all(
            serde_json::to_string_pretty(&manifest)
                .unwrap_or_default()
                .as_bytes(),
        )
        .map_err(|e| TrainError::io("write", &path, e))?;
        Ok(())
    }
}

/// The `format` of `dir/manifest.json`, if there is one. A JSONL corpus may carry a
/// manifest.json of its own (the corpus builder's), which names no format we read.
fn manifest_format(dir: &Path) -> Result<Option<String>, TrainError> {
    let path = dir.join("manifest.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(value["format"].as_str().map(str::to_owned))
}

/// The `shard` kind's manifest's `format`.
pub const ARROW_FORMAT: &str = "arrow-ipc-stream";

#[derive(Debug, Deserialize)]
struct ArrowManifest {
    dtype: String,
    eot_id: i64,
    vocab_size: i64,
    #[serde(default)]
    eot: Value,
    #[serde(default)]
    tokenizer_blake3: Value,
    domains: BTreeMap<String, BTreeMap<String, ArrowSplit>>,
}

#[derive(Debug, Deserialize)]
struct ArrowSplit {
    tokens: u64,
    documents: u64,
    bytes: u64,
    shards: Vec<ArrowShard>,
}

#[derive(Debug, Deserialize)]
struct ArrowShard {
    file: String,
    tokens: u64,
}

fn open_arrow_shards(dir: &Path, only: Option<&[String]>) -> Result<Corpus, TrainError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    let manifest: ArrowManifest = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.clone(),
        message: format!("not a `shard` manifest: {e}"),
        hint: Some("point `data` at the output of a `shard` stage".into()),
    })?;
    let width = match manifest.dtype.as_str() {
        "uint16" => 2,
        "uint32" => 4,
        other => {
            return Err(TrainError::data(
                &path,
                format!("dtype `{other}` is not uint16 or uint32"),
            ));
        }
    };
    if manifest.eot_id < 0 || manifest.eot_id >= manifest.vocab_size {
        return Err(TrainError::data(
            &path,
            format!(
                "eot {} is outside the vocabulary of {}",
                manifest.eot_id, manifest.vocab_size
            ),
        ));
    }
    let available: Vec<String> = manifest.domains.keys().cloned().collect();
    let mut domains = BTreeMap::new();
    for (name, splits) in &manifest.domains {
        if only.is_some_and(|o| !o.contains(name)) {
            continue;
        }
        let open = |split: &str| -> Result<Split, TrainError> {
            let s = splits.get(split).ok_or_else(|| {
                TrainError::data(&path, format!("domain `{name}` has no `{split}` split"))
            })?;
            Ok(Split {
                tokens: index_arrow_split(dir, s, width, manifest.vocab_size)?,
                docs: s.documents,
                bytes: s.bytes,
            })
        };
        let (train, val) = (open("train")?, open("val")?);
        domains.insert(name.clone(), Domain { train, val });
    }
    Ok(Corpus {
        path: dir.to_path_buf(),
        layout: Layout::Shards,
        vocab: Vocabulary {
            size: manifest.vocab_size,
            eot: manifest.eot_id,
            mask: None,
            tokenizer: json!({"eot": manifest.eot, "blake3": manifest.tokenizer_blake3}),
        },
        domains,
        available,
    })
}

/// One record batch's token ids in a shard file: tokens `start .. start + tokens` of the
/// split, `width`-byte little-endian ids at byte `offset` of file `file`.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    start: u64,
    tokens: u64,
    file: usize,
    offset: u64,
}

/// One split's Arrow shards, indexed in place: the record batches' headers are read (not their
/// bodies), so a window is one `pread` from the shard file itself. Nothing is decoded ahead and
/// nothing is written; memory is the index, a few dozen bytes per record batch. The counts are
/// checked against the manifest; ids are checked against the vocabulary as windows are read.
fn index_arrow_split(
    dir: &Path,
    split: &ArrowSplit,
    width: usize,
    vocab: i64,
) -> Result<TokenStore, TrainError> {
    let mut files = Vec::with_capacity(split.shards.len());
    let mut extents = Vec::new();
    let mut total = 0u64;
    for shard in &split.shards {
        let rel = Path::new(&shard.file);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(TrainError::data(
                dir.join("manifest.json"),
                format!(
                    "`{}` must be a relative path inside the shard directory",
                    shard.file
                ),
            ));
        }
        let file_path = dir.join(rel);
        let file = File::open(&file_path).map_err(|e| TrainError::io("open", &file_path, e))?;
        let in_shard =
            index_arrow_stream(&file, &file_path, files.len(), total, width, &mut extents)?;
        if in_shard != shard.tokens {
            return Err(TrainError::data(
                &file_path,
                format!(
                    "holds {in_shard} tokens, but the manifest says {}",
                    shard.tokens
                ),
            ));
        }
        total += in_shard;
        files.push((file, file_path));
    }
    if total != split.tokens {
        return Err(TrainError::data(
            dir.join("manifest.json"),
            format!(
                "a split's shards hold {total} tokens, but it says {}",
                split.tokens
            ),
        ));
    }
    Ok(TokenStore::Arrow {
        files,
        extents,
        width,
        vocab,
        len: total,
    })
}

/// Walks an Arrow IPC stream's messages (continuation marker, metadata length, flatbuffer
/// `Message`, body), adding one [`Extent`] per record batch; returns the tokens it holds.
fn index_arrow_stream(
    file: &File,
    path: &Path,
    index: usize,
    first_token: u64,
    width: usize,
    extents: &mut Vec<Extent>,
) -> Result<u64, TrainError> {
    use arrow_ipc::MessageHeader;

    let bad = |message: String| TrainError::Data {
        path: path.to_path_buf(),
        message,
        hint: Some("rerun the `shard` stage that wrote it".into()),
    };
    let size = file
        .metadata()
        .map_err(|e| TrainError::io("stat", path, e))?
        .len();
    let read_at = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| TrainError::io("read", path, e))
    };
    let mut at = 0u64;
    let mut tokens = 0u64;
    let mut schema_seen = false;
    loop {
        if at + 4 > size {
            return Err(bad(format!(
                "the Arrow IPC stream ends without its end marker at byte {at}"
            )));
        }
        let mut word = [0u8; 4];
        read_at(&mut word, at)?;
        at += 4;
        if word == [0xff; 4] {
            if at + 4 > size {
                return Err(bad(format!("truncated Arrow IPC message at byte {at}")));
            }
            read_at(&mut word, at)?;
            at += 4;
        }
        let meta_len = u64::from(u32::from_le_bytes(word));
        if meta_len == 0 {
            break;
        }
        if at + meta_len > size {
            return Err(bad(format!("truncated Arrow IPC message at byte {at}")));
        }
        let mut meta = vec![0u8; meta_len as usize];
        read_at(&mut meta, at)?;
        at += meta_len;
        let message = arrow_ipc::root_as_message(&meta).map_err(|e| {
            bad(format!(
                "not an Arrow IPC stream (message at byte {at}): {e}"
            ))
        })?;
        let body = u64::try_from(message.bodyLength())
            .map_err(|_| bad("a negative Arrow IPC body length".into()))?;
        if at + body > size {
            return Err(bad(format!("truncated Arrow IPC body at byte {at}")));
        }
        match message.header_type() {
            MessageHeader::Schema => {
                // One column of unsigned ids as wide as the manifest says: a uint32 shard read
                // as uint16 would give ids in range and wrong.
                let field = message
                    .header_as_schema()
                    .and_then(|schema| schema.fields())
                    .filter(|fields| fields.len() == 1)
                    .map(|fields| fields.get(0));
                let int = field.and_then(|f| f.type_as_int());
                if int.is_none_or(|int| int.is_signed() || int.bitWidth() != 8 * width as i32) {
                    return Err(bad(format!(
                        "its schema is not one column of unsigned {}-bit ids, as the manifest's dtype says",
                        8 * width
                    )));
                }
                schema_seen = true;
            }
            MessageHeader::RecordBatch if schema_seen => {
                let batch = message
                    .header_as_record_batch()
                    .ok_or_else(|| bad("a record batch message without its header".into()))?;
                if batch.compression().is_some() {
                    return Err(TrainError::Data {
                        path: path.to_path_buf(),
                        message: "holds compressed record batches, which the trainer does not read in place".into(),
                        hint: Some(
                            "shards from an autoscale before 0.1 (zstd): rerun the `shard` stage, which now writes uncompressed buffers (its key changed, so `autoscale run` does)"
                                .into(),
                        ),
                    });
                }
                let (Some(nodes), Some(buffers)) = (batch.nodes(), batch.buffers()) else {
                    return Err(bad("a record batch without nodes or buffers".into()));
                };
                if nodes.len() != 1 || buffers.len() != 2 {
                    return Err(bad(format!(
                        "a record batch of {} columns and {} buffers, not one column of ids",
                        nodes.len(),
                        buffers.len()
                    )));
                }
                let node = nodes.get(0);
                let values = buffers.get(1);
                let n = u64::try_from(node.length()).unwrap_or(u64::MAX);
                let (offset, length) = (
                    u64::try_from(values.offset()).unwrap_or(u64::MAX),
                    u64::try_from(values.length()).unwrap_or(u64::MAX),
                );
                if node.null_count() != 0 {
                    return Err(bad("holds null token ids".into()));
                }
                if n.checked_mul(width as u64).is_none_or(|need| need > length)
                    || offset.checked_add(length).is_none_or(|end| end > body)
                {
                    return Err(bad(format!(
                        "a record batch of {n} ids whose buffer ({length} bytes at {offset}) does not fit"
                    )));
                }
                if n > 0 {
                    extents.push(Extent {
                        start: first_token + tokens,
                        tokens: n,
                        file: index,
                        offset: at + offset,
                    });
                }
                tokens += n;
            }
            other => {
                return Err(bad(format!(
                    "an Arrow IPC message of type {other:?} where a schema or record batch belongs"
                )));
            }
        }
        at += body;
    }
    Ok(tokens)
}

/// Little-endian ids of `width` bytes into `out`.
fn decode_ids(bytes: &[u8], width: usize, out: &mut [i64]) {
    if width == 2 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = i64::from(u16::from_le_bytes([c[0], c[1]]));
        }
    } else {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
}

fn open_shards(dir: &Path, only: Option<&[String]>) -> Result<Corpus, TrainError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io("read", &path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.clone(),
        message: format!("not a token-shard manifest: {e}"),
        hint: Some(
            "see the format in `autoscale kinds` (train) or stages/train/src/data.rs".into(),
        ),
    })?;
    if manifest.format != SHARD_FORMAT || manifest.version != 1 {
        return Err(TrainError::data(
            &path,
            format!(
                "format `{}` version {} is not `{SHARD_FORMAT}` version 1",
                manifest.format, manifest.version
            ),
        ));
    }
    let width = match manifest.dtype.as_str() {
        "u16" => 2,
        "u32" => 4,
        other => {
            return Err(TrainError::Data {
                path,
                message: format!("dtype `{other}` is not supported"),
                hint: Some("write token ids as `u16` or `u32` (little-endian)".into()),
            });
        }
    };
    if manifest.eot < 0 || manifest.eot >= manifest.vocab_size {
        return Err(TrainError::data(
            &path,
            format!(
                "eot {} is outside the vocabulary of {}",
                manifest.eot, manifest.vocab_size
            ),
        ));
    }
    let available: Vec<String> = manifest.domains.keys().cloned().collect();
    let mut domains = BTreeMap::new();
    for (name, d) in manifest.domains {
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let open = |s: &ManifestSplit| -> Result<Split, TrainError> {
            let rel = Path::new(&s.path);
            if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(TrainError::data(
                    &path,
                    format!(
                        "`{}` must be a relative path inside the shard directory",
                        s.path
                    ),
                ));
            }
            let file_path = dir.join(rel);
            let file = File::open(&file_path).map_err(|e| TrainError::io("open", &file_path, e))?;
            let size = file
                .metadata()
                .map_err(|e| TrainError::io("stat", &file_path, e))?
                .len();
            if size != s.tokens * width as u64 {
                return Err(TrainError::data(
                    &file_path,
                    format!(
                        "holds {size} bytes, but the manifest says {} tokens of {width} bytes",
                        s.tokens
                    ),
                ));
            }
            Ok(Split {
                tokens: TokenStore::File {
                    file,
                    path: file_path,
                    width,
                    len: s.tokens,
                },
                docs: s.docs,
                bytes: s.bytes,
            })
        };
        domains.insert(
            name,
            Domain {
                train: open(&d.train)?,
                val: open(&d.val)?,
            },
        );
    }
    Ok(Corpus {
        path: dir.to_path_buf(),
        layout: Layout::Shards,
        vocab: Vocabulary {
            size: manifest.vocab_size,
            eot: manifest.eot,
            mask: manifest.mask,
            tokenizer: manifest.tokenizer,
        },
        domains,
        available,
    })
}

fn open_jsonl(
    dir: &Path,
    held_out: HeldOut,
    only: Option<&[String]>,
) -> Result<Corpus, TrainError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io("list", dir, e))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(domain) = name.strip_suffix(".jsonl") {
            files.push((domain.to_string(), entry.path()));
        }
    }
    files.sort();
    let available: Vec<String> = files.iter().map(|(d, _)| d.clone()).collect();
    files.retain(|(d, _)| only.is_none_or(|o| o.contains(d)));
    if available.is_empty() {
        return Err(TrainError::Data {
            path: dir.to_path_buf(),
            message: "holds neither manifest.json (token shards) nor <domain>.jsonl files".into(),
            hint: Some("point `data` at the corpus directory itself (e.g. `corpus/corpus`)".into()),
        });
    }
    let mut domains = BTreeMap::new();
    for (domain, path) in files {
        let texts = read_jsonl(&path)?;
        let (val, train) = split_documents(&domain, &texts, held_out);
        let encode = |docs: &[usize]| -> Split {
            let mut tokens = Vec::new();
            let mut bytes = 0u64;
            for &i in docs {
                tokens.push(BYTE_EOT as u16);
                tokens.extend(texts[i].bytes().map(u16::from));
                bytes += texts[i].len() as u64;
            }
            Split {
                tokens: TokenStore::Memory(tokens),
                docs: docs.len() as u64,
                bytes,
            }
        };
        domains.insert(
            domain,
            Domain {
                train: encode(&train),
                val: encode(&val),
            },
        );
    }
    Ok(Corpus {
        path: dir.to_path_buf(),
        layout: Layout::Jsonl,
        vocab: Vocabulary::bytes(),
        domains,
        available,
    })
}

/// Non-empty `text` fields, in file order.
fn read_jsonl(path: &Path) -> Result<Vec<String>, TrainError> {
    let file = File::open(path).map_err(|e| TrainError::io("open", path, e))?;
    let mut texts = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| TrainError::io("read", path, e))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            message: format!("line {}: not JSON: {e}", i + 1),
            hint: Some(r#"each line is one document: {"text": "..."}"#.into()),
        })?;
        match &value["text"] {
            Value::String(text) if !text.is_empty() => texts.push(text.clone()),
            Value::String(_) => {}
            _ => {
                return Err(TrainError::Data {
                    path: path.to_path_buf(),
                    message: format!("line {}: no string `text` field", i + 1),
                    hint: Some(r#"each line is one document: {"text": "..."}"#.into()),
                });
            }
        }
    }
    Ok(texts)
}

/// The fixed held-out split: `(val, train)` document indices, both in hash order.
pub fn split_documents(
    domain: &str,
    texts: &[String],
    held_out: HeldOut,
) -> (Vec<usize>, Vec<usize>) {
    let hashes: Vec<[u8; 32]> = texts
        .iter()
        .map(|t| {
            let mut h = Sha256::new();
            h.update(domain.as_bytes());
            h.update(b"\n");
            h.update(t.as_bytes());
            h.finalize().into()
        })
        .collect();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by(|&a, &b| hashes[a].cmp(&hashes[b]).then(a.cmp(&b)));
    let total: usize = texts.iter().map(String::len).sum();
    let target = held_out.val_fraction * total as f64;
    let cap = if texts.len() > 1 {
        held_out.val_docs.min(texts.len() - 1).max(1)
    } else {
        1
    };
    let mut val = Vec::new();
    let mut held = 0usize;
    for &i in &order {
        if val.len() >= cap || (!val.is_empty() && held as f64 >= target) {
            break;
        }
        val.push(i);
        held += texts[i].len();
    }
    let train = order[val.len()..].to_vec();
    (val, train)
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/corpus")
    }

    #[test]
    fn the_held_out_split_matches_the_ngram_proxy() {
        // `ngram_proxy.py`'s split_domain ranks by the hex digest; raw bytes sort the same way.
        let texts: Vec<String> = ["alpha", "beta", "gamma", "delta", "epsilon"]
            .iter()
            .map(|s| s.repeat(10))
            .collect();
        let (val, train) = split_documents(
            "web",
            &texts,
            HeldOut {
                val_fraction: 0.3,
                val_docs: 50,
            },
        );
        assert_eq!(val.len() + train.len(), texts.len());
        let held: usize = val.iter().map(|&i| texts[i].len()).sum();
        assert!(held as f64 >= 0.3 * 240.0, "{held}");
        // Removing a held-out document does not reshuffle the others: the split is by hash.
        let (val2, _) = split_documents(
            "web",
            &texts,
            HeldOut {
                val_fraction: 0.3,
                val_docs: 1,
            },
        );
        assert_eq!(val2, val[..1].to_vec());
        // A single document is held out, leaving nothing to train on.
        let (v, t) = split_documents("x", &texts[..1], HeldOut::default());
        assert_eq!((v.len(), t.len()), (1, 0));
    }

    #[test]
    fn the_fixture_corpus_tokenizes_to_bytes_with_a_fixed_split() {
        let corpus = Corpus::open(&fixture(), HeldOut::default(), None).unwrap();
        assert_eq!(corpus.layout, Layout::Jsonl);
        assert_eq!(corpus.domains.len(), 7);
        let books = corpus.domain("books").unwrap();
        assert!(books.val.docs >= 1 && books.train.docs >= 1);
        // Every document is an eot plus its bytes.
        assert_eq!(
            books.train.tokens.len(),
            books.train.bytes + books.train.docs
        );
        assert!((books.train.bytes_per_token() - 1.0).abs() < 1e-12);
        let mut first = [0i64; 4];
        books.train.tokens.read(0, &mut first).unwrap();
        assert_eq!(first[0], 256);
        assert!(first[1..].iter().all(|&t| t < 256));
        let err = corpus.domain("poetry").unwrap_err();
        assert!(err.hint().unwrap().contains("books"), "{err}");
    }

    #[test]
    fn shards_round_trip_and_bad_manifests_are_refused() {
        let only = vec!["code".to_string(), "web".to_string()];
        let corpus = Corpus::open(&fixture(), HeldOut::default(), Some(&only)).unwrap();
        assert_eq!(corpus.domains.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        corpus.write_shards(dir.path()).unwrap();
        let shards = Corpus::open(dir.path(), HeldOut::default(), None).unwrap();
        assert_eq!(shards.layout, Layout::Shards);
        assert_eq!(shards.vocab.size, 257);
        for name in &only {
            let (a, b) = (corpus.domain(name).unwrap(), shards.domain(name).unwrap());
            assert_eq!(a.val.tokens.len(), b.val.tokens.len());
            let n = 1000;
            let (mut x, mut y) = (vec![0; n], vec![0; n]);
            a.train.tokens.read(17, &mut x).unwrap();
            b.train.tokens.read(17, &mut y).unwrap();
            assert_eq!(x, y);
        }
        // Reading past the end is an error, not a panic.
        let code = shards.domain("code").unwrap();
        let mut buf = vec![0; 8];
        assert!(
            code.train
                .tokens
                .read(code.train.tokens.len() - 4, &mut buf)
                .is_err()
        );
        // A truncated shard is caught when the corpus opens.
        let bin = dir.path().join("web/train.bin");
        let len = std::fs::metadata(&bin).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&bin)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let err = Corpus::open(dir.path(), HeldOut::default(), None).unwrap_err();
        assert!(err.to_string().contains("manifest says"), "{err}");
        // An unknown domain names the known ones.
        let err =
            Corpus::open(&fixture(), HeldOut::default(), Some(&["poetry".into()])).unwrap_err();
        assert!(matches!(err, TrainError::UnknownDomain { .. }), "{err}");
    }

    /// Writes `ids` as one domain's `train` split: `shards` Arrow IPC stream files of record
    /// batches of `batch` ids, uncompressed unless `zstd`; `val` gets the first 100 ids.
    fn write_arrow_shards(dir: &Path, ids: &[u16], shards: usize, batch: usize, zstd: bool) {
        use arrow_array::{ArrayRef, RecordBatch, UInt16Array};
        use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
        use std::sync::Arc;

        let write = |rel: &str, part: &[u16]| {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut options = IpcWriteOptions::default();
            if zstd {
                options = options
                    .try_with_compression(Some(arrow_ipc::CompressionType::ZSTD))
                    .unwrap();
            }
            let mut writer: Option<StreamWriter<File>> = None;
            for chunk in part.chunks(batch) {
                let column: ArrayRef = Arc::new(UInt16Array::from(chunk.to_vec()));
                let rb = RecordBatch::try_from_iter([("token", column)]).unwrap();
                let w = writer.get_or_insert_with(|| {
                    StreamWriter::try_new_with_options(
                        File::create(&path).unwrap(),
                        &rb.schema(),
                        options.clone(),
                    )
                    .unwrap()
                });
                w.write(&rb).unwrap();
            }
            writer.unwrap().finish().unwrap();
            json!({"file": rel, "tokens": part.len()})
        };
        let per = ids.len().div_ceil(shards);
        let train: Vec<Value> = ids
            .chunks(per)
            .enumerate()
            .map(|(i, part)| write(&format!("d/train/shard-{i:05}.arrow"), part))
            .collect();
        let val = vec![write("d/val/shard-00000.arrow", &ids[..100])];
        let split = |shards: Vec<Value>, tokens: usize| json!({"tokens": tokens, "documents": 1, "bytes": tokens, "shards": shards});
        let manifest = json!({
            "format": ARROW_FORMAT, "compression": if zstd { "zstd" } else { "none" },
            "column": "token", "dtype": "uint16", "eot_id": 0, "vocab_size": 1000,
            "domains": {"d": {"train": split(train, ids.len()), "val": split(val, 100)}},
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    }

    /// Bytes this thread has written (`/proc/thread-self/io`), unnamed temp files included.
    fn written_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn arrow_shards_are_read_in_place_across_batches_and_files() {
        let dir = tempfile::tempdir().unwrap();
        // 200,000 ids in 3 shard files of record batches of 4,096: windows cross both.
        let ids: Vec<u16> = (0..200_000u32)
            .map(|i| ((i * 7919) % 1000) as u16)
            .collect();
        write_arrow_shards(dir.path(), &ids, 3, 4096, false);
        let written = written_by_this_thread();
        let corpus = Corpus::open(dir.path(), HeldOut::default(), None).unwrap();
        let train = &corpus.domain("d").unwrap().train;
        assert_eq!(train.tokens.len(), ids.len() as u64);
        let TokenStore::Arrow { extents, .. } = &train.tokens else {
            panic!("not read in place: {:?}", train.tokens.len());
        };
        assert_eq!(extents.len(), 3 * 66_667usize.div_ceil(4096));
        let mut rng = crate::rng::SplitMix64::new(1);
        let mut window = vec![0i64; 1025];
        for _ in 0..500 {
            let start = rng.below(ids.len() as u64 - 1025);
            train.tokens.read(start, &mut window).unwrap();
            let expect: Vec<i64> = ids[start as usize..start as usize + 1025]
                .iter()
                .map(|&t| i64::from(t))
                .collect();
            assert_eq!(window, expect, "window at {start}");
        }
        // The last window of the split, through the end of the last file.
        let end = ids.len() as u64 - 1025;
        train.tokens.read(end, &mut window).unwrap();
        assert_eq!(window[1024], i64::from(ids[ids.len() - 1]));
        // Opening and reading wrote nothing: no decoded copy, named or not.
        assert_eq!(written_by_this_thread() - written, 0);
        assert!(train.tokens.read(end + 1, &mut window).is_err());
    }

    #[test]
    fn compressed_or_out_of_vocabulary_shards_are_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u16> = (0..10_000u32).map(|i| (i % 1000) as u16).collect();
        write_arrow_shards(dir.path(), &ids, 1, 4096, true);
        let err = Corpus::open(dir.path(), HeldOut::default(), None).unwrap_err();
        assert!(err.to_string().contains("compressed"), "{err}");
        assert!(
            err.hint().unwrap().contains("rerun the `shard` stage"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut ids = ids;
        ids[5000] = 1500;
        write_arrow_shards(dir.path(), &ids, 1, 4096, false);
        let corpus = Corpus::open(dir.path(), HeldOut::default(), None).unwrap();
        let train = &corpus.domain("d").unwrap().train;
        let mut window = vec![0i64; 100];
        train.tokens.read(0, &mut window).unwrap();
        let err = train.tokens.read(4990, &mut window).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");

        // A truncated file is caught when the corpus opens.
        let shard = dir.path().join("d/train/shard-00000.arrow");
        let len = std::fs::metadata(&shard).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let err = Corpus::open(dir.path(), HeldOut::default(), None).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        // Ids of another width than the manifest's dtype are refused by the schema.
        let dir = tempfile::tempdir().unwrap();
        write_arrow_shards(dir.path(), &ids, 1, 4096, false);
        let manifest = dir.path().join("manifest.json");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, text.replace("uint16", "uint32")).unwrap();
        let err = Corpus::open(dir.path(), HeldOut::default(), None).unwrap_err();
        assert!(err.to_string().contains("unsigned 32-bit ids"), "{err}");
    }
}
