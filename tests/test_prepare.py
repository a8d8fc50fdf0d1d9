"""Tests for data/pycode/prepare.py, on a tiny fake source tree (and once on the real stdlib, briefly)."""
import ast
import hashlib
import importlib.util
import json
import os
import random

import numpy as np
import pytest

from tasks.pycode import is_trivial_statement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("pycode_prepare", os.path.join(ROOT, "data", "pycode", "prepare.py"))
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

from common import UserError  # noqa: E402  (prepare put the repo root on sys.path)
from tokenizer import get_tokenizer  # noqa: E402

VAL_EVERY = 2

# every function name starts with its module's name, so each SFT row can be traced back to its file
MODULE = '''\
"""Module {m}."""
import math


def {m}_area(r):
    """Area of a circle of radius r."""
    return math.pi * r ** 2


@staticmethod
def {m}_scaled(xs, k):
    """Each of xs times k."""
    out = [x * k for x in xs]
    return {{i: v for i, v in enumerate(out)}}


class {m}_Box:
    def __init__(self, items):
        self.items = list(items)

    def {m}_first(self):
        """The first item, or None."""
        return self.items[0] if self.items else None

    async def {m}_fetch(self, key):
        """Fetch the value under key."""
        value = await self.get(key)
        return (key, value)

    def {m}_outer(self):
        """Uses a nested helper."""
        def {m}_inner(y):
            """Twice y."""
            return 2 * y
        return {m}_inner(3)


def {m}_todo(x):
    """Not written yet."""
    raise NotImplementedError


def {m}_long(x):
    """Too long a body for max_body_lines=2."""
    a = x + 1
    b = a * 2
    return b


def shared(x):
    """Defined identically in every module: must not leak from train into val."""
    return x + 1
'''


def _names(n_train=3, n_val=2):
    """Module names putting n_train files in train and n_val in val."""
    names, want = [], {"train": n_train, "val": n_val}
    for i in range(100):
        split = prepare.split_of(f"mod{i}.py", VAL_EVERY)
        if want[split]:
            want[split] -= 1
            names.append(f"mod{i}")
    assert not any(want.values())
    return names


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
    modules = _names()
    for m in modules:
        _write(os.path.join(src, f"{m}.py"), MODULE.format(m=m))
    _write(os.path.join(src, "pkg", "__init__.py"), "")
    _write(os.path.join(src, "pkg", "util.py"), 'def pkg_util_twice(x):\n    """Twice x."""\n    return 2 * x\n')
    for skipped in ("test/test_a.py", "pkg/tests/test_b.py", "idlelib/idle_test/c.py", "site-packages/d.py"):
        _write(os.path.join(src, skipped), 'def skipped_fn(x):\n    """Never read."""\n    return x\n')
    _write(os.path.join(src, "latin1.py"), b'# -*- coding: latin-1 -*-\nname = "caf\xe9"\n')
    meta = prepare.main([f"--src_dir={src}", f"--out_dir={out}", f"--val_every={VAL_EVERY}", "--seed=1"])
    return src, out, meta, modules


def _jsonl(out, name):
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _split_of_row(row, modules):
    """The split of the file a row's function came from, found through the function's name."""
    name = row["prompt"].split("(")[0].split()[-1]
    if name.startswith("pkg_util"):
        return prepare.split_of("pkg/util.py", VAL_EVERY)
    return prepare.split_of(next(m for m in modules if name.startswith(m + "_")) + ".py", VAL_EVERY)


def test_find_source_files_skips_tests_and_site_packages(run):
    src, _, _, modules = run
    paths = prepare.find_source_files(str(src))
    assert paths == sorted(paths)
    assert set(paths) == {f"{m}.py" for m in modules} | {"pkg/__init__.py", "pkg/util.py", "latin1.py"}
    assert prepare.find_source_files(str(src), max_files=2) == paths[:2]


def test_split_is_by_path_hash_and_deterministic():
    paths = [f"pkg{i}/mod{j}.py" for i in range(20) for j in range(5)]
    for p in paths:
        want = "val" if int(hashlib.sha256(p.encode()).hexdigest(), 16) % 10 == 0 else "train"
        assert prepare.split_of(p, 10) == want
    assert 0 < sum(prepare.split_of(p, 10) == "val" for p in paths) < len(paths) / 4


