//! The `shard` stage's encoder. HF `tokenizers`' `encode` builds a whole `Encoding` (token
//! strings, offsets, masks) and splits words with a backtracking regex; the shards need only the
//! ids. For the byte-level BPE layout that `tokenizer` writes (and GPT-2's), this encoder splits
//! words with a hand-written equivalent of GPT-2's pattern
//!
//! ```text
//! 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//! ```
//!
//! with the character classes taken from `regex-syntax` (the tables HF's regex uses), keeps a
//! per-thread cache of word -> ids, and hands each new word to HF's own BPE model, so the ids
//! are HF's by construction. Any other tokenizer shape uses HF's `encode`. The tests compare
//! both paths on the fixture corpus and on random text.

use std::sync::Mutex;

use regex_syntax::hir::{Class, HirKind};
use rustc_hash::FxHashMap;
use serde_json::Value;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::{Model, Tokenizer};

use super::DataError;
use super::gpt2::byte_chars;

/// Entries per thread before a cache starts over: bounds memory on any corpus.
const CACHE_WORDS: usize = 1 << 16;
/// Longer words go to the model uncached; they are rare and would crowd the cache.
const CACHE_MAX_BYTES: usize = 64;

/// What a character is to GPT-2's pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

/// `\p{L}`, `\p{N}` and `\s` as sorted ranges, with an ASCII table in front.
struct CharClasses {
    ascii: [CharClass; 128],
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
}

fn ranges(pattern: &str) -> Option<Vec<(char, char)>> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => Some(
            class
                .ranges()
                .iter()
                .map(|r| (r.start(), r.end()))
                .collect(),
        ),
        _ => None,
    }
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

impl CharClasses {
    fn new() -> Option<Self> {
        let mut classes = Self {
            ascii: [CharClass::Other; 128],
            letter: ranges(r"\p{L}")?,
            number: ranges(r"\p{N}")?,
            space: ranges(r"\s")?,
        };
        for b in 0..128u8 {
            classes.ascii[b as usize] = classes.slow(char::from(b));
        }
        Some(classes)
    }

    fn slow(&self, c: char) -> CharClass {
        if in_ranges(&self.letter, c) {
            CharClass::Letter
        } else if in_ranges(&self.number, c) {
            CharClass::Number
        } else if in_ranges(&self.space, c) {
            CharClass::Space
        } else {
            CharClass::Other
        }
    }

    fn of(&self, c: char) -> CharClass {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            self.slow(c)
        }
    }

    /// The byte length of the first word of `s` (not empty) under GPT-2's pattern.
    fn first_word(&self, s: &str) -> usize {
        let b = s.as_bytes();
        // 's|'t|'re|'ve|'m|'ll|'d
        if b[0] == b'\'' && b.len() >= 2 {
            if matches!(b[1], b's' | b't' | b'm' | b'd') {
                return 2;
            }
            if b.len() >= 3 && matches!(&b[1..3], b"re" | b"ve" | b"ll") {
                return 3;
            }
        }
        let mut chars = s.chars();
        let first = chars.next().unwrap_or(' ');
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run.
        let (start, class) = match (first, chars.next()) {
            (' ', Some(next)) if self.of(next) != CharClass::Space => (1, self.of(next)),
            (' ', _) => (0, CharClass::Space),
            (c, _) => (0, self.of(c)),
        };
        if class != CharClass::Space {
            return s[start..]
                .char_indices()
                .find(|&(_, c)| self.of(c) != class)
                .map_or(s.len(), |(i, _)| start + i);
        }
        // `\s+(?!\S)|\s+`: a run of spaces, less its last one when a non-space follows
        // (which then starts the next word), unless the run is that one space.
        let mut last = 0;
        for (count, (i, c)) in s.char_indices().enumerate() {
            if self.of(c) != CharClass::Space {
                return if count >= 2 { last } else { i };
            }
            last = i;
        }
        s.len()
    }
}

/// The words of `text`, in order, covering it.
struct Words<'a, 'c> {
    rest: &'a str,
    classes: &'c CharClasses,
}

impl<'a> Iterator for Words<'a, '_> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let n = self.classes.first_word(self.rest);
        let (word, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(word)
    }
}

/// Word bytes -> token ids.
type WordCache = FxHashMap<Box<[u8]>, Box<[u32]>>;

