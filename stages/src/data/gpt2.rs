//! GPT-2's own tokenizer, as a Hugging Face `tokenizer.json`.
//!
//! GPT-2's `encoder.json` and `vocab.bpe` ship inside the `tiktoken-rs` crate's package, but
//! its API does not expose them (they are not compiled in). What it does compile in is
//! `r50k_base`, GPT-2's ranks: token bytes -> id, the same ids as `encoder.json`. The merges
//! follow from the ranks: the merge that made token `t` is the split BPE reaches on `t`'s bytes
//! using only tokens ranked below `t`. That rebuilds `vocab.bpe` line for line; the unit tests
//! pin both the vocab and the merges to the sha256 of the shipped files.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::DataError;
use super::tokenizer::ENDOFTEXT;

/// GPT-2's vocabulary: 50,256 byte-level tokens and `<|endoftext|>`.
pub(crate) const GPT2_EOT_ID: u32 = 50_256;

/// GPT-2's byte-to-character map (`bytes_to_unicode`): printable bytes stand for themselves,
/// the others for the characters from U+0100 on, in byte order.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 0x100u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        map[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    map
}

fn to_chars(bytes: &[u8], map: &[char; 256]) -> String {
    bytes.iter().map(|&b| map[b as usize]).collect()
}

/// One BPE merge: two byte strings that become one token.
type Merge = (Vec<u8>, Vec<u8>);

/// GPT-2's tokens by id (ids 0..50256) and merges in rank order, as byte strings.
pub(crate) fn gpt2_ranks() -> Result<(Vec<Vec<u8>>, Vec<Merge>), DataError> {
    let bpe = tiktoken_rs::r50k_base()
        .map_err(|e| DataError::Internal(format!("cannot load GPT-2's ranks (r50k_base): {e}")))?;
    let mut tokens = Vec::with_capacity(GPT2_EOT_ID as usize);
    for id in 0..GPT2_EOT_ID {
        let bytes = bpe
            .decode_bytes(&[id])
            .map_err(|e| DataError::Internal(format!("GPT-2's ranks have no token {id}: {e:?}")))?;
        tokens.push(bytes);
    }
    let ranks: HashMap<&[u8], u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_slice(), id as u32))
        .collect();
    let mut merges = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if token.len() < 2 {
            continue;
        }
        let parts = bpe_below(token, id as u32, &ranks);
        let [a, b] = parts.as_slice() else {
            return Err(DataError::Internal(format!(
                "GPT-2 token {id} does not split into one merge ({} parts)",
                parts.len()
            )));
        };
        merges.push((a.to_vec(), b.to_vec()));
    }
    Ok((tokens, merges))
}

/// Byte-pair encodes `token` with the ranks below `limit`.
fn bpe_below<'t>(token: &'t [u8], limit: u32, ranks: &HashMap<&[u8], u32>) -> Vec<&'t [u8]> {
    // Part i is token[bounds[i]..bounds[i + 1]].
    let mut bounds: Vec<usize> = (0..=token.len()).collect();
    loop {
        let best = (0..bounds.len().saturating_sub(2))
            .filter_map(|i| {
                ranks
                    .get(&token[bounds[i]..bounds[i + 2]])
                    .filter(|&&r| r < limit)
                    .map(|&r| (r, i))
            })
            .min();
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => return bounds.windows(2).map(|w| &token[w[0]..w[1]]).collect(),
        }
    }
}

/// GPT-2's tokenizer, laid out as Hugging Face's `gpt2` `tokenizer.json` is: byte-level
/// pre-tokenizer without a prefix space, BPE, byte-level decoder, `<|endoftext|>` special.
pub(crate) fn gpt2_tokenizer() -> Result<Tokenizer, DataError> {
    let (tokens, merges) = gpt2_ranks()?;
    let map = byte_chars();
    let mut vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (to_chars(t, &map), id as u32))
        .collect();
    vocab.insert(ENDOFTEXT.to_string(), GPT2_EOT_ID);
    let merges = merges
        .iter()
        .map(|(a, b)| (to_chars(a, &map), to_chars(b, &map)))
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .map_err(|e| DataError::Internal(format!("cannot build GPT-2's BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::data::test_support::{fixture, read_docs};

    fn sha256_lines(lines: impl Iterator<Item = String>) -> String {
        let mut h = Sha256::new();
        for l in lines {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
        format!("{:x}", h.finalize())
    }

    #[test]
    fn the_rebuilt_vocab_and_merges_are_gpt2s_files() {
        let (tokens, merges) = gpt2_ranks().expect("ranks");
        let map = byte_chars();
        // sha256 of `vocab.bpe` without its `#version` line, and of `encoder.json`'s tokens
        // in id order, one per line (tiktoken-rs 0.12.1's `assets/`).
        assert_eq!(merges.len(), 50_000);
        assert_eq!(
            sha256_lines(merges.iter().map(|(a, b)| format!(
                "{} {}",
                to_chars(a, &map),
                to_chars(b, &map)
            ))),
            "ac33235097fe06d4a8fff0feac994644809e6eb6ab70669e1e9fd40ae032428e"
        );
        assert_eq!(
            sha256_lines(
                tokens
                    .iter()
                    .map(|t| to_chars(t, &map))
                    .chain([ENDOFTEXT.to_string()])
            ),
            "2d5ce813bdd43a428e2a9ae5e86a22fe1a594a6e7171d84d445ba4101f3a964d"
        );
    }

    #[test]
    fn hello_world_is_15496_995_and_the_fixture_matches_tiktoken() {
        let tokenizer = gpt2_tokenizer().expect("gpt2");
        let ids = tokenizer
            .encode_fast("Hello world", false)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(ids, [15496, 995]);
        assert_eq!(
            tokenizer.token_to_id(ENDOFTEXT),
            Some(GPT2_EOT_ID),
            "<|endoftext|> keeps GPT-2's id"
        );
        let reference = tiktoken_rs::r50k_base().expect("r50k");
        for name in ["code.jsonl", "latex.jsonl", "wikipedia.jsonl"] {
            for doc in read_docs(&fixture(name)).iter().take(20) {
                let ours = tokenizer.encode_fast(doc.as_str(), false).expect("encode");
                assert_eq!(
                    ours.get_ids(),
                    reference.encode_ordinary(doc).as_slice(),
                    "{name}: {}",
                    &doc[..doc.len().min(80)]
                );
            }
        }
    }
}