def test_sft_rows_come_from_their_splits_files(run):
    _, out, _, modules = run
    for split in ("train", "val"):
        rows = _jsonl(out, f"sft_{split}.jsonl")
        assert rows
        for row in rows:
            if not row["prompt"].startswith("def shared"):
                assert _split_of_row(row, modules) == split


def test_bins_decode_to_the_files(run):
    src, out, meta, _ = run
    tok = get_tokenizer(meta["tokenizer"])  # the BPE learnt from the train split, stored in meta.json
    for split in ("train", "val"):
        texts = []
        for rel in prepare.find_source_files(str(src)):
            raw = open(os.path.join(src, rel), "rb").read()
            if prepare.split_of(rel, VAL_EVERY) == split and rel != "latin1.py":
                texts.append(raw.decode("utf-8"))
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
        assert len(ids) == meta["counts"][split]["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
        assert ids[-1] == tok.eot_token
        pieces = np.split(ids, np.flatnonzero(ids == tok.eot_token) + 1)[:-1]
        assert [tok.decode(p[:-1]) for p in pieces] == texts


def test_sft_pairs(run):
    _, out, meta, _ = run
    for split in ("train", "val"):
        rows = _jsonl(out, f"sft_{split}.jsonl")
        assert meta["examples"][f"sft_{split}.jsonl"] == len(rows)
        assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"prompt", "response"}
            assert r["prompt"].startswith(("def ", "async def "))  # decorators dropped, dedented to column 0
            assert r["prompt"].endswith('"""\n') and r["response"].endswith("\n")
            assert r["response"].startswith("    ")
            assert "<|endoftext|>" not in r["prompt"] + r["response"]
            ast.parse(r["prompt"] + r["response"])
            body = [line for line in r["response"].split("\n") if line.strip()]
            assert 1 <= len(body) <= 2
            assert "NotImplementedError" not in r["response"] and "_long" not in r["prompt"]
    prompts = {r["prompt"].split("(")[0] for r in _jsonl(out, "sft_train.jsonl") + _jsonl(out, "sft_val.jsonl")}
    for kind in ("_area", "_scaled", "_first", "_fetch", "_inner"):  # functions, methods, async, nested
        assert any(p.endswith(kind) for p in prompts), kind
    assert meta["dropped"]["train"]["trivial_body"] >= 1 and meta["dropped"]["train"]["body_too_long"] >= 1


def test_val_is_held_out(run):
    _, out, meta, _ = run
    train = {r["prompt"] for r in _jsonl(out, "sft_train.jsonl")}
    assert any(p.startswith("def shared") for p in train)
    for name in ("sft_val.jsonl", "pref_val.jsonl", "prompts_eval.jsonl"):
        assert not train & {r["prompt"] for r in _jsonl(out, name)}
    assert meta["dropped"]["val"]["prompt_in_train"] == 1 and meta["dropped"]["val"]["duplicate"] == 1
    evals = _jsonl(out, "prompts_eval.jsonl")
    val = {(r["prompt"], r["response"]) for r in _jsonl(out, "sft_val.jsonl")}
    assert evals and all((e["prompt"], e["reference"]) in val for e in evals)
    assert [r["prompt"] for r in _jsonl(out, "prompts_train.jsonl")] == list(dict.fromkeys(
        r["prompt"] for r in _jsonl(out, "sft_train.jsonl")))


def _parses(source):
    try:
        ast.parse(source)
        return True
    except SyntaxError:
        return False


def test_preference_pairs(run):
    _, out, meta, _ = run
    for split in ("train", "val"):
        sft = [(r["prompt"], r["response"]) for r in _jsonl(out, f"sft_{split}.jsonl")]
        rows = _jsonl(out, f"pref_{split}.jsonl")
        per_function = 3 if split == "train" else 1  # the default --train_pairs_per_function; val keeps one
        assert list(dict.fromkeys((r["prompt"], r["chosen"]) for r in rows)) == sft  # every SFT pair, in order
        for pair in sft:
            kinds = [r["kind"] for r in rows if (r["prompt"], r["chosen"]) == pair]
            assert 1 <= len(kinds) <= per_function and len(set(kinds)) == len(kinds)  # a different kind each
        if split == "train":
            assert len(rows) > 2 * len(sft)  # most functions give several pairs
        assert meta["preference_kinds"][split] == {k: sum(r["kind"] == k for r in rows) for k in prepare.CORRUPTIONS}
        for r in rows:
            assert r["rejected"] != r["chosen"]
            if r["kind"] in prepare.MUST_NOT_PARSE:
                assert not _parses(r["prompt"] + r["rejected"])
            if r["kind"] == "other_function":
                assert r["rejected"] in {resp for _, resp in sft}
            if r["kind"] == "shuffled":
                assert sorted(r["rejected"].split("\n")) == sorted(r["chosen"].split("\n"))
    kinds = {r["kind"] for r in _jsonl(out, "pref_train.jsonl")}
    assert kinds == set(prepare.CORRUPTIONS)


