#!/usr/bin/env python3
"""What a `train` stage costs in memory, disk writes and time when its data is far larger than
what it trains on: the trainer reading Arrow shards in place (this tree) against the old
decode of every split into an unnamed temp file (an older build), same data, same run.

    .venv/bin/python examples/bench/stream_bench.py \\
        --build new=target/release --build old=/tmp/oldtree/target/release \\
        --tokens 200000000 --reps 2 [--json examples/bench/results-stream.json]

The data: two domains of `--tokens / 2` token ids each (uint16 below 1,024, the demo's
vocabulary size; record batches of 1 Mi ids, shard files of 64 Mi, as the `shard` kind writes
them, uncompressed), written once with pyarrow. The stage: `gpt2-tiny` with one layer, 0.25 M training tokens of each domain at
sequence length 128, a short eval. For each build and rep, in a fresh cache:
  wall          `autoscale run` from start to end (hashing the data input included, the same
                for both)
  stage         the train stage's own duration, from `--json` events
  outside       the stage less its training loop (eval.json's `train.seconds`): starting the
                trainer, opening (old: decoding) the data, the final eval
  tokens/s      the training loop's tokens/s (eval.json)
  peak RSS      the largest resident set of any process of the run (RUSAGE_CHILDREN)
  written       the most bytes one process of the run wrote (`write_bytes` of /proc/PID/io,
                polled every 20 ms over the processes whose command line names the run's
                folder): the trainer's unnamed temp file shows here, not in a listing; its
                checkpoints and export show in both
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

RECORD = 1 << 20
SHARD = 64 << 20
VOCAB = 1024


def write_shards(root, tokens_per_domain):
    rng = np.random.default_rng(0)
    domains = {}
    for name in ("web", "code"):
        splits = {}
        for split, n in (("train", tokens_per_domain), ("val", 1 << 20)):
            shards, done, index = [], 0, 0
            while done < n:
                size = min(SHARD, n - done)
                rel = f"{name}/{split}/shard-{index:05d}.arrow"
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                schema = pa.schema([("token", pa.uint16())])
                with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
                    left = size
                    while left:
                        m = min(RECORD, left)
                        ids = rng.integers(0, VOCAB, m, dtype=np.uint16)
                        w.write_batch(pa.record_batch([pa.array(ids)], schema=schema))
                        left -= m
                shards.append({"file": rel, "tokens": size})
                done += size
                index += 1
            splits[split] = {"tokens": n, "documents": max(1, n // 1000), "bytes": 4 * n, "shards": shards}
        domains[name] = splits
    manifest = {
        "format": "arrow-ipc-stream", "compression": "none", "column": "token", "dtype": "uint16",
        "shard_tokens": SHARD, "eot": "<|endoftext|>", "eot_id": VOCAB - 1, "vocab_size": VOCAB,
        "tokenizer_blake3": "", "domains": domains,
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


PIPELINE = """name: stream-bench
external: [DATA]
stages:
  - id: train
    kind: train
    inputs: {data: file:DATA}
    params:
      model: gpt2-tiny
      model_overrides: {n_layer: 1}
      tokens: {web: 262144, code: 262144}
      seq_len: 128
      batch_size: 8
      lr: 1.0e-3
      threads: 1
      eval_tokens: 65536
      eval_every: 0
"""


# Runs argv[2:] and writes the largest RSS of any of its processes (KiB) to argv[1]: a fresh
# process per run, since RUSAGE_CHILDREN keeps the largest over every child ever waited for.
WRAP = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def processes_of(work):
    """Every process whose command line names `work` (the trainer's job file lies under it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if work.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def one_run(bindir, data, work):
    cache = os.path.join(work, "cache")
    with open(os.path.join(work, "p.yaml"), "w") as f:
        f.write(PIPELINE.replace("DATA", data))
    rss_file = os.path.join(work, "rss")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAP, rss_file,
         os.path.join(bindir, "autoscale"), "--json", "--cache-dir", cache, "run", "p.yaml", "--gpus", "none"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    written = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for pid in processes_of(work):
                try:
                    with open(f"/proc/{pid}/io") as f:
                        for line in f:
                            if line.startswith("write_bytes:"):
                                written[pid] = max(written.get(pid, 0), int(line.split()[1]))
                except OSError:
                    pass
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    out, _ = proc.communicate()
    wall = time.monotonic() - started
    stop.set()
    t.join()
    if proc.returncode != 0:
        sys.exit(f"{bindir}: autoscale run failed ({proc.returncode}):\n{out[-3000:]}")
    stage_ms = None
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "finished" and ev.get("stage") == "train":
            stage_ms = ev.get("duration_ms")
    with open(rss_file) as f:
        rss = int(f.read())
    evals = glob.glob(os.path.join(cache, "v1", "out", "*", "eval.json"))
    with open(evals[0]) as f:
        train = json.load(f)["train"]
    return {
        "wall_s": round(wall, 2),
        "stage_s": None if stage_ms is None else round(stage_ms / 1000, 2),
        # The stage less its training loop: process start, opening the data, the final eval.
        "outside_training_s": None if stage_ms is None else round(stage_ms / 1000 - train["seconds"], 2),
        "train_tokens_per_s": round(train["tokens_per_s"]),
        "peak_rss_mib": round(rss / 1024, 1),
        "max_written_mib": round(max(written.values(), default=0) / 2**20, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="append", required=True, help="NAME=DIR holding autoscale and autoscale-train")
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.build]
    results = {"tokens": args.tokens, "runs": []}
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "shards")
        t = time.monotonic()
        write_shards(data, args.tokens // 2)
        print(f"data: {args.tokens} tokens in {time.monotonic() - t:.1f} s", file=sys.stderr)
        for rep in range(args.reps):
            # Alternate the order, so neither build always runs on a warmer page cache.
            order = builds if rep % 2 == 0 else builds[::-1]
            for name, bindir in order:
                with tempfile.TemporaryDirectory(dir=d) as work:
                    r = one_run(os.path.abspath(bindir), data, work)
                r.update(build=name, rep=rep)
                print(json.dumps(r), flush=True)
                results["runs"].append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
