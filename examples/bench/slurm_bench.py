#!/usr/bin/env python3
"""The head's overhead per stage through `--executor slurm`, against `sbatch --wait` of the same
commands, on the same cluster in the same run; and how many state queries a run makes.

    bash tests/slurm/cluster.sh start && eval "$(bash tests/slurm/cluster.sh env)"
    python3 examples/bench/slurm_bench.py --autoscale target/release/autoscale \\
        --stages 20 --sleep 0 --reps 3 [--chain] [--json examples/bench/results-slurm.json]

For each rep, in a fresh directory:
  autoscale   `autoscale -v run p.yaml` with `executor = "slurm"`: N independent `command`
              stages (`sleep S; echo i > $AUTOSCALE_OUT/x`), one job each; wall time, and the
              submissions and queries the executor logs when it ends
  sbatch      the same N commands as `sbatch --wait --wrap ...`, all started at once and
              waited for (with --chain: one after the other), Slurm's own cost for the same
              jobs, with nothing cached or checked
With --chain the stages form a chain (each reads the one before), so every stage pays the
time from its job's end to the head noticing it.
Both use the cluster's default partition; the per-stage overhead is
(autoscale wall - sbatch wall) / N. The polling settings are printed with the results.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def autoscale_run(exe, n, sleep, poll_min, poll_max, chain):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "autoscale.toml"), "w") as f:
            f.write(f'executor = "slurm"\n[slurm]\npoll_min_s = {poll_min}\npoll_max_s = {poll_max}\n')
        with open(os.path.join(d, "p.yaml"), "w") as f:
            f.write("name: bench\nparams: {salt: %d}\nstages:\n" % time.time_ns())
            if chain:
                # s0 -> s1 -> ... : each stage reads the one before it.
                for i in range(n):
                    f.write(f"  - id: s{i}\n    kind: command\n")
                    f.write('    params: {salt: "${params.salt}"}\n')
                    if i:
                        f.write(f"    inputs: {{prev: s{i - 1}}}\n")
                    f.write(f'    cmd: "sleep {sleep}; echo {i} > $AUTOSCALE_OUT/x"\n')
            else:
                f.write("  - id: s\n    kind: command\n")
                f.write("    foreach: [%s]\n" % ", ".join(str(i) for i in range(n)))
                f.write('    params: {salt: "${params.salt}"}\n')
                f.write(f'    cmd: "sleep {sleep}; echo ${{item}} > $AUTOSCALE_OUT/x"\n')
        t0 = time.perf_counter()
        cp = subprocess.run([exe, "--cache-dir", os.path.join(d, "c"), "-v", "run", "p.yaml"],
                            cwd=d, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if cp.returncode != 0:
            sys.exit(f"autoscale failed:\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}")
        m = re.search(r"submissions=(\d+) queries=(\d+)", cp.stderr)
        subs, queries = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        return wall, subs, queries


def sbatch_wait(n, sleep, chain):
    """All at once, or (chain) one after the other, each `sbatch --wait`."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        start = lambda i: subprocess.Popen(["sbatch", "--wait", "--quiet", f"--output={d}/{i}.log",
                                            f"--wrap=sleep {sleep}; echo {i} > {d}/{i}.out"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs = []
        for i in range(n):
            procs.append(start(i))
            if chain and procs[-1].wait() != 0:
                sys.exit(f"sbatch --wait failed: {procs[-1].stderr.read()}")
        for p in procs:
            if p.wait() != 0:
                sys.exit(f"sbatch --wait failed: {p.stderr.read()}")
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--autoscale", default="target/release/autoscale")
    ap.add_argument("--stages", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--poll-min", type=float, default=1.0)
    ap.add_argument("--poll-max", type=float, default=10.0)
    ap.add_argument("--chain", action="store_true", help="each stage depends on the one before")
    ap.add_argument("--json")
    a = ap.parse_args()
    exe = os.path.abspath(a.autoscale)
    rows = []
    for rep in range(a.reps):
        # Alternate the order so neither tool always runs on a warmer cluster.
        order = ["autoscale", "sbatch"] if rep % 2 == 0 else ["sbatch", "autoscale"]
        got = {}
        for tool in order:
            if tool == "autoscale":
                got["autoscale"] = autoscale_run(exe, a.stages, a.sleep, a.poll_min, a.poll_max, a.chain)
            else:
                got["sbatch"] = sbatch_wait(a.stages, a.sleep, a.chain)
        wall, subs, queries = got["autoscale"]
        rows.append({"rep": rep, "autoscale_s": wall, "sbatch_wait_s": got["sbatch"],
                     "submissions": subs, "queries": queries})
        print(f"rep {rep}: autoscale {wall:.2f} s ({subs} sbatch, {queries} queries), "
              f"sbatch --wait {got['sbatch']:.2f} s", flush=True)
    med = lambda k: statistics.median(r[k] for r in rows)
    over = (med("autoscale_s") - med("sbatch_wait_s")) / a.stages
    shape = "a chain of" if a.chain else "independent,"
    print(f"\n{shape} {a.stages} stages of `sleep {a.sleep}`, poll {a.poll_min}-{a.poll_max} s, median of {a.reps}: "
          f"autoscale {med('autoscale_s'):.2f} s, sbatch --wait {med('sbatch_wait_s'):.2f} s, "
          f"ratio {med('autoscale_s') / med('sbatch_wait_s'):.2f}x, overhead {over * 1000:.0f} ms per stage, "
          f"queries {med('queries')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"stages": a.stages, "chain": a.chain, "sleep": a.sleep, "poll_min": a.poll_min,
                       "poll_max": a.poll_max, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