/// Token ids of whole documents.
pub(crate) enum DocEncoder<'t> {
    /// Byte-level BPE: our word split and cache, HF's BPE.
    Fast(Box<FastBpe<'t>>),
    /// Anything else: HF's `encode`.
    Tokenizers(&'t Tokenizer),
}

pub(crate) struct FastBpe<'t> {
    model: &'t BPE,
    classes: CharClasses,
    byte_chars: [char; 256],
    /// One per rayon worker, and one for any other thread; each locked by its thread alone.
    caches: Vec<Mutex<WordCache>>,
}

impl<'t> DocEncoder<'t> {
    /// The fast path when `json` (the tokenizer's `tokenizer.json`) has the byte-level BPE
    /// layout, else HF's; with the reason for HF's.
    pub(crate) fn new(tokenizer: &'t Tokenizer, json: &Value) -> (Self, Option<String>) {
        match fast_layout(tokenizer, json) {
            Ok(model) => match CharClasses::new() {
                Some(classes) => {
                    let threads = rayon::current_num_threads() + 1;
                    (
                        DocEncoder::Fast(Box::new(FastBpe {
                            model,
                            classes,
                            byte_chars: byte_chars(),
                            caches: (0..threads).map(|_| Mutex::default()).collect(),
                        })),
                        None,
                    )
                }
                None => (
                    DocEncoder::Tokenizers(tokenizer),
                    Some("cannot read the Unicode classes".into()),
                ),
            },
            Err(why) => (DocEncoder::Tokenizers(tokenizer), Some(why)),
        }
    }

    /// Appends `text`'s ids to `out`. Text that spells a special token is encoded as text.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), DataError> {
        match self {
            DocEncoder::Fast(fast) => fast.encode(text, out),
            DocEncoder::Tokenizers(tokenizer) => {
                let encoding = tokenizer
                    .encode_fast(text, false)
                    .map_err(|e| DataError::Internal(format!("cannot encode a document: {e}")))?;
                out.extend_from_slice(encoding.get_ids());
                Ok(())
            }
        }
    }
}

impl FastBpe<'_> {
    fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), DataError> {
        let slot = rayon::current_thread_index()
            .unwrap_or(self.caches.len() - 1)
            .min(self.caches.len() - 1);
        let mut cache = self.caches[slot]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let words = Words {
            rest: text,
            classes: &self.classes,
        };
        let mut mapped = String::new();
        for word in words {
            if let Some(ids) = cache.get(word.as_bytes()) {
                out.extend_from_slice(ids);
                continue;
            }
            mapped.clear();
            mapped.extend(word.bytes().map(|b| self.byte_chars[b as usize]));
            let tokens = self
                .model
                .tokenize(&mapped)
                .map_err(|e| DataError::Internal(format!("cannot encode a word: {e}")))?;
            let start = out.len();
            out.extend(tokens.iter().map(|t| t.id));
            if word.len() <= CACHE_MAX_BYTES {
                if cache.len() >= CACHE_WORDS {
                    cache.clear();
                }
                cache.insert(word.as_bytes().into(), out[start..].into());
            }
        }
        Ok(())
    }
}

/// HF's BPE model when `json` is a byte-level BPE our path encodes exactly as HF does; else
/// why not.
fn fast_layout<'t>(tokenizer: &'t Tokenizer, json: &Value) -> Result<&'t BPE, String> {
    let null_or = |v: &Value, ok: &dyn Fn(&Value) -> bool| v.is_null() || ok(v);
    if !json["normalizer"].is_null() {
        return Err("it has a normalizer".into());
    }
    let pre = &json["pre_tokenizer"];
    if pre["type"] != "ByteLevel" || pre["add_prefix_space"] != false || pre["use_regex"] != true {
        return Err("its pre-tokenizer is not ByteLevel without a prefix space".into());
    }
    if !json["padding"].is_null() || !json["truncation"].is_null() {
        return Err("it pads or truncates".into());
    }
    let model = &json["model"];
    let empty = |v: &Value| v == "";
    if model["type"] != "BPE"
        || !model["dropout"].is_null()
        || model["byte_fallback"] == true
        || model["ignore_merges"] == true
        || !null_or(&model["continuing_subword_prefix"], &empty)
        || !null_or(&model["end_of_word_suffix"], &empty)
    {
        return Err("its model is not a plain BPE".into());
    }
    let added = json["added_tokens"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if added.iter().any(|t| t["special"] != true) {
        return Err("it has added tokens that are not special".into());
    }
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        return Err("its model is not BPE".into());
    };
    let byte_chars = byte_chars();
    if byte_chars
        .iter()
        .any(|c| bpe.token_to_id(&c.to_string()).is_none())
    {
        return Err("its vocabulary lacks some of the 256 bytes".into());
    }
    Ok(bpe)
}

