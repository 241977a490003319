#!/usr/bin/env python3
"""The AutoScale demo's report: weights per scale, the target-scale results of each mixture
with seed noise, and a per-domain loss table, as markdown and a self-contained HTML page.

Run as a pipeline `command` stage. Inputs (env variables the engine sets):
  AUTOSCALE_INPUT_RUNS      a directory of links, one per target run, named `<stage>[<mixture>,<seed>]`,
                            each holding the trainer's eval.json
  AUTOSCALE_INPUT_DDO_SMALL / AUTOSCALE_INPUT_DDO_LARGE / AUTOSCALE_INPUT_PREDICT
                            `ddo` and `predict` stage outputs (weights.json, fits.svg, prediction.svg)
  AUTOSCALE_INPUT_UNIFORM / AUTOSCALE_INPUT_NATURAL   baseline weights (weights.json)
Writes report.md, report.html and results.json to $AUTOSCALE_OUT.
"""

import html
import json
import math
import os
import re
import statistics
import sys

NAMES = {"predict": "AutoScale", "ddo_large": "DDO (larger proxy scale)", "uniform": "uniform", "natural": "natural"}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def weights_of(dir_env):
    d = os.environ.get(dir_env)
    if not d:
        return None
    doc = load(os.path.join(d, "weights.json"))
    return doc.get("weights", doc)


def runs():
    root = os.environ["AUTOSCALE_INPUT_RUNS"]
    out = {}
    for name in sorted(os.listdir(root)):
        m = re.search(r"\[([^,\]]+),([^\]]+)\]$", name)
        if not m:
            sys.exit(f"error: cannot read mixture and seed from run `{name}`; expected `stage[mixture,seed]`")
        mixture, seed = m.group(1), m.group(2)
        out.setdefault(mixture, {})[seed] = load(os.path.join(root, name, "eval.json"))
    return out


def mean_sd(values):
    if len(values) > 1:
        return statistics.mean(values), statistics.stdev(values)
    return values[0], None


def fmt(mean, sd, digits=4):
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def main():
    out_dir = os.environ["AUTOSCALE_OUT"]
    results = runs()
    domains = sorted(next(iter(next(iter(results.values())).values()))["domains"])
    weights = {
        "DDO small": weights_of("AUTOSCALE_INPUT_DDO_SMALL"),
        "DDO large": weights_of("AUTOSCALE_INPUT_DDO_LARGE"),
        "AutoScale": weights_of("AUTOSCALE_INPUT_PREDICT"),
        "uniform": weights_of("AUTOSCALE_INPUT_UNIFORM"),
        "natural": weights_of("AUTOSCALE_INPUT_NATURAL"),
    }
    weights = {k: v for k, v in weights.items() if v}
    summary = {}
    for mixture, seeds in sorted(results.items()):
        per_seed_loss = [statistics.mean(r["domains"][d]["loss"] for d in domains) for r in seeds.values()]
        per_seed_worst = [max(r["domains"][d]["ppl"] for d in domains) for r in seeds.values()]
        per_seed_ppl = [statistics.mean(r["domains"][d]["ppl"] for d in domains) for r in seeds.values()]
        per_domain = {d: statistics.mean(r["domains"][d]["loss"] for r in seeds.values()) for d in domains}
        summary[mixture] = {
            "name": NAMES.get(mixture, mixture),
            "seeds": sorted(seeds),
            "mean_loss": mean_sd(per_seed_loss),
            "worst_ppl": mean_sd(per_seed_worst),
            "mean_ppl": mean_sd(per_seed_ppl),
            "domain_loss": per_domain,
        }
    md = ["# AutoScale demo report", ""]
    scale = os.environ.get("AUTOSCALE_PARAM_TARGET_TOKENS")
    if scale:
        md.append(f"Target scale: {float(scale):,.0f} training tokens for every mixture, same seeds.")
        md.append("")
    md += ["## Mixture weights", "", "| domain | " + " | ".join(weights) + " |", "|---|" + "---|" * len(weights)]
    for d in domains:
        md.append(f"| {d} | " + " | ".join(f"{w.get(d, 0):.3f}" for w in weights.values()) + " |")
    md += ["", "## Validation loss at the target scale", "",
           "Mean over domains of per-domain loss (nats per token) and of per-domain perplexity (DDO's default "
           "objective), mean ± sd over seeds; worst-domain perplexity.", "",
           "| mixture | seeds | mean loss | mean ppl | worst ppl |", "|---|---|---|---|---|"]
    for key, s in sorted(summary.items(), key=lambda kv: kv[1]["mean_loss"][0]):
        mean, sd = s["mean_loss"]
        md.append(f"| {s['name']} | {len(s['seeds'])} | {fmt(mean, sd)} | {fmt(*s['mean_ppl'], digits=3)} | {fmt(*s['worst_ppl'], digits=2)} |")
    if "predict" in summary:
        auto = summary["predict"]
        md += ["", "## AutoScale against each baseline", "",
               "On DDO's objective (mean per-domain perplexity) and on mean per-domain loss; "
               "negative is better for AutoScale.", ""]
        for key, s in sorted(summary.items()):
            if key == "predict":
                continue
            dppl = auto["mean_ppl"][0] - s["mean_ppl"][0]
            dloss = auto["mean_loss"][0] - s["mean_loss"][0]
            verdict = "better" if dppl < 0 else "worse"
            md.append(f"- vs {s['name']}: mean ppl {dppl:+.3f} ({100 * dppl / s['mean_ppl'][0]:+.2f}%, {verdict}); "
                      f"mean loss {dloss:+.4f} nats; worst ppl {auto['worst_ppl'][0] - s['worst_ppl'][0]:+.2f}")
        noise = [s["mean_ppl"][1] for s in summary.values() if s["mean_ppl"][1] is not None]
        if noise:
            md.append(f"- seed noise (sd across seeds of mean ppl): up to {max(noise):.3f}")
        md.append("- speed-up in steps to reach AutoScale's loss: not applicable to the n-gram proxy, which has no training steps")
    md += ["", "## Per-domain validation loss (mean over seeds)", "",
           "| domain | " + " | ".join(s["name"] for s in summary.values()) + " |", "|---|" + "---|" * len(summary)]
    for d in domains:
        md.append(f"| {d} | " + " | ".join(f"{s['domain_loss'][d]:.4f}" for s in summary.values()) + " |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    svgs = []
    for env, name in (("AUTOSCALE_INPUT_DDO_SMALL", "fits.svg"), ("AUTOSCALE_INPUT_DDO_LARGE", "fits.svg"), ("AUTOSCALE_INPUT_PREDICT", "prediction.svg")):
        d = os.environ.get(env)
        if d and os.path.exists(os.path.join(d, name)):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                svgs.append((env.rsplit("_", 2)[-2:], f.read()))
    body = "".join(f"<p>{html.escape(line)}</p>\n" if not line.startswith("|") else f"<pre>{html.escape(line)}</pre>\n" for line in md)
    figures = "".join(f"<figure>{svg}<figcaption>{html.escape(' '.join(label).lower())}</figcaption></figure>\n" for label, svg in svgs)
    page = f"<!doctype html><meta charset=utf-8><title>AutoScale demo report</title><body style='font-family:sans-serif;max-width:60em;margin:auto'>{body}{figures}</body>\n"
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"weights": weights, "summary": summary}, f, indent=1, sort_keys=True)
    print(text)


if __name__ == "__main__":
    main()