PROMPT = 'def f(xs, k):\n    """Scale xs by k."""\n'
BODIES = ['    out = [x * k for x in xs]\n    return sorted(out)\n', '    return {"k": k, "xs": list(xs)}\n']


@pytest.mark.parametrize("body", BODIES)
def test_each_corruption_does_what_its_name_says(body):
    rng = random.Random(0)
    t = prepare.truncated(body, rng)
    assert body.startswith(t.rstrip("\n")) and len(t) < len(body) and not _parses(PROMPT + t)
    u = prepare.unbalanced(body, rng)
    assert any(c in "()[]{}" and body[:i] + body[i + 1:] == u for i, c in enumerate(body)) and not _parses(PROMPT + u)
    b = prepare.bad_indent(body, rng)
    assert not _parses(PROMPT + b) and [line.strip() for line in b.split("\n")] == [
        line.strip() for line in body.split("\n")]
    s = prepare.shuffled(body, rng)
    if body.count("\n") >= 2:  # two statements ending in a return: the return moves first, the rest is dead code
        first, second = prepare.split_lines(body)
        assert s == second + first
    else:
        assert s is None
    d = prepare.does_nothing(body, rng)
    assert _parses(PROMPT + d) and all(is_trivial_statement(s) for s in ast.parse(PROMPT + d).body[0].body[1:])
    unrelated = '    return os.getcwd()\n'
    other = prepare.other_function(body, rng, pool=BODIES + [unrelated], prompt=PROMPT)
    assert other == unrelated  # the only body that uses none of the prompt's names (xs, k, Scale, ...)
    assert prepare.other_function(body, rng, pool=BODIES, prompt=PROMPT) is None
    # a real body that ignores the arguments (names only a docstring word) leaves nothing to tell the two apart
    assert prepare.other_function("    return Scale\n", rng, pool=[unrelated], prompt=PROMPT) is None


def test_argument_names_come_from_the_signature_without_self():
    prompt = 'def f(self, a, /, b=1, *c, d, **e):\n    """Doc mentioning x."""\n'
    assert prepare.argument_names(prompt) == ["a", "b", "c", "d", "e"]
    assert prepare.argument_names('async def g(cls):\n    """Doc."""\n') == []


def test_shuffled_needs_a_final_return_and_never_leaves_it_last():
    rng = random.Random(0)
    assert prepare.shuffled("    a = 1\n    b = 2\n", rng) is None  # two independent statements: no worse swapped
    body = "    a = f()\n    b = g(a)\n    return b\n"
    for _ in range(5):
        s = prepare.shuffled(body, rng)
        assert sorted(s.splitlines()) == sorted(body.splitlines()) and not s.endswith("return b\n")


def test_truncated_gives_up_when_no_cut_breaks_the_code():
    assert prepare.truncated("    return x\n", random.Random(0)) is None


def test_meta(run):
    src, out, meta, _ = run
    lines = {"train": 0, "val": 0}
    files = {"train": 0, "val": 0}
    for rel in prepare.find_source_files(str(src)):
        if rel != "latin1.py":
            split = prepare.split_of(rel, VAL_EVERY)
            lines[split] += open(os.path.join(src, rel), encoding="utf-8").read().count("\n")
            files[split] += 1
    for split in ("train", "val"):
        assert meta["counts"][split]["lines"] == lines[split]
        assert meta["counts"][split]["files"] == files[split]
    skipped = prepare.split_of("latin1.py", VAL_EVERY)
    assert meta["counts"][skipped]["files_skipped_not_utf8"] == 1
    assert meta["tokenizer"]["kind"] == "bpe" and meta["dtype"] == "uint16"
    tok = get_tokenizer(meta["tokenizer"])
    assert meta["n_vocab"] == tok.n_vocab <= 2048 and meta["eot_token"] == tok.eot_token == tok.n_vocab - 1
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["inputs_sha256"] == meta["inputs_sha256"]
    for name, n in meta["examples"].items():
        if name.endswith(".jsonl"):
            assert len(_jsonl(out, name)) == n
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_rerun_is_identical(run, tmp_path):
    src, out, _, _ = run
    prepare.main([f"--src_dir={src}", f"--out_dir={tmp_path}", f"--val_every={VAL_EVERY}", "--seed=1"])
    for name in os.listdir(out):
        if name != "meta.json":  # meta.json records out_dir
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(tmp_path, name), "rb").read()


