//! Model configurations: the two architectures, their presets, and the Hugging Face
//! `config.json` each one exports as.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::TrainError;

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Decoder-only, next-token prediction (Hugging Face `GPT2LMHeadModel`).
    Gpt2,
    /// Encoder-only, masked-token prediction (Hugging Face `BertForMaskedLM`).
    Bert,
}

/// Everything that fixes a model's shapes. Names follow Hugging Face's configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// The preset it came from (`gpt2-tiny`, `gpt2-large`, `bert-base`...).
    pub preset: String,
    pub vocab_size: i64,
    /// The longest sequence (learned position embeddings).
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// Width of the MLP's hidden layer (4 × `n_embd` in every preset).
    pub n_inner: i64,
    pub layer_norm_eps: f64,
    /// Dropout on embeddings, attention and residual branches; 0 for short proxy runs.
    pub dropout: f64,
    /// BERT: the `[MASK]` token id (the last id of the vocabulary).
    pub mask_token: Option<i64>,
    /// The end-of-text / separator token.
    pub eot_token: i64,
}

/// The preset names `model` accepts.
pub const PRESETS: [&str; 6] = [
    "gpt2-tiny",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "bert-tiny",
    "bert-base",
];

/// Shape overrides `model_overrides` accepts.
pub const OVERRIDES: [&str; 4] = ["n_layer", "n_embd", "n_head", "n_positions"];

impl ModelConfig {
    /// A preset for a vocabulary of `vocab_size` ids with end-of-text token `eot_token`. BERT
    /// adds one id for `[MASK]` unless the data names one.
    pub fn preset(
        name: &str,
        vocab_size: i64,
        eot_token: i64,
        mask_token: Option<i64>,
    ) -> Result<Self, TrainError> {
        // (arch, layers, width, heads, positions, layer-norm eps)
        let (arch, n_layer, n_embd, n_head, n_positions, eps) = match name {
            // Seconds to minutes for a proxy run on 2 CPU cores.
            "gpt2-tiny" => (Arch::Gpt2, 2, 128, 4, 128, 1e-5),
            "gpt2" => (Arch::Gpt2, 12, 768, 12, 1024, 1e-5),
            "gpt2-medium" => (Arch::Gpt2, 24, 1024, 16, 1024, 1e-5),
            // The paper's model.
            "gpt2-large" => (Arch::Gpt2, 36, 1280, 20, 1024, 1e-5),
            "bert-tiny" => (Arch::Bert, 2, 128, 2, 128, 1e-12),
            "bert-base" => (Arch::Bert, 12, 768, 12, 512, 1e-12),
            other => {
                return Err(TrainError::param_hint(
                    "model",
                    format!("unknown model preset `{other}`"),
                    format!("use one of {}", PRESETS.join(", ")),
                ));
            }
        };
        let (vocab_size, mask_token) = match (arch, mask_token) {
            (Arch::Gpt2, _) => (vocab_size, None),
            (Arch::Bert, Some(mask)) => (vocab_size.max(mask + 1), Some(mask)),
            (Arch::Bert, None) => (vocab_size + 1, Some(vocab_size)),
        };
        Ok(ModelConfig {
            arch,
            preset: name.to_string(),
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: 4 * n_embd,
            layer_norm_eps: eps,
            dropout: 0.0,
            mask_token,
            eot_token,
        })
    }

