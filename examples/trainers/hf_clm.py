#!/usr/bin/env python3
"""A causal-LM trainer on Hugging Face `transformers`, as an autoscale `command` stage.

It shows the trainer contract (README, "Bring your own trainer") with a trainer people already
trust: a GPT-2 (`GPT2LMHeadModel`, built from a config, no download) trained with `torch` on the
`shard` stage's Arrow shards, read with `pyarrow`, then scored per domain on each domain's
validation split.

What it reads (all from the environment the engine gives a `command` stage):
  AUTOSCALE_PARAMS_JSON  the stage's params: the mixture as `tokens` ({domain: training tokens})
                         or as `total_tokens` with `weights` ({domain: share}) or a `weights`
                         input; `seed` (and `data_seed`, which redraws the windows only); the
                         model and optimizer settings below
  AUTOSCALE_INPUT_DATA   the `shard` stage's output: manifest.json and Arrow IPC shards
  AUTOSCALE_INPUT_WEIGHTS (optional) a mixture stage's output holding weights.json
  AUTOSCALE_SCRATCH      kept across a killed run: a checkpoint, resumed from if present
  CUDA_VISIBLE_DEVICES   the devices the engine assigned (cuda:0 is the first of them)
What it writes to AUTOSCALE_OUT:
  eval.json   {"domains": {d: {"loss": nats per token, "ppl": e^loss, "tokens": n}},
               "curve": [{"step", "tokens", "mean_loss", "domains": {d: loss}}], "train": {...}}
  model/      the trained model (`save_pretrained`), unless `save_model` is false

The same params and seed give the same windows in the same order; on the CPU the same
eval.json (PyTorch's CPU kernels are deterministic for this model).

    python3 examples/trainers/hf_clm.py --self-test
"""

import json
import math
import os
import sys
import time

DEFAULTS = {
    "seed": 0,
    "n_layer": 1,
    "n_embd": 64,
    "n_head": 2,
    "seq_len": 64,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup": 0.1,
    "weight_decay": 0.01,
    "eval_tokens": 8192,
    "eval_every": 0,
    "curve_tokens": 4096,
    "threads": 1,
    "checkpoint_every": 200,
    "save_model": True,
}


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The contract: params and inputs


def read_params(environ):
    text = environ.get("AUTOSCALE_PARAMS_JSON")
    if text is None:
        raise UsageError("AUTOSCALE_PARAMS_JSON is not set: run this as an autoscale `command` stage")
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"AUTOSCALE_PARAMS_JSON is not JSON: {e}") from None
    params = dict(DEFAULTS)
    params.update({k: v for k, v in given.items() if v is not None})
    return params


def read_weights_input(environ):
    """`weights` from a mixture stage's weights.json (`{"weights": {...}}`), if given."""
    path = environ.get("AUTOSCALE_INPUT_WEIGHTS")
    if not path:
        return None
    file = os.path.join(path, "weights.json") if os.path.isdir(path) else path
    with open(file, encoding="utf-8") as f:
        weights = json.load(f).get("weights")
    if not isinstance(weights, dict) or not weights:
        raise UsageError(f"{file}: no `weights` object ({{\"weights\": {{domain: share}}}})")
    return weights


def token_budget(params, weights_input):
    """{domain: training tokens}: `tokens` as given, or `total_tokens` split by the weights."""
    if params.get("tokens"):
        tokens = {d: int(round(float(n))) for d, n in params["tokens"].items()}
    else:
        weights = weights_input or params.get("weights")
        total = params.get("total_tokens")
        if not weights or total is None:
            raise UsageError(
                "no mixture: give `tokens` ({domain: n}), or `total_tokens` with `weights` "
                "(a param or a `weights` input holding weights.json)"
            )
        norm = sum(float(w) for w in weights.values())
        if norm <= 0:
            raise UsageError(f"the weights sum to {norm}; they must sum to a positive number")
        tokens = {d: int(round(float(total) * float(w) / norm)) for d, w in weights.items()}
    bad = {d: n for d, n in tokens.items() if n < 0}
    if bad:
        raise UsageError(f"negative token counts: {bad}")
    return tokens


