#!/usr/bin/env bash
# GPU checks of the libtorch trainer, for a machine with NVIDIA GPUs (not run in CI):
#   1. the trainer really links libtorch_cuda and sees the devices (`autoscale doctor`);
#   2. training tokens/s and model FLOPs utilisation (MFU) for gpt2 and gpt2-large in bf16;
#   3. CUDA_VISIBLE_DEVICES pinning with several trainings at once: every training sees only
#      its own device, and no device runs two trainings at the same time.
#
# Usage: bash examples/bench/gpu_check.sh [--quick]
#   PEAK_TFLOPS   dense bf16 peak of one GPU for MFU [default: from nvidia-smi's name:
#                 H100/H200 989, A100 312, L40S 362, else required]
#   PYTHON        a Python with torch==2.13.0 (CUDA wheel) [default: .venv/bin/python, python3]
#   AUTOSCALE     autoscale, with autoscale-train next to it [default: builds both in target/release]
# --quick: fewer steps (about 3 minutes on an H200 once built).
# Writes examples/bench/gpu_check_results.json; exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

fail() { echo "FAIL: $*" >&2; exit 1; }

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for p in .venv/bin/python python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
      PYTHON=$p; break
    fi
  done
fi
[ -n "$PYTHON" ] || fail "no Python with torch 2.13.0; python3 -m venv .venv && .venv/bin/pip install torch==2.13.0"
PYDIR=$(dirname "$(command -v "$PYTHON")")

if [ -z "${AUTOSCALE:-}" ]; then
  PATH="$PYDIR:$PATH" LIBTORCH_USE_PYTORCH=1 cargo build --release --workspace
  AUTOSCALE=target/release/autoscale
fi

echo "== 1. linking and devices"
env -u LD_LIBRARY_PATH "$AUTOSCALE" doctor
INFO=$(env -u LD_LIBRARY_PATH "$AUTOSCALE" --json doctor)
GPUS=$(echo "$INFO" | "$PYTHON" -c 'import json,sys; i=json.load(sys.stdin); print(i["cuda_devices"] if i["cuda_library_loaded"] and i["cuda_available"] else 0)')
[ "$GPUS" -ge 1 ] || fail "autoscale sees no CUDA device (libtorch_cuda loaded? driver?): $INFO"

if [ -z "${PEAK_TFLOPS:-}" ]; then
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$NAME" in
    *H100*|*H200*|*H800*) PEAK_TFLOPS=989 ;;
    *A100*|*A800*) PEAK_TFLOPS=312 ;;
    *L40S*) PEAK_TFLOPS=362 ;;
    *) fail "unknown GPU '$NAME': set PEAK_TFLOPS (dense bf16 TFLOP/s)" ;;
  esac
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export AUTOSCALE PYTHON PEAK_TFLOPS QUICK WORK GPUS

echo "== 2. tokens/s and MFU in bf16"
"$PYTHON" - <<'PY'
import json, os, subprocess, sys, time

autoscale, work = os.environ["AUTOSCALE"], os.environ["WORK"]
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
quick = os.environ["QUICK"] == "1"
fixture = os.path.abspath("tests/fixtures/corpus")
# (layers, width, positions) as in stages/train/src/preset.rs; vocab: bytes + end-of-text.
presets = {"gpt2": (12, 768, 1024), "gpt2-large": (36, 1280, 1024)}
vocab = 257

def flops_per_token(layers, d, positions, seq):
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    non_embedding = layers * block + 2 * d
    return 6 * (non_embedding + vocab * d) + 12 * layers * d * seq

