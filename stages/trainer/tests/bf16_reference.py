#!/usr/bin/env python3
"""GPT-2's forward pass in PyTorch with the casts autoscale's trainer makes on CUDA, on the CPU.

    python bf16_reference.py DIR

DIR holds weights.safetensors (Hugging Face names, fp32) and case.json (`input_ids`, `targets`,
`n_head`, `eps`). For `fp32` and `bf16` matrix products, prints the summed cross-entropy and
the logits (fp32, flattened): one JSON object. The casts mirror stages/trainer/src/model:
embeddings, residual sums and layer norm in fp32; every matrix product's inputs (Conv1D
layers, attention, the tied output projection) in the compute dtype; the loss in fp32.
Exit status 3 when torch or safetensors is not importable (the caller skips).
"""

import json
import os
import sys

try:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
except ImportError as e:  # the caller reports SKIPPED
    print(json.dumps({"skipped": f"torch or safetensors is not importable: {e}"}))
    sys.exit(3)


def conv1d(x, w, b, dtype):
    shape = list(x.shape[:-1]) + [w.shape[1]]
    return torch.addmm(b.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), w.to(dtype)).view(shape)


def layer_norm(x, w, b, eps):
    return F.layer_norm(x.float(), (w.shape[0],), w, b, eps)


def forward(p, ids, n_head, eps, dtype):
    b, t = ids.shape
    wte = p["transformer.wte.weight"]
    d = wte.shape[1]
    hd = d // n_head
    x = F.embedding(ids, wte) + F.embedding(torch.arange(t), p["transformer.wpe.weight"])
    i = 0
    while f"transformer.h.{i}.ln_1.weight" in p:
        at = lambda s: p[f"transformer.h.{i}.{s}"]
        h = layer_norm(x, at("ln_1.weight"), at("ln_1.bias"), eps)
        qkv = conv1d(h, at("attn.c_attn.weight"), at("attn.c_attn.bias"), dtype)
        qkv = qkv.view(b, t, 3, n_head, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + conv1d(y, at("attn.c_proj.weight"), at("attn.c_proj.bias"), dtype)
        h = layer_norm(x, at("ln_2.weight"), at("ln_2.bias"), eps)
        h = F.gelu(conv1d(h, at("mlp.c_fc.weight"), at("mlp.c_fc.bias"), dtype), approximate="tanh")
        x = x + conv1d(h, at("mlp.c_proj.weight"), at("mlp.c_proj.bias"), dtype)
        i += 1
    x = layer_norm(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return x.to(dtype) @ wte.to(dtype).t()


def main():
    d = sys.argv[1]
    p = load_file(os.path.join(d, "weights.safetensors"))
    with open(os.path.join(d, "case.json"), encoding="utf-8") as f:
        case = json.load(f)
    ids = torch.tensor(case["input_ids"], dtype=torch.long)
    targets = torch.tensor(case["targets"], dtype=torch.long)
    out = {"torch": torch.__version__}
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            logits = forward(p, ids, case["n_head"], case["eps"], dtype).float()
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="sum")
            out[name] = {"loss_sum": loss.item(), "logits": logits.flatten().tolist()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
