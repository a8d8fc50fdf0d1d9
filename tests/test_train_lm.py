"""train_lm.py end to end on a tiny dataset: exact resume, atomic checkpoints, clear errors, precision and
compile paths, and 2-process DDP on the CPU (gloo)."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import train_lm
from common import UserError, load_checkpoint, read_jsonl_records, save_checkpoint
from conftest import ROOT, write_token_dataset

# float32 named, not left to 'auto': subprocesses pick bfloat16 on CPUs that compute it natively
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--device=cpu", "--sample_at_end=False", "--peak_tflops=1.0", "--warmup_iters=2",
        "--dtype=float32"]


def run(token_dataset, out_dir, *extra):
    return train_lm.main(TINY + [f"--dataset={token_dataset}", f"--out_dir={out_dir}", *extra])


def train_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in read_jsonl_records(os.path.join(out_dir, "metrics.jsonl"))
            if "train_loss" in r}


def test_training_lowers_the_loss_and_writes_checkpoint_metrics_and_plot(token_dataset, tmp_path):
    out = tmp_path / "out"
    result = run(token_dataset, out, "--max_iters=40", "--eval_interval=20", "--learning_rate=3e-3")
    for name in ("ckpt.pt", "metrics.jsonl", "loss.png"):
        assert (out / name).exists()
    losses = train_losses(out)
    assert losses[40] < losses[1] - 1.0
    ckpt = load_checkpoint(str(out))
    assert ckpt["iter_num"] == 40 and ckpt["tokenizer"] == "byte"
    assert ckpt["config"]["max_iters"] == 40 and ckpt["val_loss"] == pytest.approx(result["val"])
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(token_dataset, tmp_path):
    common = ["--lr_decay_iters=12", "--eval_interval=3", "--dropout=0.1"]  # dropout: the RNG state matters
    run(token_dataset, tmp_path / "straight", "--max_iters=12", *common)
    run(token_dataset, tmp_path / "split", "--max_iters=6", *common)
    run(token_dataset, tmp_path / "split", "--max_iters=12", "--init_from=resume", *common)
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert [split[i] for i in range(1, 13)] == [straight[i] for i in range(1, 13)]
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_another_model_shape_is_an_error(token_dataset, tmp_path):
    run(token_dataset, tmp_path / "o", "--max_iters=2", "--eval_interval=2")
    with pytest.raises(UserError, match="has n_embd=32 but the config asks for n_embd=48"):
        run(token_dataset, tmp_path / "o", "--max_iters=4", "--init_from=resume", "--n_embd=48")


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model_args": {}, "model": {"w": torch.ones(3)}, "tokenizer": "byte"})

    def crash_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # killed while writing
    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, intact


def test_corrupt_truncated_or_foreign_checkpoints_are_one_line_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model_args": {}, "model": {"w": torch.ones(100)}, "tokenizer": "byte"})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(str(path))
    with pytest.raises(UserError, match="no checkpoint at .*nowhere.*run train_lm"):
        load_checkpoint(str(tmp_path / "nowhere"), hint="run train_lm.py")


def test_missing_dataset_names_the_prepare_script(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(UserError, match=r"meta.json not found; make it with a prepare script, e.g. "
                                        r"`python data/pycode/prepare.py --out_dir=.*nodata`"):
        run(str(empty), tmp_path / "o", "--max_iters=1")
    (empty / "prepare.py").write_text("")  # a dataset folder with its own script, as data/pycode
    with pytest.raises(UserError, match=r"meta.json not found; run `python .*nodata/prepare.py` first"):
        run(str(empty), tmp_path / "o", "--max_iters=1")
    (empty / "byte").mkdir()  # the other tokenizer's folder inside it, as data/pycode/byte
    with pytest.raises(UserError, match=r"run `python .*nodata/prepare.py --tokenizer=byte` first"):
        run(str(empty / "byte"), tmp_path / "o", "--max_iters=1")


def test_a_checkpoint_of_another_tokenizer_is_rejected(tmp_path):
    byte_data = write_token_dataset(tmp_path / "bytes")
    gpt2_data = write_token_dataset(tmp_path / "bpe", tokenizer="gpt2")
    run(byte_data, tmp_path / "o", "--max_iters=1", "--eval_interval=1")
    with pytest.raises(UserError, match="uses the 'byte' tokenizer but .* was prepared with 'gpt2'"):
        train_lm.main(TINY + [f"--dataset={gpt2_data}", f"--out_dir={tmp_path / 'o2'}", "--max_iters=1",
                              f"--init_from={tmp_path / 'o'}"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_path_runs_on_cpu(token_dataset, tmp_path, dtype):
    result = run(token_dataset, tmp_path / dtype, "--max_iters=3", "--eval_interval=3", f"--dtype={dtype}")
    assert torch.isfinite(torch.tensor(result["val"]))
    ckpt = load_checkpoint(str(tmp_path / dtype))
    assert ckpt["model"]["lm_head.weight"].dtype == torch.float32  # master weights stay float32
    assert ("scale" in ckpt["scaler"]) == (dtype == "float16")  # only fp16 needs a loss scaler


def test_compiled_training_saves_plain_parameter_names(token_dataset, tmp_path):
    run(token_dataset, tmp_path / "c", "--max_iters=2", "--eval_interval=2", "--compile=True")
    ckpt = load_checkpoint(str(tmp_path / "c"))
    assert "transformer.wte.weight" in ckpt["model"]
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_two_process_ddp_on_cpu_matches_one_process_accumulating_the_same_batches(token_dataset, tmp_path):
    args = TINY + [f"--dataset={token_dataset}", "--max_iters=4", "--eval_interval=4",
                   "--gradient_accumulation_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train_lm.py"), *args, f"--out_dir={tmp_path / 'ddp'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    single = train_lm.main(args + [f"--out_dir={tmp_path / 'one'}"])
    ddp = load_checkpoint(str(tmp_path / "ddp"))
    assert ddp["val_loss"] == pytest.approx(single["val"], abs=1e-5)
    one = load_checkpoint(str(tmp_path / "one"))
    for k in one["model"]:
        assert torch.allclose(ddp["model"][k], one["model"][k], atol=1e-5), k


MEMORY_PROBE = """
import resource, statistics
import torch
from common import reuse_freed_memory
reuse_freed_memory()
def faults(nbytes):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(nbytes // 4).fill_(1.0)  # written once, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(96 << 20)  # the first time, the memory has to come from the kernel
print(statistics.median(faults(96 << 20) for _ in range(5)), statistics.median(faults(8 << 20) for _ in range(5)))
x = torch.ones(96 << 18)
print(sum(int(l.split()[1]) for l in open('/proc/self/smaps') if l.startswith('AnonHugePages')))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and transparent huge pages")
def test_freed_memory_is_reused_and_large_tensors_get_huge_pages():
    # a subprocess: malloc settings and PyTorch's huge-page switch are per process and fixed at the first use
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    refaults_large, refaults_small, huge_kb = map(float, out)
    # a 96 MB block freed and asked for again comes back without being faulted in page by page (24,576 pages,
    # ~30 ms of zero-filling each time)
    assert refaults_large < 1000 and refaults_small < 1000
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    if "[never]" not in thp:
        assert huge_kb >= 64 << 10  # most of the 96 MB tensor sits on 2 MB pages


# --------------------------------------------------------------------------------------------------------------
# nothing lost: bad settings, divergence, other stages' checkpoints, kill -9

def test_resuming_another_stages_checkpoint_is_refused_and_leaves_it_alone(token_dataset, tmp_path):
    run(token_dataset, tmp_path / "o", "--max_iters=1", "--eval_interval=1")
    ckpt = load_checkpoint(str(tmp_path / "o"))
    save_checkpoint(str(tmp_path / "sft" / "ckpt.pt"), dict(ckpt, stage="sft"))
    before = (tmp_path / "sft" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match=r"ckpt.pt is a 'sft' checkpoint, not a pretraining run's; use another out_dir"):
        run(token_dataset, tmp_path / "sft", "--max_iters=2", "--init_from=resume")
    assert (tmp_path / "sft" / "ckpt.pt").read_bytes() == before


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(token_dataset, tmp_path):
    run(token_dataset, tmp_path / "o", "--max_iters=2", "--eval_interval=2")
    good = (tmp_path / "o" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match=r"nan or inf at step 4; learning_rate=1e\+30 is most likely too high"):
        run(token_dataset, tmp_path / "o", "--max_iters=8", "--eval_interval=4", "--init_from=resume",
            "--learning_rate=1e30")
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == good
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path / "o").values())


