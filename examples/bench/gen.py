#!/usr/bin/env python3
"""Generate the same synthetic pipeline for autoscale, make, Snakemake, DVC and
a plain shell loop.

    gen.py --stages N --out DIR [--shape mixed|chain|wide] [--tools a,b,...]
    gen.py --touch-middle DIR [--tools a,b,...]

Layout written under DIR:

    DIR/bench.json              what was generated (N, shape, touch count)
    DIR/expected.json           expected content of the sink stages' outputs
    DIR/autoscale/pipeline.yaml
    DIR/make/Makefile
    DIR/snakemake/Snakefile
    DIR/dvc/dvc.yaml            (`dvc init --no-scm` is left to the runner)
    DIR/loop/run.sh

Graph ("mixed", the default): repeated groups of 10 stages -- a root, a
fan-out of 8 stages that each depend on the root, and a join that depends on
all 8; the next group's root depends on the previous join.  So the pipeline
is a chain of diamonds: long dependency chains *and* wide fan-outs.  If N is
not a multiple of 10 the last group is cut short: 1 stage = root only,
2 = root + one child, k >= 3 = root + (k - 2) fan-out stages + join.
"chain" is a single chain; "wide" is one root, N - 2 parallel stages, one join.

Each stage i runs the same shell command in every tool:

    root:      echo V > OUT
    otherwise: cat IN1 IN2 ... | cksum > OUT; echo V >> OUT

where V is the stage's value (its index; `--touch-middle` changes the value
of stage N//2).  The inputs are checksummed rather than concatenated
verbatim: with joins of 8, plain `cat` would make each group's output 8x the
previous one (8**(N/10) bytes).  cksum keeps every file at two lines while
still making each output depend on all of its inputs' bytes, so a change in
the middle propagates to everything downstream in every tool (content-hashing
tools cannot cut the rerun short).
"""

import argparse
import json
import os
import sys

TOOLS = ("autoscale", "make", "snakemake", "dvc", "loop")
GROUP_FAN = 8


# --------------------------------------------------------------------- graph

def build_graph(n, shape="mixed"):
    """Return deps: list where deps[i] is the sorted list of stage indices
    stage i depends on.  Index order is a topological order."""
    if n < 1:
        raise ValueError("need at least one stage")
    deps = []
    if shape == "chain":
        for i in range(n):
            deps.append([] if i == 0 else [i - 1])
        return deps
    if shape == "wide":
        deps.append([])
        if n == 1:
            return deps
        if n == 2:
            deps.append([0])
            return deps
        for _ in range(n - 2):
            deps.append([0])
        deps.append(list(range(1, n - 1)))
        return deps
    if shape != "mixed":
        raise ValueError("unknown shape %r" % shape)
    prev_join = None
    i = 0
    while i < n:
        k = min(GROUP_FAN + 2, n - i)
        root = i
        deps.append([] if prev_join is None else [prev_join])
        i += 1
        if k == 1:
            prev_join = root
            continue
        if k == 2:
            deps.append([root])
            prev_join = i
            i += 1
            continue
        fan = list(range(i, i + k - 2))
        for _ in fan:
            deps.append([root])
        i += k - 2
        deps.append(fan)
        prev_join = i
        i += 1
    assert len(deps) == n
    return deps


def sinks(deps):
    has_child = [False] * len(deps)
    for ds in deps:
        for d in ds:
            has_child[d] = True
    return [i for i, c in enumerate(has_child) if not c]


def depth(deps):
    """Number of stages on the longest dependency path."""
    d = []
    for ds in deps:
        d.append(1 + max((d[x] for x in ds), default=0))
    return max(d)


def middle(n):
    return n // 2


def values(n, touch):
    """Value echoed by each stage.  touch > 0 changes the middle stage."""
    vals = [str(i) for i in range(n)]
    if touch:
        vals[middle(n)] = "%d.touched%d" % (middle(n), touch)
    return vals


def stage_cmd(i, ins, out, val):
    """The one command shape used by every tool."""
    if not ins:
        return "echo %s > %s" % (val, out)
    return "cat %s | cksum > %s; echo %s >> %s" % (" ".join(ins), out, val, out)


# --------------------------------------------------- expected file contents

def _crc_table():
    table = []
    for b in range(256):
        c = b << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


_TABLE = _crc_table()