#[cfg(test)]
mod tests {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    use super::*;
    use crate::data::SplitMix64;
    use crate::data::test_support::{fixture, read_docs};
    use crate::data::tokenizer::{ENDOFTEXT, train_on};

    /// Random text over characters that stress each branch of the pattern.
    fn random_texts(n: usize) -> Vec<String> {
        let alphabet: Vec<char> =
            " \t\n\r\u{a0}\u{3000}\u{2028}aZzé東ß1٣Ⅻ½'srtevlmdS!-_.😀\u{301}\u{200d}\u{feff}<|>"
                .chars()
                .collect();
        let mut rng = SplitMix64::new(42);
        (0..n)
            .map(|_| {
                let len = rng.below(40) as usize;
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    fn corpus() -> Vec<String> {
        let mut docs: Vec<String> = [
            "code.jsonl",
            "latex.jsonl",
            "wikipedia.jsonl",
            "forum.jsonl",
            "web.jsonl",
            "manuals.jsonl",
            "books.jsonl",
        ]
        .iter()
        .flat_map(|f| read_docs(&fixture(f)).into_iter().take(15))
        .collect();
        docs.extend(read_docs(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/data/mixed.jsonl"),
        ));
        docs.extend(random_texts(3000));
        docs.push(format!("a literal {ENDOFTEXT} in text"));
        docs.push(" ".repeat(300) + "x" + &"\n".repeat(5));
        docs.push("=".repeat(500));
        docs
    }

    #[test]
    fn the_word_split_is_hf_byte_levels() {
        let classes = CharClasses::new().expect("classes");
        let hf = ByteLevel::default().add_prefix_space(false);
        for text in corpus() {
            let mut pre = PreTokenizedString::from(text.as_str());
            hf.pre_tokenize(&mut pre).expect("pre-tokenize");
            let theirs: Vec<(usize, usize)> = pre
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(_, o, _)| o)
                .collect();
            let mut ours = Vec::new();
            let mut at = 0;
            for w in (Words {
                rest: &text,
                classes: &classes,
            }) {
                ours.push((at, at + w.len()));
                at += w.len();
            }
            assert_eq!(ours, theirs, "{text:?}");
        }
    }

    fn same_ids(tokenizer: &mut Tokenizer) {
        let json: Value =
            serde_json::from_str(&tokenizer.to_string(false).expect("json")).expect("parse");
        tokenizer.set_encode_special_tokens(true);
        let (fast, why) = DocEncoder::new(tokenizer, &json);
        assert!(why.is_none(), "{why:?}");
        assert!(matches!(fast, DocEncoder::Fast(_)));
        let hf = DocEncoder::Tokenizers(tokenizer);
        // Twice: the second pass reads the cache.
        for _ in 0..2 {
            for text in corpus() {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                fast.encode(&text, &mut a).expect("fast");
                hf.encode(&text, &mut b).expect("hf");
                assert_eq!(a, b, "{text:?}");
            }
        }
    }

    #[test]
    fn gpt2_ids_are_hfs() {
        same_ids(&mut crate::data::gpt2::gpt2_tokenizer().expect("gpt2"));
    }

    #[test]
    fn trained_bpe_ids_are_hfs() {
        let docs: Vec<String> = ["code.jsonl", "latex.jsonl", "wikipedia.jsonl"]
            .iter()
            .flat_map(|f| read_docs(&fixture(f)))
            .collect();
        same_ids(&mut train_on(&docs, 800, 2).expect("train"));
    }

    #[test]
    fn other_layouts_fall_back_to_tokenizers() {
        let mut tokenizer = crate::data::gpt2::gpt2_tokenizer().expect("gpt2");
        tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
        let json: Value =
            serde_json::from_str(&tokenizer.to_string(false).expect("json")).expect("parse");
        let (encoder, why) = DocEncoder::new(&tokenizer, &json);
        assert!(matches!(encoder, DocEncoder::Tokenizers(_)));
        assert!(why.expect("why").contains("prefix space"));
    }
}
