//! `tokenizer`: a Hugging Face `tokenizer.json`, which Python `tokenizers` loads unchanged.
//!
//! - `method: bpe` trains a byte-level BPE (GPT-2's layout: byte-level pre-tokenizer without a
//!   prefix space, byte-level decoder) with `vocab_size` entries, `<|endoftext|>` first (id 0).
//!   It learns from a seeded sample of up to `sample_docs` training documents per domain
//!   (reservoir sampling, so memory is the sample), fed one document at a time: merges never
//!   cross a document boundary. Held-out documents are never seen.
//! - `method: gpt2` is GPT-2's own tokenizer (see [`super::gpt2`]), `<|endoftext|>` = 50256;
//!   it reads no input.
//!
//! Outputs: `tokenizer.json` and `info.json` (method, vocab size, end-of-text id, the sample).

use std::collections::BTreeMap;
use std::time::Instant;

use autoscale_engine::{
    Implementation, InputPath, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

use super::docs::{FileFormat, ReadOptions, for_each_doc};
use super::{
    DataError, OutFile, SplitMix64, choice_param, int_param, prepare, prepared_domains, write_json,
};

/// The end-of-text token, between documents in the shards.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
const INFO_FILE: &str = "info.json";

/// 256 bytes and the end-of-text token.
const MIN_VOCAB: u64 = 257;

pub struct TokenizerKind;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::optional(
        "method",
        ParamType::String,
        "bpe (train a byte-level BPE on input `docs`) or gpt2 (GPT-2's own) [default: bpe]",
    ),
    ParamSpec::optional(
        "vocab_size",
        ParamType::Int,
        "bpe: entries in the vocabulary, <|endoftext|> included [default: 8192]",
    ),
    ParamSpec::optional(
        "sample_docs",
        ParamType::Int,
        "bpe: training documents sampled per domain [default: 10000]",
    ),
    ParamSpec::optional(
        "min_frequency",
        ParamType::Int,
        "bpe: a merge needs a pair seen this often [default: 2]",
    ),
    ParamSpec::optional(
        "seed",
        ParamType::Int,
        "bpe: seed of the sample [default: 0]",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Bpe,
    Gpt2,
}

#[derive(Debug, Clone)]
struct TokenizerConfig {
    method: Method,
    vocab_size: u64,
    sample_docs: u64,
    min_frequency: u64,
    seed: u64,
}

impl TokenizerConfig {
    fn from_params(params: &Map<String, Value>) -> Result<Self, DataError> {
        let method = match choice_param(params, "method", &["bpe", "gpt2"])? {
            "gpt2" => Method::Gpt2,
            _ => Method::Bpe,
        };
        let vocab_size = int_param(params, "vocab_size", 8192)?;
        if method == Method::Bpe && !(MIN_VOCAB..=u32::MAX as u64).contains(&vocab_size) {
            return Err(DataError::Param {
                name: "vocab_size".into(),
                message: format!(
                    "must be at least {MIN_VOCAB} (256 bytes and <|endoftext|>), not {vocab_size}"
                ),
            });
        }
        let sample_docs = int_param(params, "sample_docs", 10_000)?;
        if sample_docs == 0 {
            return Err(DataError::Param {
                name: "sample_docs".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            method,
            vocab_size,
            sample_docs,
            min_frequency: int_param(params, "min_frequency", 2)?,
            seed: int_param(params, "seed", 0)?,
        })
    }
}

/// What one domain gave the training sample.
#[derive(Debug, Clone, Default, Serialize)]
struct SampleStats {
    docs_seen: u64,
    docs: u64,
    bytes: u64,
}

/// `info.json`.
#[derive(Debug, Clone, Serialize)]
struct TokenizerInfo {
    method: &'static str,
    vocab_size: u32,
    eot_id: u32,
    eot: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    sample: BTreeMap<String, SampleStats>,
}

impl StageKind for TokenizerKind {
    fn name(&self) -> &'static str {
        "tokenizer"
    }

    fn implementation(&self) -> Implementation {
        crate::implementations::TOKENIZER
    }

    fn summary(&self) -> &'static str {
        "trains a byte-level BPE on a seeded sample of the domains, or builds GPT-2's; writes tokenizer.json"
    }

    fn params(&self) -> &[ParamSpec] {
        PARAMS
    }

    fn check(&self, params: &Map<String, Value>) -> Result<(), String> {
        TokenizerConfig::from_params(params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<Value, StageError> {
        let config = TokenizerConfig::from_params(ctx.params)?;
        let started = Instant::now();
        let (tokenizer, sample) = match config.method {
            Method::Gpt2 => (super::gpt2::gpt2_tokenizer()?, BTreeMap::new()),
            Method::Bpe => {
                let input = ctx.inputs.get("docs").ok_or(DataError::Input {
                    name: "docs",
                    message:
                        "is missing: `method: bpe` trains on prepared domains (a `prepare` stage)"
                            .into(),
                })?;
                train_bpe(ctx, input, &config)?
            }
        };
        let eot_id = tokenizer
            .token_to_id(ENDOFTEXT)
            .ok_or_else(|| DataError::Internal("the tokenizer lost <|endoftext|>".into()))?;
        let text = tokenizer
            .to_string(false)
            .map_err(|e| DataError::Internal(format!("cannot serialise the tokenizer: {e}")))?;
        let path = ctx.out_dir.join(TOKENIZER_FILE);
        let mut out = OutFile::create(&path)?;
        out.write_all(text.as_bytes())?;
        out.finish()?;
        let info = TokenizerInfo {
            method: match config.method {
                Method::Bpe => "bpe",
                Method::Gpt2 => "gpt2",
            },
            vocab_size: tokenizer.get_vocab_size(true) as u32,
            eot_id,
            eot: ENDOFTEXT,
            sample,
        };
        write_json(&ctx.out_dir.join(INFO_FILE), &info)?;
        Ok(json!({
            "method": info.method,
            "vocab_size": info.vocab_size,
            "eot_id": eot_id,
            "digest": blake3::hash(text.as_bytes()).to_hex().to_string(),
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }
}

/// Up to `sample_docs` documents of each domain's `train.jsonl`, chosen uniformly with a
/// reservoir seeded by the seed and the domain's name.
fn sample_domain(
    ctx: &StageContext<'_>,
    domain: &str,
    file: &std::path::Path,
    config: &TokenizerConfig,
) -> Result<(Vec<String>, SampleStats), DataError> {
    let salt = u64::from_le_bytes(
        blake3::hash(domain.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mut rng = SplitMix64::new(config.seed ^ salt);
    let mut reservoir: Vec<String> = Vec::new();
    let mut seen = 0u64;
    let options = ReadOptions::default();
    for_each_doc(
        &[(file.to_path_buf(), FileFormat::Jsonl)],
        &options,
        |doc| {
            seen += 1;
            if seen.is_multiple_of(1024) && ctx.cancelled() {
                return Err(DataError::Cancelled);
            }
            if (reservoir.len() as u64) < config.sample_docs {
                reservoir.push(doc.text);
            } else {
                let j = rng.below(seen);
                if j < config.sample_docs {
                    reservoir[j as usize] = doc.text;
                }
            }
            Ok(())
        },
    )?;
    let stats = SampleStats {
        docs_seen: seen,
        docs: reservoir.len() as u64,
        bytes: reservoir.iter().map(|d| d.len() as u64).sum(),
    };
    Ok((reservoir, stats))
}

fn train_bpe(
    ctx: &StageContext<'_>,
    input: &InputPath,
    config: &TokenizerConfig,
) -> Result<(Tokenizer, BTreeMap<String, SampleStats>), DataError> {
    let domains = prepared_domains(input, "docs", "docs")?;
    let mut sample: Vec<String> = Vec::new();
    let mut stats = BTreeMap::new();
    for (domain, dir) in &domains {
        (ctx.progress)(json!({"sampling": domain}));
        let (docs, s) = sample_domain(ctx, domain, &dir.join(prepare::TRAIN_FILE), config)?;
        sample.extend(docs);
        stats.insert(domain.clone(), s);
    }
    if sample.is_empty() {
        return Err(DataError::Training(
            "the domains' training documents are empty".into(),
        ));
    }
    (ctx.progress)(json!({"training": {"docs": sample.len(), "vocab_size": config.vocab_size}}));
    let tokenizer = train_on(&sample, config.vocab_size, config.min_frequency)?;
    Ok((tokenizer, stats))
}

/// A byte-level BPE trained on `docs`, one document per sequence.
pub(crate) fn train_on(
    docs: &[String],
    vocab_size: u64,
    min_frequency: u64,
) -> Result<Tokenizer, DataError> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size as usize)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(ENDOFTEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerImpl::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()));
    tokenizer
        .train(&mut trainer, docs.iter())
        .map_err(|e| DataError::Training(e.to_string()))?;
    Ok(Tokenizer::from(tokenizer))
}

/// A `tokenizer.json`, loaded.
pub(crate) struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    /// blake3 of the file's bytes.
    pub digest: blake3::Hash,
    /// The file as JSON, for what the `Tokenizer` API does not tell.
    pub json: Value,
}

/// The tokenizer of a `tokenizer` stage's output directory, or of a `tokenizer.json` file.
pub(crate) fn load(path: &std::path::Path) -> Result<LoadedTokenizer, DataError> {
    let file = if path.is_dir() {
        path.join(TOKENIZER_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|source| DataError::Read {
        path: file.clone(),
        source,
    })?;
    let not_tokenizer = |e: &dyn std::fmt::Display| DataError::Tokenizer {
        path: file.clone(),
        message: format!("not a Hugging Face tokenizer.json: {e}"),
    };
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| not_tokenizer(&e))?;
    let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| not_tokenizer(&e))?;
    Ok(LoadedTokenizer {
        tokenizer,
        digest: blake3::hash(&bytes),
        json,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::data::prepare::PrepareKind;
    use crate::data::test_support::{Harness, fixture, params, read_docs};

    /// `prepare` on three fixture domains, as a fanned-out group.
    fn prepared(h: &Harness) -> InputPath {
        let p = params(json!({"min_chars": 1000, "block_chars": 1000, "val_fraction": 0.1}));
        let mut members = BTreeMap::new();
        for domain in ["code", "latex", "wikipedia"] {
            let out = h.run_one(
                &PrepareKind,
                &p,
                &[("source", fixture(&format!("{domain}.jsonl")))],
            );
            members.insert(format!("prepare[{domain}]"), out);
        }
        InputPath::Many(members)
    }

    #[test]
    fn bpe_trains_to_the_vocab_size_deterministically_and_round_trips() {
        let h = Harness::new();
        let docs = prepared(&h);
        let p = params(json!({"method": "bpe", "vocab_size": 600, "sample_docs": 30}));
        let inputs = BTreeMap::from([("docs".to_string(), docs.clone())]);
        let (out, meta) = h
            .run_inputs(&TokenizerKind, &p, inputs.clone(), "tokenizer")
            .expect("train");
        let tokenizer = load(&out).expect("load").tokenizer;
        assert_eq!(tokenizer.get_vocab_size(true), 600);
        assert_eq!(tokenizer.token_to_id(ENDOFTEXT), Some(0));
        assert_eq!(meta["eot_id"], 0);
        let info: Value =
            serde_json::from_str(&fs::read_to_string(out.join(INFO_FILE)).expect("info"))
                .expect("json");
        assert_eq!(info["sample"]["code"]["docs"], 30);
        assert!(info["sample"]["wikipedia"]["docs_seen"].as_u64() > Some(30));

        let (again, _) = h
            .run_inputs(&TokenizerKind, &p, inputs.clone(), "tokenizer")
            .expect("train again");
        assert_eq!(
            fs::read(out.join(TOKENIZER_FILE)).expect("read"),
            fs::read(again.join(TOKENIZER_FILE)).expect("read"),
            "same sample, same bytes: the shards below stay cached"
        );
        let p2 = params(json!({"method": "bpe", "vocab_size": 600, "sample_docs": 30, "seed": 9}));
        let (other, _) = h
            .run_inputs(&TokenizerKind, &p2, inputs, "tokenizer")
            .expect("train seed 9");
        assert_ne!(
            fs::read(out.join(TOKENIZER_FILE)).expect("read"),
            fs::read(other.join(TOKENIZER_FILE)).expect("read"),
            "another seed samples other documents"
        );

        let text = "def f(x):\n    return x ** 2  # squares\n\\begin{equation} e^{i\\pi} + 1 = 0 \\end{equation}\nThe café — naïve façade.";
        let enc = tokenizer.encode_fast(text, false).expect("encode");
        assert_eq!(
            tokenizer.decode(enc.get_ids(), false).expect("decode"),
            text
        );
        // Without merges every byte (more for é, —) would be a token.
        assert!(
            enc.get_ids().len() * 4 < text.len() * 3,
            "merges compress: {} tokens for {} bytes",
            enc.get_ids().len(),
            text.len()
        );
    }

    #[test]
    fn merges_do_not_cross_documents() {
        // Two documents; were they joined, `ab` + `cd` would be a frequent pair across the join.
        let docs: Vec<String> = (0..50)
            .flat_map(|_| ["xxab".to_string(), "cdyy".to_string()])
            .collect();
        let tokenizer = train_on(&docs, 300, 2).expect("train");
        let vocab = tokenizer.get_vocab(false);
        assert!(vocab.contains_key("xxab"));
        assert!(
            !vocab.keys().any(|t| t.contains("bc") || t.contains("abcd")),
            "no token spans two documents"
        );
    }

    #[test]
    fn gpt2_needs_no_input_and_bpe_needs_docs() {
        let h = Harness::new();
        let out = h.run_one(&TokenizerKind, &params(json!({"method": "gpt2"})), &[]);
        let info: Value =
            serde_json::from_str(&fs::read_to_string(out.join(INFO_FILE)).expect("info"))
                .expect("json");
        assert_eq!(info["vocab_size"], 50257);
        assert_eq!(info["eot_id"], 50256);
        let err = h
            .run(&TokenizerKind, &params(json!({"method": "bpe"})), &[])
            .expect_err("no docs");
        assert!(err.to_string().contains("input `docs` is missing"), "{err}");
        let err = TokenizerKind
            .check(&params(json!({"vocab_size": 100})))
            .expect_err("too small");
        assert!(err.contains("at least 257"), "{err}");
    }

    #[test]
    fn held_out_documents_are_not_sampled() {
        let h = Harness::new();
        let InputPath::Many(members) = prepared(&h) else {
            panic!("a group");
        };
        let dir = &members["prepare[code]"];
        let one = BTreeMap::from([("docs".to_string(), InputPath::One(dir.clone()))]);
        let p = params(json!({"vocab_size": 400, "sample_docs": 100000}));
        let (out, _) = h
            .run_inputs(&TokenizerKind, &p, one, "tokenizer")
            .expect("train");
        let info: Value =
            serde_json::from_str(&fs::read_to_string(out.join(INFO_FILE)).expect("info"))
                .expect("json");
        let train = read_docs(&dir.join(prepare::TRAIN_FILE));
        assert_eq!(info["sample"]["docs"]["docs"], train.len());
        assert!(!read_docs(&dir.join(prepare::VAL_FILE)).is_empty());
    }
}
