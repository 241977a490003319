//! GPT-2 (Hugging Face `GPT2LMHeadModel`): pre-LayerNorm decoder, learned positions, tied
//! input and output embeddings, tanh-approximated GELU, causal attention through
//! `scaled_dot_product_attention`.

use tch::{Device, Kind, Tensor};

use super::{Params, conv1d, embed, layer_norm};
use autoscale_train::preset::ModelConfig;

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Block {
    ln_1: Norm,
    c_attn_w: Tensor,
    c_attn_b: Tensor,
    attn_proj_w: Tensor,
    attn_proj_b: Tensor,
    ln_2: Norm,
    c_fc_w: Tensor,
    c_fc_b: Tensor,
    mlp_proj_w: Tensor,
    mlp_proj_b: Tensor,
}

pub struct Gpt2 {
    n_head: i64,
    eps: f64,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
}

fn norm(p: &mut Params, prefix: &str, d: i64, device: Device) -> Norm {
    Norm {
        w: p.ones(format!("{prefix}.weight"), &[d], device),
        b: p.zeros(format!("{prefix}.bias"), &[d], device),
    }
}

impl Gpt2 {
    pub fn new(c: &ModelConfig, p: &mut Params, device: Device) -> Self {
        let (d, f) = (c.n_embd, c.n_inner);
        let std = 0.02;
        let proj_std = std / (2.0 * c.n_layer as f64).sqrt();
        let wte = p.normal(
            "transformer.wte.weight".into(),
            &[c.vocab_size, d],
            std,
            device,
        );
        let wpe = p.normal(
            "transformer.wpe.weight".into(),
            &[c.n_positions, d],
            std,
            device,
        );
        let blocks = (0..c.n_layer)
            .map(|i| {
                let at = |s: &str| format!("transformer.h.{i}.{s}");
                Block {
                    ln_1: norm(p, &at("ln_1"), d, device),
                    c_attn_w: p.normal(at("attn.c_attn.weight"), &[d, 3 * d], std, device),
                    c_attn_b: p.zeros(at("attn.c_attn.bias"), &[3 * d], device),
                    attn_proj_w: p.normal(at("attn.c_proj.weight"), &[d, d], proj_std, device),
                    attn_proj_b: p.zeros(at("attn.c_proj.bias"), &[d], device),
                    ln_2: norm(p, &at("ln_2"), d, device),
                    c_fc_w: p.normal(at("mlp.c_fc.weight"), &[d, f], std, device),
                    c_fc_b: p.zeros(at("mlp.c_fc.bias"), &[f], device),
                    mlp_proj_w: p.normal(at("mlp.c_proj.weight"), &[f, d], proj_std, device),
                    mlp_proj_b: p.zeros(at("mlp.c_proj.bias"), &[d], device),
                }
            })
            .collect();
        let ln_f = norm(p, "transformer.ln_f", d, device);
        Self {
            n_head: c.n_head,
            eps: c.layer_norm_eps,
            wte,
            wpe,
            blocks,
            ln_f,
        }
    }

    /// Logits `[batch, seq, vocab]` in `dtype`.
    // `x += y` on a tch tensor is an in-place add, which would overwrite the residual that
    // layer norm's backward still needs.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, ids: &Tensor, dropout: f64, dtype: Kind) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let d = self.wte.size()[1];
        let hd = d / self.n_head;
        let positions = Tensor::arange(t, (Kind::Int64, ids.device()));
        let mut x = embed(&self.wte, ids) + embed(&self.wpe, &positions);
        if dropout > 0.0 {
            x = x.dropout(dropout, true);
        }
        for block in &self.blocks {
            let h = layer_norm(&x, &block.ln_1.w, &block.ln_1.b, self.eps);
            let qkv = conv1d(&h, &block.c_attn_w, &block.c_attn_b, dtype)
                .view([b, t, 3, self.n_head, hd])
                .permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let y = Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &v,
                None,
                dropout,
                true,
                None::<f64>,
                false,
            )
            .transpose(1, 2)
            .reshape([b, t, d]);
            let mut y = conv1d(&y, &block.attn_proj_w, &block.attn_proj_b, dtype);
            if dropout > 0.0 {
                y = y.dropout(dropout, true);
            }
            x = x + y;
            let h = layer_norm(&x, &block.ln_2.w, &block.ln_2.b, self.eps);
            let h = conv1d(&h, &block.c_fc_w, &block.c_fc_b, dtype).gelu("tanh");
            let mut h = conv1d(&h, &block.mlp_proj_w, &block.mlp_proj_b, dtype);
            if dropout > 0.0 {
                h = h.dropout(dropout, true);
            }
            x = x + h;
        }
        let x = layer_norm(&x, &self.ln_f.w, &self.ln_f.b, self.eps);
        // Tied output embedding.
        x.to_kind(dtype).matmul(&self.wte.to_kind(dtype).tr())
    }
}
