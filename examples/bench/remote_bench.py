#!/usr/bin/env python3
"""Benchmark of the remote cache (issue 7).

1. `status` over a 1,000-stage pipeline whose results are all remote hits, against the same
   `status` when they are all local hits (the overhead is one remote manifest read per stage)
   and when nothing is cached anywhere.
2. Download throughput: `autoscale cache pull` of one large result against a plain `cp` of the
   same bytes.

Both run against a shared-directory remote and against S3 (moto on 127.0.0.1, when the Python
running this script can import it). Numbers go to stdout as a table and as JSON.

Reproduce (from the repository root, after `cargo build --release`):

    .venv/bin/python examples/bench/remote_bench.py --bin target/release/autoscale

Options: --stages N (1000), --mib N (256), --repeat N (3), --no-s3.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MOTO_SERVE = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO_SERVE, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("moto did not start")
        self.buckets = 0

    def bucket(self):
        import http.client

        self.buckets += 1
        name = f"bench-cache-{self.buckets}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port)
        conn.request("PUT", f"/{name}")
        assert conn.getresponse().status == 200
        return name

    def env(self):
        return {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ALLOW_HTTP": "true",
        }

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(bin_, args, cache, remote=None, env=None, cwd=None, check=True):
    e = dict(os.environ)
    e.pop("AUTOSCALE_REMOTE", None)
    e.pop("AUTOSCALE_REMOTE_MODE", None)
    e["AUTOSCALE_CACHE_DIR"] = str(cache)
    e["AUTOSCALE_REMOTE_TIMEOUT"] = "60"
    e.update(env or {})
    cmd = [str(bin_)]
    if remote:
        cmd += ["--remote", remote]
    cmd += args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=e, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return dt, p


def timed(fn, repeat):
    times = [fn() for _ in range(repeat)]
    return statistics.median(times)


def wide_pipeline(work, stages):
    text = f"""name: wide
stages:
  - id: s
    kind: command
    foreach: [{", ".join(str(i) for i in range(stages))}]
    params: {{i: "${{item}}"}}
    cmd: "echo $AUTOSCALE_PARAM_I > $AUTOSCALE_OUT/x.txt"
"""
    path = work / "wide.yaml"
    path.write_text(text)
    return path


def big_pipeline(work, mib):
    path = work / "big.yaml"
    path.write_text(
        f"""name: big
stages:
  - id: shard
    kind: command
    cmd: "head -c {mib}M /dev/urandom > $AUTOSCALE_OUT/shard.bin"
"""
    )
    return path


def bench_status(bin_, work, remote, env, stages, repeat):
    pipeline = wide_pipeline(work, stages)
    a, b, empty = work / "cache-a", work / "cache-b", work / "cache-empty"
    t_run, _ = run(bin_, ["run", str(pipeline), "--jobs", "2"], a, remote, env)
    local = timed(lambda: run(bin_, ["status", str(pipeline)], a, None, env)[0], repeat)
    miss = timed(lambda: run(bin_, ["status", str(pipeline)], empty, None, env)[0], repeat)
    remote_hit = timed(lambda: run(bin_, ["status", str(pipeline)], b, remote, env)[0], repeat)
    _, p = run(bin_, ["status", str(pipeline)], b, remote, env)
    assert f"{stages} of them in the remote cache" in p.stdout, p.stdout[-500:]
    return {
        "stages": stages,
        "run_and_upload_s": round(t_run, 2),
        "status_local_hits_s": round(local, 3),
        "status_no_hits_s": round(miss, 3),
        "status_remote_hits_s": round(remote_hit, 3),
        "remote_overhead_per_stage_ms": round((remote_hit - local) / stages * 1000, 3),
    }


def bench_download(bin_, work, remote, env, mib, repeat):
    pipeline = big_pipeline(work, mib)
    a = work / "dl-a"
    run(bin_, ["run", str(pipeline)], a, remote, env)
    blobs = list((a / "v1" / "blobs").rglob("*"))
    shard = max((p for p in blobs if p.is_file()), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size

    def pull():
        b = work / f"dl-b-{time.monotonic_ns()}"
        dt, _ = run(bin_, ["cache", "pull", str(pipeline)], b, remote, env)
        shutil.rmtree(b)
        return dt

    def copy():
        dest = work / "copy.bin"
        t0 = time.perf_counter()
        shutil.copyfile(shard, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        dest.unlink()
        return dt

    t_pull = timed(pull, repeat)
    t_copy = timed(copy, repeat)
    return {
        "mib": round(size / 2**20),
        "pull_s": round(t_pull, 3),
        "pull_mib_per_s": round(size / 2**20 / t_pull, 1),
        "copy_s": round(t_copy, 3),
        "copy_mib_per_s": round(size / 2**20 / t_copy, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/autoscale")
    ap.add_argument("--stages", type=int, default=1000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    bin_ = Path(args.bin).resolve()
    if not bin_.exists():
        sys.exit(f"error: {bin_} does not exist\nhint: cargo build --release")

    results = {}
    moto = None
    if not args.no_s3:
        try:
            import moto.server  # noqa: F401

            moto = Moto()
        except Exception as e:  # noqa: BLE001
            print(f"SKIPPED: S3 half of the benchmark: {e}", file=sys.stderr)
    try:
        backends = [("directory", None)]
        if moto:
            backends.append(("s3 (moto on loopback)", moto))
        for name, server in backends:
            with tempfile.TemporaryDirectory(prefix="remote-bench-") as tmp:
                work = Path(tmp)
                if server is None:
                    (work / "remote").mkdir()
                    url, env = f"file://{work / 'remote'}", {}
                else:
                    url, env = f"s3://{server.bucket()}/bench", server.env()
                status = bench_status(bin_, work, url, env, args.stages, args.repeat)
                if server is not None:
                    url = f"s3://{server.bucket()}/bench"
                download = bench_download(bin_, work, url, env, args.mib, args.repeat)
                results[name] = {"status": status, "download": download}
    finally:
        if moto:
            moto.close()

    print(f"{'remote':<24} {'status 1k: local':>17} {'remote hits':>12} {'no hits':>9} {'per stage':>10}"
          f" {'pull MiB/s':>11} {'cp MiB/s':>9}")
    for name, r in results.items():
        s, d = r["status"], r["download"]
        print(f"{name:<24} {s['status_local_hits_s']:>16.3f}s {s['status_remote_hits_s']:>11.3f}s"
              f" {s['status_no_hits_s']:>8.3f}s {s['remote_overhead_per_stage_ms']:>8.3f}ms"
              f" {d['pull_mib_per_s']:>11.1f} {d['copy_mib_per_s']:>9.1f}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