    /// Applies `model_overrides` (`n_layer`, `n_embd`, `n_head`, `n_positions`).
    pub fn with_overrides(mut self, overrides: &Map<String, Value>) -> Result<Self, TrainError> {
        for (name, value) in overrides {
            let n = value.as_i64().filter(|&n| n > 0).ok_or_else(|| {
                TrainError::param(
                    "model_overrides",
                    format!("`{name}` must be a positive integer, not {value}"),
                )
            })?;
            match name.as_str() {
                "n_layer" => self.n_layer = n,
                "n_embd" => {
                    self.n_embd = n;
                    self.n_inner = 4 * n;
                }
                "n_head" => self.n_head = n,
                "n_positions" => self.n_positions = n,
                other => {
                    return Err(TrainError::param_hint(
                        "model_overrides",
                        format!("unknown override `{other}`"),
                        format!("overridable: {}", OVERRIDES.join(", ")),
                    ));
                }
            }
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.n_embd % self.n_head != 0 {
            return Err(TrainError::param(
                "model_overrides",
                format!(
                    "the width {} is not a multiple of the {} heads",
                    self.n_embd, self.n_head
                ),
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// Trainable parameters (tied embeddings counted once), as Hugging Face counts them.
    pub fn parameter_count(&self) -> i64 {
        let d = self.n_embd;
        let f = self.n_inner;
        let ln = 2 * d;
        match self.arch {
            Arch::Gpt2 => {
                let block = ln + (d * 3 * d + 3 * d) + (d * d + d) + ln + (d * f + f) + (f * d + d);
                self.vocab_size * d + self.n_positions * d + self.n_layer * block + ln
            }
            Arch::Bert => {
                let embeddings = self.vocab_size * d + self.n_positions * d + 2 * d + ln;
                let layer = 4 * (d * d + d) + ln + (d * f + f) + (f * d + d) + ln;
                let head = (d * d + d) + ln + self.vocab_size;
                embeddings + self.n_layer * layer + head
            }
        }
    }

    /// Training FLOPs per token: 6 × parameters (without embeddings) + attention, as in
    /// PaLM's appendix B; for model FLOPs utilisation.
    pub fn flops_per_token(&self, seq_len: i64) -> f64 {
        let non_embedding =
            self.parameter_count() - self.vocab_size * self.n_embd - self.n_positions * self.n_embd;
        // The output projection onto the vocabulary is real work even though its weights are
        // the (tied) embeddings.
        let head = self.vocab_size * self.n_embd;
        6.0 * (non_embedding + head) as f64 + 12.0 * (self.n_layer * self.n_embd * seq_len) as f64
    }

    /// The `config.json` Hugging Face `transformers` loads this model with.
    pub fn hf_config(&self) -> Value {
        match self.arch {
            Arch::Gpt2 => json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": self.vocab_size,
                "n_positions": self.n_positions,
                "n_ctx": self.n_positions,
                "n_embd": self.n_embd,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.n_inner,
                "activation_function": "gelu_new",
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout,
                "layer_norm_epsilon": self.layer_norm_eps,
                "initializer_range": 0.02,
                "bos_token_id": self.eot_token,
                "eos_token_id": self.eot_token,
                "tie_word_embeddings": true,
                "scale_attn_weights": true,
                "use_cache": true,
                "torch_dtype": "float32",
            }),
            Arch::Bert => json!({
                "architectures": ["BertForMaskedLM"],
                "model_type": "bert",
                "vocab_size": self.vocab_size,
                "hidden_size": self.n_embd,
                "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head,
                "intermediate_size": self.n_inner,
                "hidden_act": "gelu",
                "hidden_dropout_prob": self.dropout,
                "attention_probs_dropout_prob": self.dropout,
                "max_position_embeddings": self.n_positions,
                "type_vocab_size": 2,
                "initializer_range": 0.02,
                "layer_norm_eps": self.layer_norm_eps,
                "pad_token_id": self.eot_token,
                "position_embedding_type": "absolute",
                "tie_word_embeddings": true,
                "torch_dtype": "float32",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscale_errors::Hint;

    #[test]
    fn presets_have_hugging_face_parameter_counts() {
        // GPT-2's published sizes with its 50257-token vocabulary.
        let gpt2 = ModelConfig::preset("gpt2", 50257, 50256, None).unwrap();
        assert_eq!(gpt2.parameter_count(), 124_439_808);
        let medium = ModelConfig::preset("gpt2-medium", 50257, 50256, None).unwrap();
        assert_eq!(medium.parameter_count(), 354_823_168);
        let large = ModelConfig::preset("gpt2-large", 50257, 50256, None).unwrap();
        assert_eq!(large.parameter_count(), 774_030_080);
        assert_eq!((large.n_layer, large.n_embd, large.n_head), (36, 1280, 20));
        // bert-base-uncased has 30522 ids, including its own [MASK].
        let bert = ModelConfig::preset("bert-base", 30522, 102, Some(103)).unwrap();
        assert_eq!(bert.vocab_size, 30522);
        // BertForMaskedLM without the pooler: 109,514,298 with the MLM head.
        assert_eq!(bert.parameter_count(), 109_514_298);
    }

    #[test]
    fn bert_gets_a_mask_token_after_the_vocabulary() {
        let bert = ModelConfig::preset("bert-tiny", 257, 256, None).unwrap();
        assert_eq!(bert.vocab_size, 258);
        assert_eq!(bert.mask_token, Some(257));
        let gpt = ModelConfig::preset("gpt2-tiny", 257, 256, None).unwrap();
        assert_eq!((gpt.vocab_size, gpt.mask_token), (257, None));
    }

    #[test]
    fn unknown_presets_and_bad_overrides_are_refused_with_hints() {
        let err = ModelConfig::preset("gpt3", 257, 256, None).unwrap_err();
        assert!(err.hint().unwrap().contains("gpt2-large"), "{err}");
        let tiny = ModelConfig::preset("gpt2-tiny", 257, 256, None).unwrap();
        let mut o = Map::new();
        o.insert("n_embd".into(), json!(130));
        let err = tiny.clone().with_overrides(&o).unwrap_err();
        assert!(err.to_string().contains("multiple of the 4 heads"), "{err}");
        let mut o = Map::new();
        o.insert("n_layers".into(), json!(3));
        assert!(tiny.clone().with_overrides(&o).is_err());
        let mut o = Map::new();
        o.insert("n_layer".into(), json!(3));
        assert_eq!(tiny.with_overrides(&o).unwrap().n_layer, 3);
    }
}
