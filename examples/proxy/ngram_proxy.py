#!/usr/bin/env python3
"""A tiny, real proxy language model for the AutoScale pipeline: a smoothed n-gram.

It trains an interpolated Kneser-Ney n-gram model on a given domain mixture of a
RedPajama-layout corpus (`DIR/<domain>.jsonl`, one `{"text": ..., "meta": ...}` per
line) and writes the per-domain validation loss, perplexity and bits per byte to
`OUTDIR/eval.json`. Standard library only; deterministic for the same inputs and seed.

    python3 examples/proxy/ngram_proxy.py --corpus tests/fixtures/corpus --out /tmp/run \\
        --tokens '{"books": 20000, "code": 5000}'
    python3 examples/proxy/ngram_proxy.py --corpus DIR --out OUT \\
        --weights '{"books": 0.3, "web": 0.7}' --total-tokens 200000
    python3 examples/proxy/ngram_proxy.py --self-test

As a pipeline `command` stage, params may also come from `--params-json FILE_OR_JSON`
(e.g. `{"tokens": {...}}`) or from the env the engine exports for scalar params
(`AUTOSCALE_PARAM_<NAME>`; per-domain scalars `AUTOSCALE_PARAM_TOKENS_<DOMAIN>` or
`AUTOSCALE_PARAM_WEIGHTS_<DOMAIN>` also work), and outputs go to `$AUTOSCALE_OUT`
when `--out` is omitted. Precedence: command line > --params-json > env > defaults.

See examples/proxy/README.md for the design, limits and measured numbers.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

DEFAULTS = {
    "tokenizer": "byte",
    "order": None,  # 5 for byte, 3 for word
    "seed": 0,
    "val_docs": 50,
    "val_fraction": 0.02,
    "unk_min_count": 2,
    "vocab_sample_tokens": 50000,
}
DEFAULT_ORDER = {"byte": 5, "word": 3}

# Token symbols are single characters of a Python str, so an n-gram is a substring and
# counting is a slice per position. Byte tokens are chr(0..255); the document separator
# is chr(256). Word tokens are chr(id) with 0 = separator, 1 = <unk>.
BYTE_SEP = chr(256)
WORD_SEP = chr(0)
WORD_UNK = chr(1)
WORD_RE = re.compile(r"\w+|\n+|[^\w\s]")


class UsageError(Exception):
    pass


# ----------------------------------------------------------------------------- corpus


def read_corpus(corpus_dir):
    """{domain: [text, ...]} for every DIR/<domain>.jsonl[.gz], in file order."""
    if not os.path.isdir(corpus_dir):
        raise UsageError(f"corpus directory {corpus_dir!r} does not exist")
    domains = {}
    for name in sorted(os.listdir(corpus_dir)):
        if name.endswith(".jsonl"):
            domain, opener = name[: -len(".jsonl")], open
        elif name.endswith(".jsonl.gz"):
            domain, opener = name[: -len(".jsonl.gz")], gzip.open
        else:
            continue
        if domain in domains:
            raise UsageError(f"domain {domain!r} appears twice in {corpus_dir}")
        texts = []
        with opener(os.path.join(corpus_dir, name), "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise UsageError(f"{name}:{lineno}: not a {{\"text\": ...}} JSON line ({e})")
                if isinstance(text, str) and text:
                    texts.append(text)
        if texts:
            domains[domain] = texts
    if not domains:
        raise UsageError(f"no non-empty <domain>.jsonl files in {corpus_dir}")
    return domains


def doc_hash(domain, text):
    return hashlib.sha256(domain.encode("utf-8") + b"\n" + text.encode("utf-8")).hexdigest()


def split_domain(domain, texts, val_docs, val_fraction):
    """Fixed held-out split by document hash: (val_indices, train_indices).

    Documents are ranked by sha256(domain, text); the lowest-ranked ones are held out
    until they hold at least `val_fraction` of the domain's UTF-8 bytes, capped at
    `val_docs` documents, at least one, and leaving at least one for training. It
    depends only on the corpus and these two settings, never on the mixture or seed.
    """
    order = sorted(range(len(texts)), key=lambda i: (doc_hash(domain, texts[i]), i))
    sizes = [len(t.encode("utf-8")) for t in texts]
    target = val_fraction * sum(sizes)
    cap = max(1, min(val_docs, len(texts) - 1)) if len(texts) > 1 else 1
    val, held = [], 0
    for i in order:
        if len(val) >= cap or (val and held >= target):
            break
        val.append(i)
        held += sizes[i]
    val_set = set(val)
    train = [i for i in order if i not in val_set]
    return sorted(val), train


# -------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    name = "byte"
    sep = BYTE_SEP
    vocab_size = 257  # 256 bytes + separator

    def encode(self, text):
        return text.encode("utf-8").decode("latin-1")

    def spell_nats(self, text):  # every byte is a token: nothing extra to pay
        return 0.0

    def describe(self):
        return {"tokenizer": "byte", "vocab_size": self.vocab_size}


class WordTokenizer:
    """Lowercased words, runs of newlines and single punctuation marks.

    The vocabulary is fixed per corpus: words seen at least `min_count` times in a fixed
    sample (the first `sample_tokens` tokens of each domain's training documents, in hash
    order), so it is the same for every mixture. Other words become <unk>. For bits per
    byte, each <unk> is also charged the cost of spelling its UTF-8 bytes with a fixed
    add-one byte unigram fitted on the sample's rare words, so bpb is open-vocabulary.
    """

    name = "word"
    sep = WORD_SEP

    def __init__(self, domains, splits, min_count, sample_tokens):
        counts = Counter()
        for domain in sorted(domains):
            taken = 0
            for i in splits[domain][1]:
                words = WORD_RE.findall(domains[domain][i].lower())
                words = words[: max(0, sample_tokens - taken)]
                counts.update(words)
                taken += len(words)
                if taken >= sample_tokens:
                    break
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.ids = {w: chr(i + 2) if i + 2 < 0xD800 else chr(i + 2 + 0x800) for i, w in enumerate(kept)}
        self.vocab_size = len(kept) + 2
        self.min_count = min_count
        self.sample_tokens = sample_tokens
        byte_counts = Counter()
        ends = 0
        for w, c in counts.items():
            if c < min_count:
                for b in w.encode("utf-8"):
                    byte_counts[b] += c
                ends += c
        total = sum(byte_counts.values()) + ends + 257
        self.spell_byte = [-math.log((byte_counts.get(b, 0) + 1) / total) for b in range(256)]
        self.spell_end = -math.log((ends + 1) / total)

    def encode(self, text):
        get = self.ids.get
        return "".join([get(w, WORD_UNK) for w in WORD_RE.findall(text.lower())])

    def spell_nats(self, text):
        get = self.ids.get
        nats = 0.0
        for w in WORD_RE.findall(text.lower()):
            if get(w) is None:
                nats += self.spell_end + sum(self.spell_byte[b] for b in w.encode("utf-8"))
        return nats

    def describe(self):
        return {"tokenizer": "word", "vocab_size": self.vocab_size, "unk_min_count": self.min_count,
                "vocab_sample_tokens_per_domain": self.sample_tokens}


# ------------------------------------------------------------------------------ model


class KneserNey:
    """Interpolated Kneser-Ney n-gram model over a str of token symbols.

    The top order uses raw counts; lower orders use continuation counts (the number of
    distinct left extensions); the unigram interpolates with the uniform distribution
    over the whole symbol set, so every symbol has non-zero probability and a model
    trained on nothing is exactly uniform. One absolute discount per order,
    D = n1 / (n1 + 2 n2) from that order's count-of-counts.
    """

    def __init__(self, stream, order, vocab_size):
        self.order = order
        self.vocab_size = vocab_size
        n = order
        counts = [None] * (n + 1)
        L = len(stream)
        counts[n] = Counter(stream[i:i + n] for i in range(L - n + 1))
        for k in range(n - 1, 0, -1):
            counts[k] = Counter(g[1:] for g in counts[k + 1])
        # A stream shorter than the order still has lower-order n-grams: count them raw.
        for k in range(n, 0, -1):
            if L >= k and not counts[k]:
                counts[k] = Counter(stream[i:i + k] for i in range(L - k + 1))
        self.counts = counts
        self.discount = [0.0] * (n + 1)
        self.ctx_total = [None] * (n + 1)
        self.ctx_types = [None] * (n + 1)
        for k in range(1, n + 1):
            cc = Counter(counts[k].values())
            n1, n2 = cc.get(1, 0), cc.get(2, 0)
            d = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
            self.discount[k] = min(max(d, 0.05), 0.95)
            if k > 1:
                tot, typ = defaultdict(int), defaultdict(int)
                for g, c in counts[k].items():
                    h = g[:-1]
                    tot[h] += c
                    typ[h] += 1
                self.ctx_total[k] = dict(tot)
                self.ctx_types[k] = dict(typ)
        self.uni_total = sum(counts[1].values())
        self.uni_types = len(counts[1])
        self.n_ngrams = sum(len(c) for c in counts[1:])

    def nats(self, stream, positions):
        """Sum of -log p(stream[i] | history) over positions, history from the same stream."""
        n = self.order
        c1 = self.counts[1]
        d1 = self.discount[1]
        ut = self.uni_total
        uniform = 1.0 / self.vocab_size
        back1 = d1 * self.uni_types / ut if ut else 0.0
        total = 0.0
        log = math.log
        higher = [(k, self.counts[k], self.ctx_total[k], self.ctx_types[k], self.discount[k]) for k in range(2, n + 1)]
        for i in positions:
            w = stream[i]
            if ut:
                c = c1.get(w, 0)
                p = (max(c - d1, 0.0)) / ut + back1 * uniform
            else:
                p = uniform
            for k, cnt, tot, typ, d in higher:
                if k > i + 1:
                    break
                h = stream[i - k + 1:i]
                t = tot.get(h)
                if not t:
                    break  # contexts are suffix-closed: no longer one can be seen either
                c = cnt.get(h + w, 0)
                p = (max(c - d, 0.0) + d * typ[h] * p) / t
            total -= log(p)
        return total


# ------------------------------------------------------------------------- the run


def mixture_tokens(params, domains):
    """Requested training tokens per corpus domain (every domain present, 0 if absent)."""
    tokens, weights, total = params.get("tokens"), params.get("weights"), params.get("total_tokens")
    if tokens is not None and weights is not None:
        raise UsageError("give either tokens or weights (+ total_tokens), not both")
    if tokens is None and weights is None:
        raise UsageError("give --tokens '{\"domain\": n, ...}' or --weights '{...}' --total-tokens N")
    spec = tokens if tokens is not None else weights
    if not isinstance(spec, dict):
        raise UsageError(f"{'tokens' if tokens is not None else 'weights'} must be a JSON object, got {spec!r}")
    unknown = sorted(set(spec) - set(domains))
    if unknown:
        raise UsageError(f"unknown domain(s) {unknown}; the corpus has {sorted(domains)}")
    for d, v in spec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            raise UsageError(f"{d}: {v!r} is not a non-negative number")
    out = {d: 0 for d in sorted(domains)}
    if tokens is not None:
        for d, v in spec.items():
            if v != int(v):
                raise UsageError(f"tokens for {d} must be a whole number, got {v}")
            out[d] = int(v)
        return out
    if total is None:
        raise UsageError("--weights needs --total-tokens")
    total = int(total)
    wsum = float(sum(spec.values()))
    if wsum <= 0:
        raise UsageError("weights sum to zero")
    # Largest remainder, ties by domain name, so the counts sum exactly to total.
    exact = {d: total * spec.get(d, 0) / wsum for d in out}
    for d in out:
        out[d] = int(math.floor(exact[d]))
    rest = total - sum(out.values())
    for d in sorted(out, key=lambda d: (-(exact[d] - out[d]), d))[:rest]:
        out[d] += 1
    return out


def seeded_rng(seed, domain, epoch):
    h = hashlib.sha256(f"{seed}\n{domain}\n{epoch}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def draw_training(domain, texts, train_idx, want, seed, tok, cache):
    """`want` tokens of `domain`: its training documents, shuffled by the seed, each one
    preceded by the separator; the shuffle is redrawn per epoch when it runs out.
    Returns (token str, epochs = want / tokens in one pass)."""
    if want == 0:
        return "", 0.0
    if not train_idx:
        raise UsageError(f"domain {domain!r} has no training documents left after the validation split")

    def enc(i):
        s = cache.get(i)
        if s is None:
            s = cache[i] = tok.sep + tok.encode(texts[i])
        return s

    parts, have, epoch, pass_len = [], 0, 0, None
    while have < want:
        order = list(train_idx)
        seeded_rng(seed, domain, epoch).shuffle(order)
        if pass_len is None:
            pass_len = sum(len(enc(i)) for i in order)
        for i in order:
            s = enc(i)
            if have + len(s) >= want:
                parts.append(s[: want - have])
                have = want
                break
            parts.append(s)
            have += len(s)
        epoch += 1
    return "".join(parts), want / pass_len


def run(params, out_dir):
    t0 = time.perf_counter()
    domains = read_corpus(params["corpus"])
    tokname = params["tokenizer"]
    if tokname not in DEFAULT_ORDER:
        raise UsageError(f"--tokenizer must be byte or word, not {tokname!r}")
    order = int(params["order"] or DEFAULT_ORDER[tokname])
    if order < 1:
        raise UsageError("--order must be at least 1")
    seed = int(params["seed"])
    val_docs = int(params["val_docs"])
    val_fraction = float(params["val_fraction"])
    if val_docs < 1 or not 0 <= val_fraction < 1:
        raise UsageError("--val-docs must be >= 1 and --val-fraction in [0, 1)")
    fix_env_domain_case(params, domains)
    want = mixture_tokens(params, domains)

    splits = {d: split_domain(d, domains[d], val_docs, val_fraction) for d in sorted(domains)}
    if tokname == "byte":
        tok = ByteTokenizer()
    else:
        tok = WordTokenizer(domains, splits, int(params["unk_min_count"]), int(params["vocab_sample_tokens"]))

    t_train = time.perf_counter()
    pieces, epochs = [], {}
    for d in sorted(domains):
        s, ep = draw_training(d, domains[d], splits[d][1], want[d], seed, tok, {})
        pieces.append(s)
        epochs[d] = round(ep, 6)
    stream = "".join(pieces)
    model = KneserNey(stream, order, tok.vocab_size)
    del stream, pieces
    train_seconds = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    results = {}
    for d in sorted(domains):
        val_idx = splits[d][0]
        encoded = [tok.sep + tok.encode(domains[d][i]) for i in val_idx]
        vstream = "".join(encoded)
        positions, pos = [], 0
        for s in encoded:  # score every token but the separators
            positions.extend(range(pos + 1, pos + len(s)))
            pos += len(s)
        nats = model.nats(vstream, positions)
        n_tok = len(positions)
        n_bytes = sum(len(domains[d][i].encode("utf-8")) for i in val_idx)
        spell = sum(tok.spell_nats(domains[d][i]) for i in val_idx)
        loss = nats / n_tok
        results[d] = {
            "loss": loss,
            "ppl": math.exp(loss),
            "bpb": (nats + spell) / math.log(2) / n_bytes,
            "val_tokens": n_tok,
            "val_bytes": n_bytes,
            "val_docs": len(val_idx),
            "train_docs": len(splits[d][1]),
        }
    eval_seconds = time.perf_counter() - t_eval

    losses = [results[d]["loss"] for d in sorted(results)]
    ppls = [results[d]["ppl"] for d in sorted(results)]
    report = {
        "domains": results,
        "mean_loss": sum(losses) / len(losses),
        "mean_ppl": sum(ppls) / len(ppls),
        "worst_ppl": max(ppls),
        "train": {
            "tokens": want,
            "epochs": epochs,
            "seconds": round(train_seconds, 3),
        },
        "eval_seconds": round(eval_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "model": dict(tok.describe(), kind="interpolated Kneser-Ney n-gram", order=order,
                      ngrams=model.n_ngrams, discounts=[round(x, 6) for x in model.discount[1:]]),
        "config": {"seed": seed, "val_docs": val_docs, "val_fraction": val_fraction},
    }
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".eval.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return report


# --------------------------------------------------------------------------- params


def json_or_file(value, what):
    if isinstance(value, (dict, list)):
        return value
    text = value.strip()
    if not text.startswith(("{", "[")):
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"{what}: {value!r} is neither JSON nor a readable file ({e})")
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{what}: invalid JSON ({e})")


SCALARS = ("corpus", "tokenizer", "order", "seed", "val_docs", "val_fraction", "total_tokens",
           "unk_min_count", "vocab_sample_tokens")


def env_params(environ):
    """Params from AUTOSCALE_PARAM_* (scalars; TOKENS/WEIGHTS may hold a JSON object, and
    TOKENS_<DOMAIN> / WEIGHTS_<DOMAIN> give one domain each)."""
    p, tokens, weights = {}, {}, {}
    prefix = "AUTOSCALE_PARAM_"
    for key in sorted(environ):
        if not key.startswith(prefix):
            continue
        name, value = key[len(prefix):].lower(), environ[key]
        if name in SCALARS:
            p[name] = value
        elif name in ("tokens", "weights"):
            p[name] = json_or_file(value, key)
        elif name == "params_json":
            p["params_json"] = value
        elif name.startswith("tokens_"):
            tokens[name[len("tokens_"):]] = float(value)
        elif name.startswith("weights_"):
            weights[name[len("weights_"):]] = float(value)
    if tokens:
        p.setdefault("tokens_env", tokens)
    if weights:
        p.setdefault("weights_env", weights)
    if "corpus" not in p and environ.get("AUTOSCALE_INPUT_CORPUS"):
        p["corpus"] = environ["AUTOSCALE_INPUT_CORPUS"]
    return p


def resolve_params(args, environ):
    """Layers, lowest first: defaults, env, --params-json, command line. Scalars: the
    highest layer that sets one wins. The mixture (tokens, or weights + total_tokens):
    the highest layer that gives tokens or weights wins, and the other kind is dropped."""
    env = env_params(environ)
    env_layer = {k: env[k] for k in SCALARS + ("tokens", "weights") if k in env}
    if "tokens" not in env_layer and "weights" not in env_layer:
        if "tokens_env" in env:
            env_layer["tokens"] = env["tokens_env"]
        elif "weights_env" in env:
            env_layer["weights"] = env["weights_env"]
    json_layer = {}
    pj = args.params_json if args.params_json is not None else env.get("params_json")
    if pj:
        data = json_or_file(pj, "--params-json")
        if not isinstance(data, dict):
            raise UsageError("--params-json must hold a JSON object")
        for k, v in data.items():
            k = k.replace("-", "_")
            if k in SCALARS or k in ("tokens", "weights"):
                json_layer[k] = v
        # A DDO fan-out child carries both; its token quantities are what it means.
        if "tokens" in json_layer:
            json_layer.pop("weights", None)
    cli_layer = {}
    for k in SCALARS + ("tokens", "weights"):
        v = getattr(args, k, None)
        if v is not None:
            cli_layer[k] = json_or_file(v, "--" + k) if k in ("tokens", "weights") else v
    params = dict(DEFAULTS)
    for layer in (env_layer, json_layer, cli_layer):
        if "tokens" in layer or "weights" in layer:
            params.pop("tokens", None)
            params.pop("weights", None)
        params.update(layer)
    if params.get("corpus") is None:
        raise UsageError("no corpus: give --corpus DIR (or AUTOSCALE_PARAM_CORPUS / AUTOSCALE_INPUT_CORPUS)")
    return params


def env_key(name):
    """A name as the engine puts it in an env variable (non-alphanumerics -> '_'), lowercased."""
    return "".join(c.lower() if c.isascii() and c.isalnum() else "_" for c in name)


def fix_env_domain_case(params, domains):
    """Per-domain env params arrive as AUTOSCALE_PARAM_TOKENS_<DOMAIN>, so their names are
    uppercased and have '_' for other characters; map them back onto corpus domain names."""
    by_key = {env_key(d): d for d in domains}
    for key in ("tokens", "weights"):
        spec = params.get(key)
        if isinstance(spec, dict):
            params[key] = {(d if d in domains else by_key.get(env_key(d), d)): v for d, v in spec.items()}


# ------------------------------------------------------------------------- self-test


def synth_corpus(path, seed=1):
    """Three domains, each a different word-bigram 'language' over a shared vocabulary
    plus its own words, so data quantity and mixture both matter."""
    rng = random.Random(seed)
    shared = [f"w{i}" for i in range(60)]
    os.makedirs(path, exist_ok=True)
    for dom in ("alpha", "beta", "gamma"):
        own = [f"{dom[:2]}{i}" for i in range(120)]
        words = shared + own
        succ = {w: [rng.choice(words) for _ in range(4)] for w in words}
        with open(os.path.join(path, f"{dom}.jsonl"), "w", encoding="utf-8") as f:
            for doc in range(40):
                w = rng.choice(words)
                out = []
                for _ in range(rng.randint(80, 160)):
                    out.append(w)
                    w = rng.choice(succ[w]) if rng.random() < 0.9 else rng.choice(words)
                text = " ".join(out).capitalize() + "."
                f.write(json.dumps({"text": text, "meta": {"doc": doc}}) + "\n")


def self_test():
    tmp = tempfile.mkdtemp(prefix="ngram-proxy-selftest-")
    failures = []

    def check(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            failures.append(msg)

    def strip_times(r):
        r = json.loads(json.dumps(r))
        r["train"].pop("seconds")
        for k in ("eval_seconds", "total_seconds"):
            r.pop(k)
        return r

    try:
        corpus = os.path.join(tmp, "corpus")
        synth_corpus(corpus)
        for tokname, small, big in (("byte", 3000, 30000), ("word", 600, 6000)):
            base = {**DEFAULTS, "corpus": corpus, "tokenizer": tokname, "val_fraction": 0.1}
            p_small = {**base, "tokens": {"alpha": small, "beta": small, "gamma": small}}
            p_big = {**base, "tokens": {"alpha": big, "beta": small}}  # gamma gets none
            r1 = run(p_small, os.path.join(tmp, tokname, "a"))
            r2 = run(p_small, os.path.join(tmp, tokname, "b"))
            check(strip_times(r1) == strip_times(r2), f"[{tokname}] two runs with the same inputs are identical")
            with open(os.path.join(tmp, tokname, "a", "eval.json"), encoding="utf-8") as f:
                on_disk = json.load(f)
            check(strip_times(on_disk) == strip_times(r1), f"[{tokname}] eval.json holds the report")
            for key in ("domains", "mean_loss", "mean_ppl", "worst_ppl", "train"):
                check(key in on_disk, f"[{tokname}] eval.json has {key!r}")
            check(set(on_disk["train"]) >= {"tokens", "epochs", "seconds"}, f"[{tokname}] train has tokens/epochs/seconds")
            check(sorted(on_disk["domains"]) == ["alpha", "beta", "gamma"], f"[{tokname}] every domain evaluated")
            for d, m in on_disk["domains"].items():
                check(set(m) >= {"loss", "ppl", "bpb", "val_tokens"} and m["val_tokens"] > 0
                      and math.isfinite(m["ppl"]) and m["ppl"] > 1, f"[{tokname}] {d} metrics present and sane")
            rb = run(p_big, os.path.join(tmp, tokname, "big"))
            a_small, a_big = r1["domains"]["alpha"]["ppl"], rb["domains"]["alpha"]["ppl"]
            check(a_big < a_small, f"[{tokname}] more alpha data lowers alpha ppl ({a_small:.3f} -> {a_big:.3f})")
            check(rb["domains"]["gamma"]["ppl"] > r1["domains"]["gamma"]["ppl"],
                  f"[{tokname}] no gamma data raises gamma ppl")
            check(rb["train"]["tokens"]["gamma"] == 0 and rb["train"]["epochs"]["gamma"] == 0,
                  f"[{tokname}] zero-token domain reported with 0 epochs")
            check(rb["train"]["epochs"]["alpha"] > 1, f"[{tokname}] oversampled domain reports epochs > 1 "
                  f"({rb['train']['epochs']['alpha']})")
            check(all(rb["domains"][d]["val_tokens"] == r1["domains"][d]["val_tokens"] for d in r1["domains"]),
                  f"[{tokname}] validation set does not depend on the mixture")
            r_other_seed = run({**p_small, "seed": 7}, os.path.join(tmp, tokname, "seed7"))
            check(all(r_other_seed["domains"][d]["val_tokens"] == r1["domains"][d]["val_tokens"] for d in r1["domains"]),
                  f"[{tokname}] validation set does not depend on the seed")
        # weights + total tokens: exact total, largest remainder
        got = mixture_tokens({"weights": {"alpha": 1, "beta": 1, "gamma": 1}, "total_tokens": 100},
                             {"alpha": [], "beta": [], "gamma": []})
        check(got == {"alpha": 34, "beta": 33, "gamma": 33}, f"weights split the total exactly ({got})")
        # CLI + env path, as a pipeline command stage would run it
        out = os.path.join(tmp, "env-out")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSCALE_")}
        env = dict(clean, AUTOSCALE_OUT=out, AUTOSCALE_PARAM_CORPUS=corpus,
                   AUTOSCALE_PARAM_TOKENS_ALPHA="2000", AUTOSCALE_PARAM_TOKENS_BETA="1000",
                   AUTOSCALE_PARAM_ORDER="4", PYTHONHASHSEED="123")
        cp = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True)
        ok = cp.returncode == 0 and os.path.exists(os.path.join(out, "eval.json"))
        check(ok, "env-only invocation writes $AUTOSCALE_OUT/eval.json" + ("" if ok else f": {cp.stderr.strip()}"))
        if ok:
            with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
                r_env = json.load(f)
            check(r_env["train"]["tokens"] == {"alpha": 2000, "beta": 1000, "gamma": 0} and r_env["model"]["order"] == 4,
                  "env params (per-domain tokens, order) are honoured")
            direct = run({**DEFAULTS, "corpus": corpus, "order": 4, "tokens": {"alpha": 2000, "beta": 1000}},
                         os.path.join(tmp, "direct"))
            check(strip_times(direct) == strip_times(r_env), "result independent of PYTHONHASHSEED / invocation path")
        pj = os.path.join(tmp, "params.json")
        with open(pj, "w", encoding="utf-8") as f:
            json.dump({"tokens": {"beta": 1500}, "tokenizer": "word"}, f)
        cp = subprocess.run([sys.executable, os.path.abspath(__file__), "--corpus", corpus, "--out",
                             os.path.join(tmp, "pj"), "--params-json", pj], env=clean, capture_output=True, text=True)
        ok = cp.returncode == 0
        if ok:
            with open(os.path.join(tmp, "pj", "eval.json"), encoding="utf-8") as f:
                r_pj = json.load(f)
            ok = r_pj["train"]["tokens"]["beta"] == 1500 and r_pj["model"]["tokenizer"] == "word"
        check(ok, "--params-json FILE is honoured" + ("" if ok else f": {cp.stderr.strip()}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"self-test FAILED: {len(failures)} check(s)", file=sys.stderr)
        return 1
    print("self-test passed")
    return 0


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="directory of <domain>.jsonl files")
    ap.add_argument("--out", help="output directory (default $AUTOSCALE_OUT)")
    ap.add_argument("--tokens", help='JSON object (or file) of training tokens per domain: \'{"books": 20000}\'')
    ap.add_argument("--weights", help="JSON object (or file) of mixture weights; needs --total-tokens")
    ap.add_argument("--total-tokens", type=float, dest="total_tokens")
    ap.add_argument("--order", type=int, help="n-gram order (default 5 for byte, 3 for word)")
    ap.add_argument("--seed", type=int, help="training-draw seed (default 0)")
    ap.add_argument("--val-docs", type=int, dest="val_docs", help="max held-out docs per domain (default 50)")
    ap.add_argument("--val-fraction", type=float, dest="val_fraction",
                    help="held-out share of each domain's bytes (default 0.02; at least one doc)")
    ap.add_argument("--tokenizer", choices=("byte", "word"), help="default byte")
    ap.add_argument("--unk-min-count", type=int, dest="unk_min_count", help="word tokenizer: min count (default 2)")
    ap.add_argument("--vocab-sample-tokens", type=int, dest="vocab_sample_tokens",
                    help="word tokenizer: vocabulary sample per domain (default 50000)")
    ap.add_argument("--params-json", dest="params_json", help="JSON object or file with any of the params")
    ap.add_argument("--self-test", action="store_true", help="run the built-in checks and exit")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    try:
        params = resolve_params(args, os.environ)
        out = args.out or os.environ.get("AUTOSCALE_OUT")
        if not out:
            raise UsageError("no output directory: give --out or set AUTOSCALE_OUT")
        report = run(params, out)
    except UsageError as e:
        print(f"ngram_proxy: error: {e}", file=sys.stderr)
        return 2
    summary = "  ".join(f"{d}={m['ppl']:.2f}" for d, m in report["domains"].items())
    print(f"ppl: {summary}  | mean {report['mean_ppl']:.2f} worst {report['worst_ppl']:.2f} | "
          f"train {report['train']['seconds']:.2f}s eval {report['eval_seconds']:.2f}s -> "
          f"{os.path.join(out, 'eval.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
