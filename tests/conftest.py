"""Tests import the project's modules from the repository root and run on the CPU in float32, whatever the CPU:
dtype='auto' would pick bfloat16 on CPUs that compute it natively, so the tests say the CPU does not (the tests of that
choice itself undo this)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _float32_on_every_cpu(monkeypatch):
    import common
    monkeypatch.setattr(common, "cpu_flags", lambda: [])


def write_token_dataset(directory, text=None, tokenizer="byte"):
    """A tiny dataset in prepare.py's layout (train.bin, val.bin, meta.json), made from a few lines of Python."""
    import json
    import numpy as np
    from tokenizer import get_tokenizer
    tok = get_tokenizer(tokenizer)
    text = text or "def add(a, b):\n    return a + b\n\ndef neg(x):\n    return -x\n" * 200
    os.makedirs(directory, exist_ok=True)
    ids = tok.encode(text) + [tok.eot_token]
    for split, part in (("train", ids), ("val", ids[: len(ids) // 4])):
        np.array(part, dtype=np.uint16).tofile(os.path.join(directory, f"{split}.bin"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": tok.name, "n_vocab": tok.n_vocab, "eot_token": tok.eot_token}, f)
    return str(directory)


@pytest.fixture
def token_dataset(tmp_path):
    return write_token_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """data/pycode/prepare.py run on this machine's standard library (with bytes, the quickest: a few seconds), once."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pycode_prepare", os.path.join(ROOT, "data", "pycode", "prepare.py"))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path_factory.mktemp("stdlib_data")
    prepare.main([f"--out_dir={out}", "--tokenizer=byte"])
    return str(out)
