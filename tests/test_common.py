"""common.py's plumbing: checkpoints that are never corrupt nor non-finite, an out_dir that is checked and rid of
the temp files of killed writes, metrics that survive a kill, readers whose bad input is a one-line error, and
the guard that stops a diverging run."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import train_dpo
import train_rm
from common import (Metrics, NonFiniteGuard, TokenBatches, UserError, evaluation_due, gpt2_weights, load_checkpoint,
                    make_out_dir, read_jsonl, read_jsonl_records, read_meta, save_checkpoint, write_atomic)
from conftest import write_token_dataset


def checkpoint(value):
    return {"stage": "lm", "model_args": {}, "model": {"w": torch.full((3,), value)}, "tokenizer": "byte"}


# ---- checkpoints

def test_weights_that_are_nan_or_inf_are_never_written_over_a_good_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, checkpoint(1.0))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"not saving .*ckpt.pt: the model's weights w are nan or inf"):
            save_checkpoint(path, checkpoint(bad))
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    with pytest.raises(UserError, match="the critic's weights w are nan or inf"):
        save_checkpoint(path, dict(checkpoint(1.0), critic={"w": torch.tensor([float("nan")])}))


def test_an_empty_file_or_a_file_of_another_kind_is_not_a_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"ckpt.pt is not a readable checkpoint \(corrupt, truncated or empty\?\)"):
        load_checkpoint(str(path))
    torch.save([torch.ones(2)], path)
    with pytest.raises(UserError, match="not a checkpoint of this project \\(it holds a list\\)"):
        load_checkpoint(str(path))


# ---- out_dir and atomic writes

def test_the_temp_files_of_interrupted_writes_are_removed_at_the_next_start_and_nothing_else(tmp_path, capsys):
    names = ["ckpt.pt", "ckpt.pt.k2h_x9ab.tmp", "metrics.jsonl.0a1b2c3d.tmp", "notes.tmp", "data.x.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    make_out_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "data.x.tmp", "notes.tmp"]
    assert "removed 2 temp file(s)" in capsys.readouterr().out


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in, even by root (chattr +i); skipped where that cannot be had."""
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        (d / "probe").write_text("x")
        (d / "probe").unlink()
        pytest.skip("this user can write to a read-only directory")
    except OSError:
        pass
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_an_out_dir_that_is_a_file_is_a_one_line_error_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="out_dir '.*taken' is a file, not a directory"):
        train_dpo.main([f"--out_dir={tmp_path / 'taken'}", "--device=cpu"])
    with pytest.raises(UserError, match="cannot write to out_dir '.*taken/sub'"):
        train_rm.main([f"--out_dir={tmp_path / 'taken' / 'sub'}", "--device=cpu"])


def test_a_read_only_out_dir_is_a_one_line_error(read_only_dir):
    with pytest.raises(UserError, match="cannot write to out_dir '.*read_only'"):
        train_dpo.main([f"--out_dir={read_only_dir}", "--device=cpu"])
    with pytest.raises(UserError, match=r"cannot write .*read_only/report.md: "):
        write_atomic(str(read_only_dir / "report.md"), lambda f: f.write(b"x"))


def test_a_write_the_file_system_refuses_is_a_one_line_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(UserError, match="cannot write .*report.md: No space left on device"):
        write_atomic(str(path), lambda f: f.write(b"new"))
    assert os.listdir(tmp_path) == ["report.md"] and path.read_text() == "old"


def test_a_new_run_never_writes_over_the_checkpoint_it_starts_from_nor_another_stages(tmp_path):
    save_checkpoint(str(tmp_path / "sft" / "ckpt.pt"), dict(checkpoint(1.0), stage="sft"))
    with pytest.raises(UserError, match="out_dir and init_from are both .*sft.*write over the checkpoint it starts"):
        make_out_dir(str(tmp_path / "sft"), init_from=str(tmp_path / "sft"), stage="sft")
    with pytest.raises(UserError, match=r"sft/ckpt.pt is a 'sft' checkpoint that this 'rm' run would write over"):
        make_out_dir(str(tmp_path / "sft"), init_from=str(tmp_path / "lm"), stage="rm")
    make_out_dir(str(tmp_path / "sft"), init_from=str(tmp_path / "lm"), stage="sft")  # a run of the same stage again
    make_out_dir(str(tmp_path / "sft"), init_from="resume", stage="sft")


# ---- metrics

