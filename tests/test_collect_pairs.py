"""collect_pairs.py: the labeler, how a prompt's samples become pairs, and a tiny run whose files train_rm.py reads
beside others (a comma-separated train_file)."""
import json
import os
import random
import subprocess
import sys

import pytest

import collect_pairs
import train_rm
from common import UserError, read_preference_pairs
from tasks import pycode as task
from conftest import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT = 'def add(a, b):\n    """Sum."""\n'


def test_the_labeler_grades_with_the_tasks_judge_and_wants_a_finished_response():
    grades = task.grade([PROMPT] * 4, ["    return a + b\n", "    return a + b\n", "    return 1\n", "    pass\n"],
                        [True, False, True, True])
    assert grades == [task.SOLVED, 0, 2, 1]  # solved; cut off by the length limit; ignores a and b; does nothing


def test_each_sample_that_does_not_solve_is_paired_with_one_that_does_or_the_reference():
    rng = random.Random(0)
    samples = [("    return a + b\n", 3), ("    return (a\n", 0), ("    return (a\n", 0), ("    return 1\n", 2),
               ("   \n", 1)]
    pairs = collect_pairs.ranked_pairs("    return b + a\n", samples, rng, max_pairs=5)
    # distinct unsolved responses only (a blank one too), each against the solving sample, closest misses first
    assert pairs == [("    return a + b\n", "    return 1\n"), ("    return a + b\n", "   \n"),
                     ("    return a + b\n", "    return (a\n")]
    assert collect_pairs.ranked_pairs("ref", samples, rng, max_pairs=1) == [("    return a + b\n", "    return 1\n")]
    # no sample solves the prompt: the real body is the chosen response
    assert collect_pairs.ranked_pairs("    return b + a\n", [("    return 1\n", 2)], rng, 2) == [
        ("    return b + a\n", "    return 1\n")]
    assert collect_pairs.ranked_pairs("ref", [("    return a\n", 3)], rng, 2) == []  # nothing to rank



def test_ranked_pairs_are_the_same_whatever_python_s_string_hashing():
    """The same seed pairs the same samples in every run: sets of strings iterate in an order that changes with
    PYTHONHASHSEED from one process to the next, so nothing random may be drawn in a set's order."""
    code = ("import random, collect_pairs; samples = [(f'    return x{i}\\n', 2) for i in range(12)]; "
            "print(collect_pairs.ranked_pairs('    return x\\n', samples, random.Random(0), 4))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONHASHSEED=str(h))).stdout for h in (1, 2, 3)}
    assert len(runs) == 1 and "x" in runs.pop()

def test_a_tiny_run_writes_pairs_train_rm_reads_beside_other_files(tiny_lm, tmp_path):
    examples = [{"prompt": f'def f{i}(a):\n    """Doc {i}."""\n', "response": f"    return a + {i}\n"} for i in range(6)]
    sft = write_jsonl(tmp_path / "sft.jsonl", examples)
    out = tmp_path / "pairs"
    meta = collect_pairs.main([f"--init_from={tiny_lm}", f"--out_dir={out}", f"--train_file={sft}",
                               f"--val_file={sft}", "--samples_per_prompt=3", "--max_new_tokens=8", "--device=cpu"])
    assert meta["train"]["prompts"] == 6 and meta["train"]["samples"] == 18
    pairs = read_preference_pairs(str(out / "pref_train.jsonl"))
    assert len(pairs) == meta["train"]["pairs"] > 0  # an untrained model's 8 random bytes are never a function
    assert all(p["prompt"] in {e["prompt"] for e in examples} for p in pairs)
    # and for training, one (chosen, empty) pair per prompt: the random model's samples are never empty
    empty = [p for p in pairs if p["kind"] == "empty"]
    assert len(empty) == 6 and all(p["rejected"] == "" and p["chosen"] for p in empty)
    assert {p["kind"] for p in pairs} == {"sampled", "empty"}
    val_pairs = read_preference_pairs(str(out / "pref_val.jsonl"))
    assert len(val_pairs) == json.loads((out / "meta.json").read_text())["val"]["pairs"] > 0
    assert {p["kind"] for p in val_pairs} == {"sampled"}  # held out: the model's own samples only
    made_up = write_jsonl(tmp_path / "made_up.jsonl", [{"prompt": PROMPT, "chosen": "    return a + b\n",
                                                        "rejected": "    return (a\n", "kind": "unbalanced"}] * 4)
    result = train_rm.main([f"--init_from={tiny_lm}", f"--out_dir={tmp_path / 'rm'}", "--device=cpu",
                            f"--train_file={made_up},{out / 'pref_train.jsonl'}", f"--val_file={made_up},"
                            f"{out / 'pref_val.jsonl'}", "--max_iters=1", "--eval_interval=1", "--batch_size=4"])
    assert set(result["by_kind"]) == {"unbalanced", "sampled", "all"}
    assert set(result["val_accuracy_by_file"]) == {made_up, str(out / "pref_val.jsonl")}


def test_bad_settings_are_clear_errors(tiny_lm, tmp_path):
    with pytest.raises(UserError, match="samples_per_prompt=0 must be at least 1"):
        collect_pairs.main([f"--init_from={tiny_lm}", f"--out_dir={tmp_path}", "--samples_per_prompt=0"])
    with pytest.raises(UserError, match="train_sft.py"):
        collect_pairs.main([f"--init_from={tmp_path / 'nothing'}", f"--out_dir={tmp_path}"])


def test_an_empty_rejected_response_is_read_and_ranks_below_a_real_body(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": "    return a + b\n", "rejected": ""}])
    assert read_preference_pairs(path)[0]["rejected"] == ""
    for body in ("", "    pass\n", "    ...\n", "    return\n", "    return None\n"):
        assert task.grade([PROMPT], [body], [True]) == [1]
