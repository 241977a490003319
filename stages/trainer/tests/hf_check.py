#!/usr/bin/env python3
"""Loads an autoscale model export with Hugging Face `transformers` and scores its sample batch.

    python hf_check.py MODEL_DIR

MODEL_DIR holds model.safetensors, config.json and sample.json (`input_ids`, `labels` and the
loss autoscale computed). Prints one JSON object: the loss transformers computes, autoscale's,
and the keys transformers found missing or unexpected. Exit status 3 when transformers is not
installed (the caller skips), 0 otherwise.
"""

import json
import os
import sys

try:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
except ImportError as e:  # the caller reports SKIPPED
    print(json.dumps({"skipped": f"transformers is not importable: {e}"}))
    sys.exit(3)


def main():
    model_dir = sys.argv[1]
    with open(os.path.join(model_dir, "sample.json"), encoding="utf-8") as f:
        sample = json.load(f)
    config = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    model, info = cls.from_pretrained(model_dir, output_loading_info=True, torch_dtype=torch.float32)
    model.eval()
    input_ids = torch.tensor(sample["input_ids"], dtype=torch.long)
    labels = torch.tensor(sample["labels"], dtype=torch.long)
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss.item()
    print(json.dumps({
        "transformers": transformers.__version__,
        "class": type(model).__name__,
        "loss": loss,
        "autoscale_loss": sample["loss"],
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": [list(map(str, k)) for k in info.get("mismatched_keys", [])],
    }))


if __name__ == "__main__":
    main()
