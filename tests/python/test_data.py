"""Python's view of the data stages' outputs: pyarrow and HF `datasets` read the shards, and
HF `tokenizers` loads our `tokenizer.json` and gives the ids our `shard` path wrote.

`tests/data_stages.rs` runs the pipeline, then this file with `AUTOSCALE_TEST_DATA` naming a
JSON file:

    {"runs": [{"shards": DIR, "tokenizer": FILE, "prepared": {domain: DIR}}],
     "gpt2_tokenizer": FILE}

Run on its own, without that variable, every test is skipped.
"""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from tokenizers import Tokenizer

EOT = "<|endoftext|>"


def _spec():
    path = os.environ.get("AUTOSCALE_TEST_DATA")
    if not path:
        pytest.skip("AUTOSCALE_TEST_DATA is not set: run through `cargo test --test data_stages`")
    return json.loads(Path(path).read_text())


def _runs():
    return _spec()["runs"]


def _read_stream(path):
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def _docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_shards_hold_the_manifests_token_counts():
    for run in _runs():
        out = Path(run["shards"])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["format"] == "arrow-ipc-stream"
        assert manifest["compression"] == "none"
        expected_type = {"uint16": pa.uint16(), "uint32": pa.uint32()}[manifest["dtype"]]
        assert manifest["domains"], "at least one domain"
        for domain, splits in manifest["domains"].items():
            for split, stats in splits.items():
                total = 0
                eots = 0
                for shard in stats["shards"]:
                    table = _read_stream(out / shard["file"])
                    assert table.schema.field("token").type == expected_type
                    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
                    assert meta["domain"] == domain and meta["split"] == split
                    assert meta["tokenizer_blake3"] == manifest["tokenizer_blake3"]
                    assert table.num_rows == shard["tokens"], shard["file"]
                    total += table.num_rows
                    eots += pc.sum(pc.equal(table["token"], manifest["eot_id"])).as_py() or 0
                assert total == stats["tokens"], (domain, split)
                assert eots == stats["documents"], (domain, split)


def test_python_tokenizers_give_the_ids_our_shards_hold():
    """Every training document of every domain (prose, code, LaTeX, the mixed fixture)."""
    for run in _runs():
        out = Path(run["shards"])
        manifest = json.loads((out / "manifest.json").read_text())
        tok = Tokenizer.from_file(run["tokenizer"])
        # As the shard path does: text that spells <|endoftext|> stays text.
        tok.encode_special_tokens = True
        eot = manifest["eot_id"]
        assert tok.token_to_id(EOT) == eot
        compared = 0
        for domain, prepared in run["prepared"].items():
            docs = _docs(Path(prepared) / "train.jsonl")
            ids = []
            for shard in manifest["domains"][domain]["train"]["shards"]:
                ids.extend(_read_stream(out / shard["file"])["token"].to_pylist())
            ours = []
            current = []
            for t in ids:
                if t == eot:
                    ours.append(current)
                    current = []
                else:
                    current.append(t)
            assert current == [], "the stream ends with end-of-text"
            assert len(ours) == len(docs), domain
            theirs = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert a == b, f"{domain} document {i}: {docs[i][:80]!r}"
            compared += len(docs)
        assert compared > 0


def test_gpt2_hello_world():
    tok = Tokenizer.from_file(_spec()["gpt2_tokenizer"])
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id(EOT) == 50256
    assert tok.get_vocab_size() == 50257
    text = "def f(x):\n    return x ** 2\n$\\int_0^1 x\\,dx = \\frac{1}{2}$ café"
    assert tok.decode(tok.encode(text).ids) == text


def test_hf_datasets_reads_a_shard():
    datasets = pytest.importorskip("datasets", reason="HF `datasets` is not installed")
    run = _runs()[0]
    out = Path(run["shards"])
    manifest = json.loads((out / "manifest.json").read_text())
    domain, splits = next(iter(manifest["domains"].items()))
    shard = splits["train"]["shards"][0]
    ds = datasets.Dataset.from_file(str(out / shard["file"]))
    assert len(ds) == shard["tokens"]
    assert ds.column_names == ["token"]