class Shards:
    """The `shard` stage's output, one split of one domain at a time, as one numpy array."""

    def __init__(self, root):
        self.root = root
        path = os.path.join(root, "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{path} is missing: the `data` input must be a `shard` stage") from None
        self.domains = sorted(self.manifest["domains"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eot_id = int(self.manifest["eot_id"])
        # Validation splits, decoded once: every curve point scores them again.
        self._val = {}

    def tokens(self, domain, split):
        if split == "val":
            if domain not in self._val:
                self._val[domain] = self._read(domain, split)
            return self._val[domain]
        return self._read(domain, split)

    def _read(self, domain, split):
        import numpy as np
        import pyarrow as pa

        if domain not in self.manifest["domains"]:
            raise UsageError(
                f"domain `{domain}` is not in the shards (they have: {', '.join(self.domains)})"
            )
        parts = []
        for shard in self.manifest["domains"][domain][split]["shards"]:
            with pa.memory_map(os.path.join(self.root, shard["file"])) as source:
                table = pa.ipc.open_stream(source).read_all()
            parts.append(table.column("token").to_numpy().astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def draw_windows(shards, budget, seq_len, seed):
    """Training windows of `seq_len + 1` tokens: each domain's budget over random offsets of
    its training split (a fixed generator per seed), then shuffled together."""
    import numpy as np

    rng = np.random.default_rng(seed)
    windows = []
    for domain in sorted(budget):
        count = budget[domain] // seq_len
        if count == 0:
            continue
        stream = shards.tokens(domain, "train")
        if len(stream) < seq_len + 1:
            raise UsageError(f"domain `{domain}` has {len(stream)} training tokens, fewer than one window")
        starts = rng.integers(0, len(stream) - seq_len, size=count)
        windows.append(np.stack([stream[s : s + seq_len + 1] for s in starts]))
    if not windows:
        raise UsageError(f"the mixture {budget} gives no window of {seq_len} tokens")
    all_windows = np.concatenate(windows)
    return all_windows[rng.permutation(len(all_windows))]


# ---------------------------------------------------------------------------------------------
# Training


def build_model(params, vocab_size, eot_id):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=params["seq_len"],
        n_embd=params["n_embd"],
        n_layer=params["n_layer"],
        n_head=params["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )
    return GPT2LMHeadModel(config)


def evaluate(torch, model, shards, params, device, limit):
    """Mean loss per token on each domain's validation split (its first `limit` tokens)."""
    model.eval()
    seq = params["seq_len"]
    result = {}
    with torch.no_grad():
        for domain in shards.domains:
            stream = shards.tokens(domain, "val")[: limit + 1]
            n = (len(stream) - 1) // seq
            if n == 0:
                continue
            x = torch.from_numpy(stream[: n * seq]).view(n, seq)
            y = torch.from_numpy(stream[1 : n * seq + 1]).view(n, seq)
            total = 0.0
            for i in range(0, n, 16):
                logits = model(input_ids=x[i : i + 16].to(device)).logits
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), y[i : i + 16].reshape(-1).to(device), reduction="sum"
                ).item()
            result[domain] = {"loss": total / (n * seq), "tokens": n * seq}
    model.train()
    return result


def train(environ):
    import numpy as np
    import torch

    params = read_params(environ)
    out = environ.get("AUTOSCALE_OUT") or ""
    data = environ.get("AUTOSCALE_INPUT_DATA")
    if not out or not data:
        raise UsageError("AUTOSCALE_OUT and AUTOSCALE_INPUT_DATA must be set (inputs: {data: shard})")
    scratch = environ.get("AUTOSCALE_SCRATCH") or os.path.join(out, ".scratch")
    os.makedirs(scratch, exist_ok=True)
    torch.set_num_threads(int(params["threads"]))
    torch.manual_seed(int(params["seed"]))
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    shards = Shards(data)
    budget = token_budget(params, read_weights_input(environ))
    seq, batch = int(params["seq_len"]), int(params["batch_size"])
    # DDO's data replicates (`replicate: data`) redraw the windows only, through `data_seed`.
    data_seed = params.get("data_seed")
    windows = draw_windows(shards, budget, seq, int(params["seed"] if data_seed is None else data_seed))
    steps = max(1, len(windows) // batch)
    model = build_model(params, shards.vocab_size, shards.eot_id).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(params["weight_decay"])},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=float(params["lr"]),
    )
    warmup = max(1, int(float(params["warmup"]) * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )

    checkpoint = os.path.join(scratch, "checkpoint.pt")
    start, curve = 0, []
    if os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, curve = state["step"], state["curve"]
        print(f"resumed from step {start} of {steps}", file=sys.stderr)

    began = time.time()
    train_loss = None
    stop_at = int(environ.get("HF_CLM_STOP_AT", "0") or 0)
    for step in range(start, steps):
        chunk = torch.from_numpy(np.ascontiguousarray(windows[step * batch : (step + 1) * batch])).to(device)
        logits = model(input_ids=chunk[:, :-1]).logits
        # Every window gives `seq_len` next-token predictions (its last token is only a target).
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_loss = loss.item()
        done = step + 1
        every = int(params["eval_every"])
        if every and (done % every == 0 or done == steps):
            point = evaluate(torch, model, shards, params, device, int(params["curve_tokens"]))
            losses = {d: m["loss"] for d, m in point.items()}
            curve.append({"step": done, "tokens": done * batch * seq,
                          "mean_loss": sum(losses.values()) / len(losses), "domains": losses})
        if done % int(params["checkpoint_every"]) == 0 and done < steps:
            tmp = checkpoint + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": done, "curve": curve}, tmp)
            os.replace(tmp, checkpoint)
        if stop_at == done:
            # The self-test's stand-in for a kill: stop hard after this step's checkpoint.
            os._exit(3)

    final = evaluate(torch, model, shards, params, device, int(params["eval_tokens"]))
    for m in final.values():
        m["ppl"] = math.exp(m["loss"])
    report = {
        "domains": final,
        "mean_loss": sum(m["loss"] for m in final.values()) / len(final),
        "curve": curve,
        "train": {"steps": steps, "tokens": steps * batch * seq, "final_train_loss": train_loss,
                  "budget": budget, "seconds": round(time.time() - began, 3),
                  "device": device.type, "trainer": "examples/trainers/hf_clm.py"},
    }
    tmp = os.path.join(out, ".eval.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "eval.json"))
    if params["save_model"]:
        model.save_pretrained(os.path.join(out, "model"))
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    return report


# ---------------------------------------------------------------------------------------------
# Self-test: a synthetic `shard` output, two runs of the same seed, a resumed run.


def write_fake_shards(root, domains, vocab):
    import numpy as np
    import pyarrow as pa

    manifest = {"format": "arrow-ipc-stream", "dtype": "uint16", "vocab_size": vocab, "eot_id": vocab - 1,
                "domains": {}}
    rng = np.random.default_rng(0)
    for i, domain in enumerate(domains):
        splits = {}
        for split, n in (("train", 20000), ("val", 2000)):
            # Each domain a different cycle, so a mixture changes what the model learns.
            tokens = ((np.arange(n) * (i + 2)) % (vocab - 1) + rng.integers(0, 2, n)).astype(np.uint16)
            file = f"{domain}-{split}.arrow"
            table = pa.table({"token": pa.array(tokens, type=pa.uint16())})
            with pa.OSFile(os.path.join(root, file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            splits[split] = {"tokens": n, "shards": [{"file": file, "tokens": n}]}
        manifest["domains"][domain] = splits
    with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def same_eval(a, b, rel=1e-6):
    """Equal per-domain losses up to `rel`: one machine gives equal floats, but a verdict must
    not hinge on the last bit (another CPU's kernels may round differently)."""
    return a.keys() == b.keys() and all(
        abs(a[d]["loss"] - b[d]["loss"]) <= rel * abs(a[d]["loss"]) for d in a
    )


def self_test():
    import subprocess
    import tempfile

    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_fake_shards(data, ["alpha", "beta"], 64)
        base = {"AUTOSCALE_INPUT_DATA": data}
        params = {"tokens": {"alpha": 6000, "beta": 2000}, "seq_len": 32, "batch_size": 4,
                  "n_embd": 32, "eval_tokens": 1024, "eval_every": 20, "curve_tokens": 512,
                  "checkpoint_every": 25, "save_model": False, "seed": 3}
        runs = []
        for name in ("a", "b"):
            out = os.path.join(tmp, name)
            os.makedirs(out)
            env = dict(base, AUTOSCALE_OUT=out, AUTOSCALE_SCRATCH=os.path.join(tmp, name + "-scratch"),
                       AUTOSCALE_PARAMS_JSON=json.dumps(params))
            runs.append(train(env))
        a, b = runs
        check(sorted(a["domains"]) == ["alpha", "beta"], "eval.json scores every domain of the shards")
        check(all(m["loss"] > 0 and abs(m["ppl"] - math.exp(m["loss"])) < 1e-9 for m in a["domains"].values()),
              "each domain has a loss and its perplexity")
        check(same_eval(a["domains"], b["domains"]) and [p["step"] for p in a["curve"]] == [p["step"] for p in b["curve"]],
              "the same seed gives the same eval.json")
        check(a["train"]["steps"] == 62 and len(a["curve"]) == 4, "8,000 tokens of 32 in batches of 4: 62 steps, 4 curve points")
        uniform = math.log(64)
        check(a["mean_loss"] < uniform - 0.5, f"the model learned: mean loss {a['mean_loss']:.3f} < ln(64) - 0.5")

        # A run killed after its checkpoint resumes from it and ends where an unbroken run does.
        out = os.path.join(tmp, "c")
        scratch = os.path.join(tmp, "c-scratch")
        os.makedirs(out)
        env = dict(base, AUTOSCALE_OUT=out, AUTOSCALE_SCRATCH=scratch,
                   AUTOSCALE_PARAMS_JSON=json.dumps(params))
        code = ("import os, sys, runpy; sys.argv=['hf_clm']; os.environ['HF_CLM_STOP_AT']='30'; "
                f"runpy.run_path({__file__!r}, run_name='__main__')")
        cp = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                            capture_output=True, text=True)
        check(cp.returncode == 3 and os.path.exists(os.path.join(scratch, "checkpoint.pt")),
              f"a run stopped at step 30 leaves the step-25 checkpoint (exit {cp.returncode}: {cp.stderr[-300:]})")
        resumed = train(env)
        check(same_eval(resumed["domains"], a["domains"]), "the resumed run ends with the unbroken run's eval.json")

        # Weights and total tokens from a mixture stage's weights.json.
        wdir = os.path.join(tmp, "w")
        os.makedirs(wdir)
        with open(os.path.join(wdir, "weights.json"), "w", encoding="utf-8") as f:
            json.dump({"weights": {"alpha": 0.75, "beta": 0.25}}, f)
        out = os.path.join(tmp, "d")
        os.makedirs(out)
        by_weights = dict(params, total_tokens=8000)
        del by_weights["tokens"]
        d = train(dict(base, AUTOSCALE_OUT=out, AUTOSCALE_SCRATCH=out + "-s", AUTOSCALE_INPUT_WEIGHTS=wdir,
                       AUTOSCALE_PARAMS_JSON=json.dumps(by_weights)))
        check(d["train"]["budget"] == {"alpha": 6000, "beta": 2000}, "weights.json and total_tokens give the same budget")
        check(same_eval(d["domains"], a["domains"]), "and the same result as the equal `tokens`")

        try:
            token_budget(dict(DEFAULTS), None)
            check(False, "no mixture is an error")
        except UsageError as e:
            check("no mixture" in str(e), "no mixture is a usage error naming what to give")
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        train(os.environ)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