def posix_cksum(data):
    """`cksum` (POSIX CRC-32 + length) of data, as the line cksum prints for
    stdin: 'CRC SIZE\\n'."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _TABLE[(crc >> 24) ^ b]
    length = len(data)
    n = length
    while n:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _TABLE[(crc >> 24) ^ (n & 0xFF)]
        n >>= 8
    crc = ~crc & 0xFFFFFFFF
    return ("%d %d\n" % (crc, length)).encode()


def expected_outputs(deps, vals):
    out = []
    for i, ds in enumerate(deps):
        line = (vals[i] + "\n").encode()
        if not ds:
            out.append(line)
        else:
            out.append(posix_cksum(b"".join(out[d] for d in ds)) + line)
    return out


# ----------------------------------------------------------------- writers

def q(s):
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(s)


def fname(i):
    return "s%d.txt" % i


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def gen_autoscale(d, deps, vals):
    lines = ["name: bench", "stages:"]
    for i, ds in enumerate(deps):
        ins = ["$AUTOSCALE_INPUT_IN%d/out.txt" % k for k in range(len(ds))]
        lines.append("  - id: s%d" % i)
        lines.append("    kind: command")
        if ds:
            lines.append("    inputs:")
            for k, dep in enumerate(ds):
                lines.append("      in%d: s%d" % (k, dep))
        lines.append("    cmd: " + q(stage_cmd(i, ins, "$AUTOSCALE_OUT/out.txt", vals[i])))
        lines.append("    outputs: [out.txt]")
    write(os.path.join(d, "autoscale", "pipeline.yaml"), "\n".join(lines) + "\n")


def gen_make(d, deps, vals):
    lines = [
        "# generated by examples/bench/gen.py -- one target file per stage",
        ".PHONY: all",
        "all: " + " ".join(fname(s) for s in sinks(deps)),
        "",
    ]
    for i, ds in enumerate(deps):
        ins = [fname(x) for x in ds]
        lines.append("%s:%s" % (fname(i), "".join(" " + x for x in ins)))
        lines.append("\t" + stage_cmd(i, ins, fname(i), vals[i]))
    write(os.path.join(d, "make", "Makefile"), "\n".join(lines) + "\n")


def snakemake_prelude(deps):
    """Snakemake builds its DAG recursively, one level of Python recursion (a
    few frames) per dependency level: with a few hundred levels it hits
    Python's default recursion limit of 1000 ("RecursionError: maximum
    recursion depth exceeded", reported as a possible cyclic dependency).
    The Snakefile is Python, so a deep pipeline raises the limit itself."""
    dp = depth(deps)
    if dp <= 300:  # 1000 stages of the mixed shape (depth 300) build fine without it
        return []
    return [
        "# dependency depth %d: Snakemake's recursive DAG building needs more" % dp,
        "# than Python's default recursion limit (1000)",
        "import sys",
        "sys.setrecursionlimit(max(sys.getrecursionlimit(), %d))" % (40 * dp),
        "",
    ]


def gen_snakemake(d, deps, vals, style):
    if style == "explicit":
        lines = snakemake_prelude(deps) + [
            "# generated by examples/bench/gen.py -- one explicit rule per stage",
            "rule all:",
            "    input: " + ", ".join(q(fname(s)) for s in sinks(deps)),
            "    default_target: True",
            "",
        ]
        for i, ds in enumerate(deps):
            ins = [fname(x) for x in ds]
            lines.append("rule s%d:" % i)
            if ins:
                lines.append("    input: " + ", ".join(q(x) for x in ins))
            lines.append("    output: " + q(fname(i)))
            lines.append("    shell: " + q(stage_cmd(i, ins, fname(i), vals[i])))
            lines.append("")
    else:
        # One wildcard rule; the graph and the per-stage command are data.
        # A changed command changes the job's params, which Snakemake's
        # default rerun triggers (params) pick up.
        lines = snakemake_prelude(deps) + [
            "# generated by examples/bench/gen.py -- one wildcard rule, graph as data",
            "DEPS = {",
        ]
        for i, ds in enumerate(deps):
            lines.append("    %d: %r," % (i, ds))
        lines.append("}")
        lines.append("CMD = {")
        for i, ds in enumerate(deps):
            ins = [fname(x) for x in ds]
            lines.append("    %d: %s," % (i, q(stage_cmd(i, ins, fname(i), vals[i]))))
        lines.append("}")
        lines += [
            "",
            "wildcard_constraints:",
            '    i="[0-9]+"',
            "",
            "rule all:",
            "    input: " + ", ".join(q(fname(s)) for s in sinks(deps)),
            "    default_target: True",
            "",
            "rule stage:",
            '    input: lambda w: ["s%d.txt" % d for d in DEPS[int(w.i)]]',
            '    output: "s{i}.txt"',
            "    params: cmd=lambda w: CMD[int(w.i)]",
            '    shell: "{params.cmd}"',
            "",
        ]
    write(os.path.join(d, "snakemake", "Snakefile"), "\n".join(lines) + "\n")


def gen_dvc(d, deps, vals):
    lines = ["stages:"]
    for i, ds in enumerate(deps):
        ins = [fname(x) for x in ds]
        lines.append("  s%d:" % i)
        lines.append("    cmd: " + q(stage_cmd(i, ins, fname(i), vals[i])))
        if ins:
            lines.append("    deps:")
            for x in ins:
                lines.append("    - " + x)
        lines.append("    outs:")
        lines.append("    - " + fname(i))
    write(os.path.join(d, "dvc", "dvc.yaml"), "\n".join(lines) + "\n")


def gen_loop(d, deps, vals):
    lines = [
        "#!/bin/sh",
        "# generated by examples/bench/gen.py -- every stage, in topological",
        "# order, each as its own `sh -c`, sequentially, no caching.",
        "set -e",
        'cd "$(dirname "$0")"',
    ]
    for i, ds in enumerate(deps):
        ins = [fname(x) for x in ds]
        lines.append("sh -c '%s'" % stage_cmd(i, ins, fname(i), vals[i]))
    write(os.path.join(d, "loop", "run.sh"), "\n".join(lines) + "\n")
    os.chmod(os.path.join(d, "loop", "run.sh"), 0o755)


def generate(out, n, shape, tools, touch, snakemake_style):
    deps = build_graph(n, shape)
    vals = values(n, touch)
    for t in tools:
        if t == "autoscale":
            gen_autoscale(out, deps, vals)
        elif t == "make":
            gen_make(out, deps, vals)
        elif t == "snakemake":
            gen_snakemake(out, deps, vals, snakemake_style)
        elif t == "dvc":
            gen_dvc(out, deps, vals)
        elif t == "loop":
            gen_loop(out, deps, vals)
        else:
            raise ValueError("unknown tool %r" % t)
    exp = expected_outputs(deps, vals)
    write(os.path.join(out, "expected.json"), json.dumps(
        {"sinks": {fname(s): exp[s].decode() for s in sinks(deps)},
         "middle": fname(middle(n)), "touch": touch}, indent=1) + "\n")


def load_meta(out):
    with open(os.path.join(out, "bench.json")) as f:
        return json.load(f)


def save_meta(out, meta):
    write(os.path.join(out, "bench.json"), json.dumps(meta, indent=1) + "\n")


def touch_middle(out, tools=None):
    """Change the middle stage's value in the given tools' definitions
    (default: every tool generated in DIR).  Each call changes it again."""
    meta = load_meta(out)
    tools = tools or meta["tools"]
    meta["touch"] = meta.get("touch", 0) + 1
    generate(out, meta["stages"], meta["shape"], tools, meta["touch"],
             meta.get("snakemake_style", "wildcard"))
    if "make" in tools:
        # make does not track recipes: a changed recipe alone rebuilds
        # nothing.  Remove the stage's target, as a make user would.
        p = os.path.join(out, "make", fname(middle(meta["stages"])))
        if os.path.exists(p):
            os.remove(p)
    save_meta(out, meta)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, help="number of stages N")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--shape", default="mixed", choices=["mixed", "chain", "wide"])
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help="comma list of %s (default all)" % ",".join(TOOLS))
    ap.add_argument("--snakemake-style", default="wildcard",
                    choices=["wildcard", "explicit"],
                    help="one wildcard rule with the graph as data (default) "
                         "or one explicit rule per stage")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--touch-middle", metavar="DIR",
                    help="change stage N//2's command in DIR (made by an earlier "
                         "gen.py --out DIR) for the given --tools")
    a = ap.parse_args(argv)
    tools = [t for t in a.tools.split(",") if t]
    for t in tools:
        if t not in TOOLS:
            ap.error("unknown tool %r" % t)
    if a.touch_middle:
        given = "--tools" in (argv if argv is not None else sys.argv)
        meta = touch_middle(a.touch_middle, tools if given else None)
        if not a.quiet:
            print("touched s%d (touch #%d) in %s" % (middle(meta["stages"]), meta["touch"], a.touch_middle))
        return 0
    if a.stages is None or not a.out:
        ap.error("--stages and --out are required (or --touch-middle DIR)")
    os.makedirs(a.out, exist_ok=True)
    generate(a.out, a.stages, a.shape, tools, 0, a.snakemake_style)
    save_meta(a.out, {"stages": a.stages, "shape": a.shape, "tools": tools,
                      "touch": 0, "snakemake_style": a.snakemake_style})
    if not a.quiet:
        print("generated %d stages (%s) for %s in %s" % (a.stages, a.shape, ",".join(tools), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
