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


def write_jsonl(path, rows):
    """Rows as JSON lines; a str or bytes row is written as it is (a malformed line)."""
    import json
    with open(path, "wb") as f:
        for row in rows:
            line = row if isinstance(row, (str, bytes)) else json.dumps(row)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


# a GPT small enough to train in a second: train_lm.py's arguments
TINY_LM = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--eval_iters=1",
           "--log_interval=1", "--device=cpu", "--sample_at_end=False", "--peak_tflops=1.0", "--warmup_iters=1"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny GPT pretrained for three steps on the tiny token dataset: the start of the later stages' tests."""
    import train_lm
    d = tmp_path_factory.mktemp("lm")
    data = write_token_dataset(d / "data")
    train_lm.main(TINY_LM + [f"--dataset={data}", f"--out_dir={d / 'lm'}", "--max_iters=3", "--eval_interval=3"])
    return str(d / "lm")


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