rows = []
for model, batch, accum in (("gpt2", 32, 1), ("gpt2-large", 16, 2)):
    layers, d, positions = presets[model]
    seq = 1024
    steps = 12 if quick else 40
    tokens = steps * batch * accum * seq
    run = os.path.join(work, model)
    os.makedirs(os.path.join(run, "out")); os.makedirs(os.path.join(run, "scratch"))
    job = {"train": {
        "data": fixture, "out_dir": os.path.join(run, "out"), "scratch_dir": os.path.join(run, "scratch"),
        "device": "cuda", "model": model, "model_overrides": {}, "dropout": 0.0,
        "mixture": {"weights": {"weights": {"books": 1, "code": 1, "web": 1, "wikipedia": 1}, "total_tokens": tokens}},
        "epochs": 1, "seq_len": seq, "batch_size": batch, "grad_accum": accum,
        "lr": 2e-4, "min_lr": 0.0, "warmup": 0.1, "schedule": "linear", "weight_decay": 0.01,
        "grad_clip": 1.0, "beta1": 0.9, "beta2": 0.999, "adam_eps": 1e-8, "seed": 0,
        "eval": {"domains": ["books"], "tokens": seq, "curve_tokens": seq, "every": 0},
        "checkpoint_every": 1000000, "checkpoint_minutes": 1e9, "log_every": 1, "threads": None,
        "held_out": {"val_fraction": 0.1, "val_docs": 50}}}
    path = os.path.join(run, "job.json")
    json.dump(job, open(path, "w"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    p = subprocess.run([os.path.join(os.path.dirname(autoscale), "autoscale-train"), "job", path], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"FAIL: {model} training failed:\n{p.stderr[-3000:]}")
    tps = [m["progress"]["tokens_per_s"] for m in map(json.loads, p.stdout.splitlines())
           if "progress" in m and m["progress"].get("tokens_per_s")]
    steady = tps[3:] or tps
    step_tokens = batch * accum * seq
    rate = len(steady) * step_tokens / sum(step_tokens / t for t in steady)
    mfu = rate * flops_per_token(layers, d, positions, seq) / peak
    print(f"{model}: {rate:,.0f} tokens/s, MFU {100 * mfu:.1f}% (peak {peak / 1e12:.0f} TFLOP/s)")
    rows.append({"model": model, "batch": batch, "grad_accum": accum, "seq": seq, "tokens_per_s": rate, "mfu": mfu})
json.dump({"throughput": rows}, open(os.path.join(work, "throughput.json"), "w"))
PY

echo "== 3. CUDA_VISIBLE_DEVICES pinning with several trainings at once"
N=$((GPUS + 1))
{
  echo "name: gpu-pinning"
  echo "root: $(pwd)"
  echo "stages:"
  for i in $(seq 1 "$N"); do
    cat <<EOF
  - id: t$i
    kind: train
    resources: {gpus: 1, require_gpu: true}
    inputs: {data: "file:tests/fixtures/corpus"}
    params: {model: gpt2, seed: $i, tokens: {books: $((QUICK == 1 ? 400000 : 1600000))}, seq_len: 1024, batch_size: 8, eval_every: 0, eval_tokens: 1024, eval_domains: [books], log_every: 5}
EOF
  done
} > "$WORK/pinning.yaml"
GPU_LIST=$(seq -s, 0 $((GPUS - 1)))
"$AUTOSCALE" --cache-dir "$WORK/cache" --json run "$WORK/pinning.yaml" --gpus "$GPU_LIST" > "$WORK/pinning.jsonl" \
  || fail "the pinning pipeline failed: $(tail -5 "$WORK/pinning.jsonl")"
"$PYTHON" - <<'PY'
import json, os, subprocess, sys
work, autoscale, gpus = os.environ["WORK"], os.environ["AUTOSCALE"], int(os.environ["GPUS"])
spans = []
for i in range(1, gpus + 2):
    meta = json.loads(subprocess.run([autoscale, "--cache-dir", f"{work}/cache", "--json", "show", f"{work}/pinning.yaml", f"t{i}"],
                                     capture_output=True, text=True).stdout)
    result = meta["metadata"]["result"]
    visible = [result.get("cuda_visible_devices") or ""]
    if result.get("device") != "cuda":
        sys.exit(f"FAIL: t{i} trained on {result.get('device')}, not on its GPU")
    t = meta["timings"]
    if not visible or "," in visible[0] or visible[0] in ("", "none"):
        sys.exit(f"FAIL: t{i} did not run pinned to one device: {visible}")
    spans.append((visible[0], t["started_unix_ms"], t["started_unix_ms"] + t["duration_ms"]))
    print(f"t{i}: CUDA_VISIBLE_DEVICES={visible[0]}, {t['duration_ms'] / 1000:.1f}s")
for a in range(len(spans)):
    for b in range(a + 1, len(spans)):
        (da, sa, ea), (db, sb, eb) = spans[a], spans[b]
        if da == db and sa < eb and sb < ea:
            sys.exit(f"FAIL: device {da} ran t{a + 1} and t{b + 1} at the same time")
overlapping = any(sa < eb and sb < ea for i, (_, sa, ea) in enumerate(spans) for (_, sb, eb) in spans[i + 1:])
if gpus > 1 and not overlapping:
    sys.exit("FAIL: with several GPUs, no two trainings ran at once")
print(f"pinning holds: {len(spans)} trainings on {gpus} device(s), no device shared at once")
PY
cp "$WORK/throughput.json" examples/bench/gpu_check_results.json
echo "OK: all GPU checks passed; results in examples/bench/gpu_check_results.json"
