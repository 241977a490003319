#!/usr/bin/env python3
"""Training throughput: autoscale's GPT-2 on libtorch (tch) vs the same model in PyTorch eager.

Both sides train the same network (GPT-2: pre-LayerNorm, learned positions, tied embeddings,
tanh GELU, causal scaled_dot_product_attention; byte vocabulary of 257) with the same step
(AdamW with weight decay 0.01, linear warmup/decay, gradient clipping at 1.0, fp32) on the
same libtorch (the torch wheel in .venv that autoscale links) and the same CPU threads, on
windows of the fixture corpus. Reported: steady-state training tokens/s = tokens per step over
the median time of the steps after the first `--warmup` (the median, because a shared machine's
other work lands on a few steps); the two sides alternate `--repeats` times and each keeps its
best.

    PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 cargo build --release --workspace
    .venv/bin/python examples/bench/train_bench.py --autoscale target/release/autoscale-train

The autoscale side runs `autoscale-train job JOB.json`, the child process the `train` stage
kind starts, and reads its per-step progress lines. Results go to
examples/bench/train_bench_results.json (and a markdown table on stdout).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "corpus")

# (layers, width, heads, positions), as in stages/train/src/preset.rs
PRESETS = {
    "gpt2-tiny": (2, 128, 4, 128),
    "gpt2": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt2-large": (36, 1280, 20, 1024),
}
VOCAB = 257


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers, d, heads, positions):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(positions, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def fixture_tokens():
    """The fixture's documents as bytes, each preceded by end-of-text (256)."""
    out = []
    for name in sorted(os.listdir(FIXTURE)):
        if name.endswith(".jsonl"):
            with open(os.path.join(FIXTURE, name), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        out.append(256)
                        out.extend(json.loads(line)["text"].encode("utf-8"))
    return torch.tensor(out, dtype=torch.long)


def summarize(step_s, warmup, step_tokens):
    measured = sorted(step_s[warmup:])
    median = measured[len(measured) // 2] if len(measured) % 2 else sum(measured[len(measured) // 2 - 1:][:2]) / 2
    return {"tokens_per_s": step_tokens / median, "mean_tokens_per_s": len(measured) * step_tokens / sum(measured),
            "step_s": step_s}


def bench_python(model_name, seq, batch, steps, warmup, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers, d, heads, positions = PRESETS[model_name]
    model = GPT(layers, d, heads, positions)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    total = steps
    warm = max(1, round(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, 1 - (s - warm) / max(1, total - warm)))
    data = fixture_tokens()
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        w = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        opt.zero_grad(set_to_none=True)
        loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return summarize(times, warmup, batch * seq)


def bench_autoscale(binary, model_name, seq, batch, steps, warmup, threads):
    with tempfile.TemporaryDirectory() as tmp:
        tokens = steps * batch * seq
        # The job file the `train` kind writes (stages/train/src/spec.rs, TrainSpec).
        job = {"train": {
            "data": FIXTURE, "out_dir": os.path.join(tmp, "out"), "scratch_dir": os.path.join(tmp, "scratch"),
            "device": "cpu", "model": model_name, "model_overrides": {}, "dropout": 0.0,
            "mixture": {"weights": {"weights": {d: 1.0 for d in ("books", "code", "forum", "latex", "manuals", "web", "wikipedia")},
                                    "total_tokens": tokens}},
            "epochs": 1, "seq_len": seq, "batch_size": batch, "grad_accum": 1,
            "lr": 2e-4, "min_lr": 0.0, "warmup": 0.1, "schedule": "linear", "weight_decay": 0.01,
            "grad_clip": 1.0, "beta1": 0.9, "beta2": 0.999, "adam_eps": 1e-8, "seed": 0,
            "eval": {"domains": ["books"], "tokens": seq, "curve_tokens": seq, "every": 0},
            "checkpoint_every": 1000000, "checkpoint_minutes": 1e9, "log_every": 1, "threads": threads,
            "held_out": {"val_fraction": 0.1, "val_docs": 50},
        }}
        os.makedirs(job["train"]["out_dir"])
        os.makedirs(job["train"]["scratch_dir"])
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        env.pop("LD_LIBRARY_PATH", None)
        proc = subprocess.run([binary, "job", path], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"autoscale-train job failed:\n{proc.stderr[-3000:]}")
        steps_s = []
        for line in proc.stdout.splitlines():
            msg = json.loads(line)
            p = msg.get("progress")
            if p and p.get("tokens_per_s"):
                steps_s.append(batch * seq / p["tokens_per_s"])
        return summarize(steps_s, warmup, batch * seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--autoscale", default=os.path.join(ROOT, "target", "release", "autoscale-train"))
    ap.add_argument("--models", default="gpt2-tiny,gpt2")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", default="gpt2-tiny=16,gpt2=4", help="batch per model: name=n,...")
    ap.add_argument("--steps", default="gpt2-tiny=60,gpt2=8", help="steps per model: name=n,...")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times; best of each")
    ap.add_argument("--json", default=os.path.join(ROOT, "examples", "bench", "train_bench_results.json"))
    args = ap.parse_args()
    per = lambda text: {k: int(v) for k, v in (x.split("=") for x in text.split(","))}
    batches, step_counts = per(args.batch), per(args.steps)
    rows = []
    for model_name in args.models.split(","):
        batch, steps = batches[model_name], step_counts[model_name]
        best = {}
        for _ in range(args.repeats):
            for side in ("autoscale", "pytorch"):
                if side == "autoscale":
                    r = bench_autoscale(args.autoscale, model_name, args.seq, batch, steps, args.warmup, args.threads)
                else:
                    r = bench_python(model_name, args.seq, batch, steps, args.warmup, args.threads)
                print(f"{model_name} {side}: {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
                if side not in best or r["tokens_per_s"] > best[side]["tokens_per_s"]:
                    best[side] = r
        rows.append({"model": model_name, "seq": args.seq, "batch": batch, "steps": steps,
                     "autoscale_tokens_per_s": best["autoscale"]["tokens_per_s"],
                     "pytorch_tokens_per_s": best["pytorch"]["tokens_per_s"],
                     "ratio": best["autoscale"]["tokens_per_s"] / best["pytorch"]["tokens_per_s"],
                     "autoscale_step_s": best["autoscale"]["step_s"], "pytorch_step_s": best["pytorch"]["step_s"]})
    result = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "warmup": args.warmup, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"torch {torch.__version__}, {args.threads} threads, seq {args.seq}, fp32, steady state after {args.warmup} steps\n")
    print("| model | batch × seq | steps | autoscale (tch) tokens/s | PyTorch eager tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} × {r['seq']} | {r['steps']} | {r['autoscale_tokens_per_s']:.0f} | "
              f"{r['pytorch_tokens_per_s']:.0f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