def test_a_model_width_that_the_heads_do_not_divide_is_a_one_line_error(token_dataset, tmp_path):
    with pytest.raises(UserError, match="n_embd=32 must be a multiple of n_head=3"):
        run(token_dataset, tmp_path / "o", "--n_head=3")


def test_an_out_dir_that_is_a_file_is_a_one_line_error_before_any_work(token_dataset, tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="out_dir '.*taken' is a file, not a directory; choose another out_dir"):
        run(token_dataset, tmp_path / "taken")


# A run that kills itself with SIGKILL halfway through the nth write of a file whose name contains a pattern (the
# nth time such a file is opened for writing: a checkpoint's temp file, or the metrics file rewritten on resume).
KILL_MIDWAY = """
import builtins, os, signal, sys
import torch
pattern, nth, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)  # the threads of the run it is compared with: the same float sums
opened = 0

class KilledMidway:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

def watch(f, name, mode):
    global opened
    if pattern in os.path.basename(str(name)) and "w" in mode:
        opened += 1
        if opened == nth:
            return KilledMidway(f)
    return f

real_open, real_fdopen = builtins.open, os.fdopen
builtins.open = lambda file, mode="r", *a, **k: watch(real_open(file, mode, *a, **k), file, mode)
os.fdopen = lambda fd, mode="r", *a, **k: watch(real_fdopen(fd, mode, *a, **k), os.readlink(f"/proc/self/fd/{fd}"),
                                                mode)
import train_lm
train_lm.main(sys.argv[4:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_kill_9_during_a_checkpoint_write_and_the_metrics_rewrite_then_two_resumes_equal_an_uninterrupted_run(
        token_dataset, tmp_path):
    common = TINY + [f"--dataset={token_dataset}", "--eval_interval=3", "--lr_decay_iters=12", "--dropout=0.1"]
    train_lm.main(common + [f"--out_dir={tmp_path / 'straight'}", "--max_iters=12"])
    out = tmp_path / "killed"
    args = common + [f"--out_dir={out}", "--max_iters=12"]

    def killed_run(pattern, nth, *extra):
        proc = subprocess.run([sys.executable, "-c", KILL_MIDWAY, pattern, str(nth), str(torch.get_num_threads()),
                               *args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        return sorted(os.listdir(out))

    # killed writing its third checkpoint (step 6): the one of step 3 is intact, the half-written temp file stays
    files = killed_run("ckpt.pt", 3)
    assert load_checkpoint(str(out))["iter_num"] == 3 and any(f.startswith("ckpt.pt.") for f in files)
    metrics = (out / "metrics.jsonl").read_bytes()
    # the resumed run is killed rewriting metrics.jsonl: every record is still there
    files = killed_run("metrics.jsonl", 1, "--init_from=resume")
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert not any(f.startswith("ckpt.pt.") for f in files)  # the first temp file was cleaned up at the start
    # resumed twice, the second time from the last checkpoint of a finished run (step 8, between evaluations)
    train_lm.main(args[:-1] + ["--max_iters=8", "--init_from=resume"])
    train_lm.main(args + ["--init_from=resume"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    straight, resumed = (read_jsonl_records(d / "metrics.jsonl") for d in (tmp_path / "straight", out))
    assert train_losses(out) == train_losses(tmp_path / "straight") and sorted(train_losses(out)) == list(range(1, 13))
    evals = lambda records: {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    assert evals(straight) == {i: v for i, v in evals(resumed).items() if i % 3 == 0}
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