def test_errors_are_one_line_in_the_style_of_every_script(tmp_path):
    for argv, message in (([f"--src_dir={tmp_path}", f"--out_dir={tmp_path}"], f"no .py files found under {tmp_path}"),
                          (["--tokenizer=nope"], "unknown tokenizer 'nope'"),
                          (["--no_such_option=1"], "unrecognized arguments: --no_such_option=1"),
                          (["--val_every=0"], "--val_every must be at least 2, got 0")):
        with pytest.raises(UserError) as error:
            prepare.main(argv)
        assert str(error.value).startswith(f"error: {message}") and "\n" not in str(error.value)


def test_a_source_folder_with_nothing_usable_leaves_the_dataset_there_as_it_was(run, tmp_path):
    _, out, _, _ = run
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    for name, text in (("not_utf8.py", b'def f(x):\n    """caf\xe9"""\n    return x\n'),
                       ("no_functions.py", b"x = 1\n")):
        src = tmp_path / name.split(".")[0]
        _write(os.path.join(src, name), text)
        with pytest.raises(UserError, match=r"gives nothing usable for .*val.bin.*; nothing was written"):
            prepare.main([f"--src_dir={src}", f"--out_dir={out}"])
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_real_stdlib(tmp_path):
    meta = prepare.main([f"--out_dir={tmp_path}", "--max_files=200"])
    assert meta["counts"]["train"]["files"] + meta["counts"]["val"]["files"] == 200
    assert meta["examples"]["sft_train.jsonl"] > 50 and meta["examples"]["prompts_eval.jsonl"] > 0
    for r in _jsonl(tmp_path, "pref_train.jsonl"):
        assert r["rejected"] != r["chosen"] and _parses(r["prompt"] + r["chosen"])


def test_renamed_copies_rename_the_arguments_alike_in_def_line_docstring_and_body():
    prompt = 'def scale(xs, k):\n    """Each of xs times k."""\n'
    body = "    out = [x * k for x in xs]\n    return self.k + len(out)\n"
    new_prompt, new_body = prepare.renamed_arguments(prompt, body, random.Random(0), ["alpha", "beta", "gamma"])
    fn = ast.parse(new_prompt + new_body).body[0]
    new_args = [a.arg for a in fn.args.args]
    assert set(new_args) <= {"alpha", "beta", "gamma"} and len(set(new_args)) == 2
    a, b = new_args
    assert new_prompt == f'def scale({a}, {b}):\n    """Each of {a} times {b}."""\n'
    # the body reads the new names; `self.k` is an attribute, not the argument, and keeps its name
    assert new_body == f"    out = [x * {b} for x in {a}]\n    return self.k + len(out)\n"
    # nothing to learn from a body that reads no argument
    assert prepare.renamed_arguments(prompt, "    return 1\n", random.Random(0), ["alpha", "beta"]) is None


def test_wrong_names_renames_the_arguments_in_the_body_only():
    prompt = 'def scale(xs, k):\n    """Each of xs times k."""\n'
    body = "    return [x * k for x in xs]\n"
    rejected = prepare.wrong_names(body, random.Random(0), ["alpha", "beta"], prompt)
    assert rejected in ("    return [x * alpha for x in beta]\n", "    return [x * beta for x in alpha]\n")
    assert _parses(prompt + rejected)


def test_renamed_copies_are_written_beside_the_training_functions(run):
    _, out, meta, _ = run
    copies = _jsonl(out, "sft_train_renamed.jsonl")
    assert len(copies) == meta["examples"]["sft_train_renamed.jsonl"] > 0
    originals = {r["prompt"].split("(")[0] for r in _jsonl(out, "sft_train.jsonl")}
    for r in copies:
        assert r["prompt"].split("(")[0] in originals and _parses(r["prompt"] + r["response"])
