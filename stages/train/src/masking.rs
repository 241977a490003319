//! BERT's masked-LM corruption: 15% of the tokens (never end-of-text) are chosen; of those, 80%
//! become `[MASK]`, 10% a random token, 10% stay as they are. The model predicts every chosen
//! token's original id.

use crate::rng::SplitMix64;

pub const MASK_PROBABILITY: f64 = 0.15;

/// Corrupts `tokens` in place and returns `(position, original id)` of every chosen token.
pub fn mask_tokens(
    tokens: &mut [i64],
    eot: i64,
    mask: i64,
    vocab_size: i64,
    rng: &mut SplitMix64,
) -> Vec<(usize, i64)> {
    let mut chosen = Vec::new();
    for (i, t) in tokens.iter_mut().enumerate() {
        if *t == eot || rng.unit() >= MASK_PROBABILITY {
            continue;
        }
        chosen.push((i, *t));
        let r = rng.unit();
        if r < 0.8 {
            *t = mask;
        } else if r < 0.9 {
            // Any id but [MASK].
            let mut id = rng.below((vocab_size - 1).max(1) as u64) as i64;
            if id >= mask {
                id += 1;
            }
            *t = id;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifteen_percent_split_eighty_ten_ten_and_never_eot() {
        let mut rng = SplitMix64::new(11);
        let n = 200_000;
        let original: Vec<i64> = (0..n)
            .map(|i| if i % 50 == 0 { 256 } else { i % 256 })
            .collect();
        let mut tokens = original.clone();
        let chosen = mask_tokens(&mut tokens, 256, 257, 258, &mut rng);
        let share = chosen.len() as f64 / (n as f64 * 49.0 / 50.0);
        assert!((share - 0.15).abs() < 0.005, "{share}");
        let masked = chosen.iter().filter(|&&(i, _)| tokens[i] == 257).count() as f64;
        let kept = chosen.iter().filter(|&&(i, o)| tokens[i] == o).count() as f64;
        let total = chosen.len() as f64;
        assert!((masked / total - 0.8).abs() < 0.01, "{}", masked / total);
        // Kept: the 10% left alone, plus random draws that hit the same id (1/257 of 10%).
        assert!((kept / total - 0.1).abs() < 0.01, "{}", kept / total);
        assert!(
            chosen
                .iter()
                .all(|&(i, o)| o == original[i] && original[i] != 256)
        );
        assert!(tokens.iter().all(|&t| (0..258).contains(&t)));
        // Unchosen positions are untouched.
        let chosen_at: std::collections::HashSet<usize> = chosen.iter().map(|c| c.0).collect();
        assert!(
            (0..n as usize)
                .filter(|i| !chosen_at.contains(i))
                .all(|i| tokens[i] == original[i])
        );
    }
}