def test_a_resume_keeps_the_records_up_to_its_step_and_drops_a_line_a_kill_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = "".join(json.dumps({"iter": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(6))
    path.write_text(records + '{"iter": 6, "lo')  # killed while appending the record of step 6
    assert [r["iter"] for r in read_jsonl_records(path)] == list(range(6))
    Metrics(str(tmp_path), resume_iter=3)
    assert [r["iter"] for r in read_jsonl_records(path)] == [0, 1, 2, 3]
    assert path.read_text().endswith("\n") and os.listdir(tmp_path) == ["metrics.jsonl"]
    path.write_text('{"iter": 0}\nnot json\n{"iter": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl_records(path)


# ---- readers

@pytest.mark.parametrize("content, message", [
    (b'{"tokenizer": "byte", "n_vocab": 2', r"meta.json is not readable JSON .*; make the dataset again: make it with "
                                           r"a prepare script, e.g. `python data/pycode/prepare.py --out_dir="),
    (b'{"tokenizer": "byte"}', r"meta.json lacks n_vocab; make the dataset again"),
    (b'["byte", 257]', r"meta.json lacks tokenizer, n_vocab"),
    (b'{"tokenizer": "caf\xe9"}', r"meta.json is not readable JSON"),
    (b'{"tokenizer": "bytes", "n_vocab": 257}', r"meta.json names an unknown tokenizer 'bytes'"),
])
def test_a_corrupt_or_incomplete_meta_json_is_a_one_line_error(tmp_path, content, message):
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_meta(str(tmp_path))


def test_jsonl_reader_names_a_line_that_is_not_utf8_and_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "x"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        read_jsonl(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "x"}\n')
    assert read_jsonl(str(path)) == [(1, {"prompt": "x"})]
    with pytest.raises(UserError, match=r"is not a file"):
        read_jsonl(str(tmp_path))


# ---- the guard against divergence

def test_the_guard_names_the_first_non_finite_step_and_lets_float16_skip_an_overflowing_step():
    guard = NonFiniteGuard(learning_rate=0.5)
    guard.record(1, torch.tensor(2.0), torch.tensor(1.0))
    guard.check()
    guard.record(2, torch.tensor(2.0), torch.tensor(float("inf")))
    guard.record(3, torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(UserError, match=r"nan or inf at step 2; learning_rate=0.5 is most likely too high"):
        guard.check()
    fp16 = NonFiniteGuard(0.5, scaler=torch.amp.GradScaler("cpu", enabled=True))
    fp16.record(1, torch.tensor(2.0), torch.tensor(float("inf")))  # the scaler skips this step: not an error
    fp16.check()
    fp16.record(2, torch.tensor(float("inf")), torch.tensor(1.0))
    with pytest.raises(UserError, match=r"step 2; .* or use dtype='bfloat16' or 'float32'"):
        fp16.check()


# ---- token data and GPT-2 weights

def test_token_files_that_are_damaged_or_of_another_tokenizer_are_one_line_errors(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    TokenBatches(data, "train", 16, 4, "cpu", tokenizer="byte")
    with pytest.raises(UserError, match=r"was made with the tokenizer 'byte', not the model's 'gpt2'"):
        TokenBatches(data, "train", 16, 4, "cpu", tokenizer="gpt2")
    with open(os.path.join(data, "val.bin"), "ab") as f:
        f.write(b"\x07")
    with pytest.raises(UserError, match=r"val.bin has an odd number of bytes"):
        TokenBatches(data, "val", 16, 4, "cpu")
    ids = np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint16)
    ids[5] = 50000  # a GPT-2 token in a byte-level dataset
    ids.tofile(os.path.join(data, "train.bin"))
    with pytest.raises(UserError, match=r"train.bin holds token id 50000, but meta.json's tokenizer has 257 tokens"):
        TokenBatches(data, "train", 16, 4, "cpu")


def test_gpt2_weights_from_a_directory_that_is_not_gpt2s_are_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"activation_function": "relu"}')
    with pytest.raises(UserError, match=r"cannot load GPT-2 weights from .*: .*activation 'relu' is not GPT-2's"):
        gpt2_weights(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# several processes, and the peak MFU is taken against

def test_in_one_process_the_collective_helpers_hand_their_input_back():
    import common
    items = [3, 1, 4, 1, 5]
    assert common.shard(items) is items and common.unshard(items) == items
    assert common.gather_objects({"a": 1}) == [{"a": 1}]
    x = torch.tensor([1.0, 2.0])
    assert common.all_reduce_sum(x) is x and common.all_reduce_mean(2.5) == 2.5
    record = {"iter": 3, "loss": 0.5}
    assert common.mean_over_processes(record) is record


def test_micro_batches_of_one_process_split_a_batch_as_that_many_processes_would():
    from common import micro_batch
    items = list(range(12))
    parts = [micro_batch(items, m, 3) for m in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]  # = items[rank::3] of 3 processes
    assert micro_batch(items, 0, 1) == items


def test_mfu_is_taken_against_the_configured_peak_else_a_known_gpus_datasheet_else_a_measurement(monkeypatch):
    import common
    cpu = common.Runtime("cpu", "cpu", "float32", None)
    assert common.mfu_peak(2.0, cpu) == (2e12, "set by peak_tflops")
    assert common.datasheet_peak_flops("cpu", "bfloat16") is None
    assert "measured here" in common.mfu_peak(0.0, cpu)[1]
    for name, tflops in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                         ("NVIDIA H200", 989.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak = common.datasheet_peak_flops("cuda", "bfloat16")
        assert peak == (tflops * 1e12 if tflops else None), name
    assert common.datasheet_peak_flops("cuda", "float32") is None  # the table is of bf16/fp16 tensor-core peaks


def test_batches_by_length_puts_rows_of_similar_length_together_and_covers_every_index():
    from common import batches_by_length
    assert batches_by_length([5, 1, 3, 2], 2) == [[1, 3], [2, 0]]  # lengths 1, 2 | 3, 5
    assert batches_by_length([(2, 9), (1, 4), (2, 1)], 2) == [[1, 2], [0]]  # (prompt, response): prompt first
    assert batches_by_length([], 4) == []


def test_evaluation_due_every_interval_and_at_step_0_only_with_eval_at_start():
    due = lambda at_start: [s for s in range(0, 7) if evaluation_due(s, 3, at_start)]
    assert due(True) == [0, 3, 6] and due(False) == [3, 6]
