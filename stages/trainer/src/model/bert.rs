//! BERT (Hugging Face `BertForMaskedLM`): post-LayerNorm encoder, learned positions and token
//! types, exact GELU, bidirectional attention through `scaled_dot_product_attention`, and the
//! masked-LM head with its output tied to the word embeddings.

use tch::{Device, Kind, Tensor};

use super::{Params, embed, layer_norm, linear};
use autoscale_train::preset::ModelConfig;

struct Dense {
    w: Tensor,
    b: Tensor,
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

pub struct Bert {
    n_head: i64,
    eps: f64,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    transform: Dense,
    transform_norm: Norm,
    decoder_bias: Tensor,
}

fn dense(p: &mut Params, prefix: &str, n_in: i64, n_out: i64, device: Device) -> Dense {
    Dense {
        w: p.normal(format!("{prefix}.weight"), &[n_out, n_in], 0.02, device),
        b: p.zeros(format!("{prefix}.bias"), &[n_out], device),
    }
}

fn norm(p: &mut Params, prefix: &str, d: i64, device: Device) -> Norm {
    Norm {
        w: p.ones(format!("{prefix}.weight"), &[d], device),
        b: p.zeros(format!("{prefix}.bias"), &[d], device),
    }
}

impl Bert {
    pub fn new(c: &ModelConfig, p: &mut Params, device: Device) -> Self {
        let (d, f) = (c.n_embd, c.n_inner);
        let word = p.normal(
            "bert.embeddings.word_embeddings.weight".into(),
            &[c.vocab_size, d],
            0.02,
            device,
        );
        let position = p.normal(
            "bert.embeddings.position_embeddings.weight".into(),
            &[c.n_positions, d],
            0.02,
            device,
        );
        let token_type = p.normal(
            "bert.embeddings.token_type_embeddings.weight".into(),
            &[2, d],
            0.02,
            device,
        );
        let emb_norm = norm(p, "bert.embeddings.LayerNorm", d, device);
        let layers = (0..c.n_layer)
            .map(|i| {
                let at = |s: &str| format!("bert.encoder.layer.{i}.{s}");
                Layer {
                    query: dense(p, &at("attention.self.query"), d, d, device),
                    key: dense(p, &at("attention.self.key"), d, d, device),
                    value: dense(p, &at("attention.self.value"), d, d, device),
                    attn_out: dense(p, &at("attention.output.dense"), d, d, device),
                    attn_norm: norm(p, &at("attention.output.LayerNorm"), d, device),
                    intermediate: dense(p, &at("intermediate.dense"), d, f, device),
                    output: dense(p, &at("output.dense"), f, d, device),
                    out_norm: norm(p, &at("output.LayerNorm"), d, device),
                }
            })
            .collect();
        let transform = dense(p, "cls.predictions.transform.dense", d, d, device);
        let transform_norm = norm(p, "cls.predictions.transform.LayerNorm", d, device);
        let decoder_bias = p.zeros("cls.predictions.bias".into(), &[c.vocab_size], device);
        Self {
            n_head: c.n_head,
            eps: c.layer_norm_eps,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            transform,
            transform_norm,
            decoder_bias,
        }
    }

    /// Logits `[n, vocab]` at `positions` (flat indices into `[batch × seq]`), in `dtype`. Only
    /// the masked positions go through the output head.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        dropout: f64,
        dtype: Kind,
    ) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let d = self.word.size()[1];
        let hd = d / self.n_head;
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let x = embed(&self.word, ids) + embed(&self.position, &pos) + self.token_type.get(0);
        let mut x = layer_norm(&x, &self.emb_norm.w, &self.emb_norm.b, self.eps);
        if dropout > 0.0 {
            x = x.dropout(dropout, true);
        }
        let heads = |y: Tensor| y.view([b, t, self.n_head, hd]).transpose(1, 2);
        for l in &self.layers {
            let q = heads(linear(&x, &l.query.w, &l.query.b, dtype));
            let k = heads(linear(&x, &l.key.w, &l.key.b, dtype));
            let v = heads(linear(&x, &l.value.w, &l.value.b, dtype));
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &v,
                None,
                dropout,
                false,
                None::<f64>,
                false,
            )
            .transpose(1, 2)
            .reshape([b, t, d]);
            let mut a = linear(&a, &l.attn_out.w, &l.attn_out.b, dtype);
            if dropout > 0.0 {
                a = a.dropout(dropout, true);
            }
            x = layer_norm(&(a + &x), &l.attn_norm.w, &l.attn_norm.b, self.eps);
            let h = linear(&x, &l.intermediate.w, &l.intermediate.b, dtype).gelu("none");
            let mut h = linear(&h, &l.output.w, &l.output.b, dtype);
            if dropout > 0.0 {
                h = h.dropout(dropout, true);
            }
            x = layer_norm(&(h + &x), &l.out_norm.w, &l.out_norm.b, self.eps);
        }
        let x = x.view([b * t, d]).index_select(0, positions);
        let h = linear(&x, &self.transform.w, &self.transform.b, dtype).gelu("none");
        let h = layer_norm(&h, &self.transform_norm.w, &self.transform_norm.b, self.eps);
        // Tied output embedding.
        linear(&h, &self.word, &self.decoder_bias, dtype)
    }
}
