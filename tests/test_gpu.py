"""The GPU check: every stage at a tiny size on one CUDA GPU, with bf16 autocast (fp16 and a loss scaler on GPUs without
bf16) and torch.compile where the stage has it, each stopped halfway and resumed, against a run without a stop.
Skipped where there is no CUDA GPU. `bash tests/gpu_check.sh` runs it, then bench.py (speed and MFU) on GPT-2's size.

On a GPU, results are bit-exact only where the kernels are deterministic (attention's backward may sum in any order):
each stage prints the largest difference between the resumed and the uninterrupted run, and it must stay within
bf16's rounding. GPU_CHECK_DEVICE=cpu runs the same on the CPU, slowly: how this file is tested without a GPU."""
import os

import pytest
import torch

import collect_pairs
import train_dpo
import train_grpo
import train_lm
import train_ppo
import train_rm
import train_sft
from common import read_jsonl_records
from conftest import write_jsonl, write_token_dataset
from test_ppo import toy_prompts
from test_rm import easy_pairs
from test_sft import tiny_function

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU here")
# 'auto' is bf16 on a GPU that has it (fp16 + GradScaler otherwise); on the CPU, bf16 named
RUN = [f"--device={DEVICE}", f"--dtype={'auto' if DEVICE == 'cuda' else 'bfloat16'}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    text = "".join(p + r + "\n" for p, r in map(tiny_function, range(16))) * 40
    return {"root": root, "tokens": write_token_dataset(root / "tokens", text=text),
            "sft_train": write_jsonl(root / "sft_train.jsonl", [{"prompt": p, "response": r}
                                                                 for p, r in map(tiny_function, range(32))]),
            "sft_val": write_jsonl(root / "sft_val.jsonl", [{"prompt": p, "response": r}
                                                             for p, r in map(tiny_function, range(100, 108))]),
            "eval": write_jsonl(root / "eval.jsonl", [{"prompt": p, "reference": r}
                                                       for p, r in map(tiny_function, range(200, 204))]),
            "pref_train": write_jsonl(root / "pref_train.jsonl", easy_pairs(64, 0)),
            "pref_val": write_jsonl(root / "pref_val.jsonl", easy_pairs(16, 1)),
            "prompts": toy_prompts(root / "prompts.jsonl", 16)}


def resumed_equals_straight(module, args, out, iters, key):
    """module.main to `iters` steps in one go, and to iters / 2 then resumed to iters; the `key` records of both runs
    must agree to bf16's rounding. Prints the largest difference (0.0: bit-exact)."""
    module.main(args + [f"--out_dir={out}_straight", f"--max_iters={iters}"])
    module.main(args + [f"--out_dir={out}_resumed", f"--max_iters={iters // 2}"])
    module.main(args + [f"--out_dir={out}_resumed", f"--max_iters={iters}", "--init_from=resume"])
    records = lambda d: {r["iter"]: r[key] for r in read_jsonl_records(os.path.join(d, "metrics.jsonl")) if key in r}
    straight, resumed = records(f"{out}_straight"), records(f"{out}_resumed")
    assert sorted(straight) == sorted(resumed) and len(straight) >= iters // 2, (straight, resumed)
    worst = max(abs(straight[i] - resumed[i]) for i in straight)
    print(f"gpu_check: {module.__name__} on {DEVICE}: resumed halfway, largest difference in {key} {worst:.3g} "
          f"over {len(straight)} records")
    for i in straight:
        assert resumed[i] == pytest.approx(straight[i], rel=2e-2, abs=2e-3), (key, i)
    return f"{out}_straight"


@pytest.fixture(scope="module")
def sft(data):
    """The pretrained and fine-tuned tiny models the later stages start from (checked in the first two tests)."""
    root = data["root"]
    lm = resumed_equals_straight(train_lm, RUN + [
        "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=96", "--batch_size=8", "--eval_iters=2",
        "--log_interval=1", "--sample_at_end=False", "--warmup_iters=2", f"--dataset={data['tokens']}",
        "--compile=True", "--eval_interval=3", "--learning_rate=3e-3"], root / "lm", 6, "train_loss")
    return resumed_equals_straight(train_sft, RUN + [
        f"--init_from={lm}", f"--train_file={data['sft_train']}", f"--val_file={data['sft_val']}",
        f"--eval_prompts={data['eval']}", "--batch_size=8", "--log_interval=1", "--max_new_tokens=16",
        "--eval_interval=2", "--eval_samples=2", "--warmup_iters=1", "--compile=True"], root / "sft", 4, "train_loss")


def test_pretraining_and_sft_resume_on_the_gpu(sft):
    assert os.path.exists(os.path.join(sft, "ckpt.pt"))


def test_reward_model_and_dpo_resume_on_the_gpu(data, sft):
    pairs = [f"--init_from={sft}", f"--train_file={data['pref_train']}", f"--val_file={data['pref_val']}",
             "--batch_size=8", "--log_interval=1", "--eval_interval=2", "--warmup_iters=1", "--compile=True"]
    resumed_equals_straight(train_rm, RUN + pairs, data["root"] / "rm", 4, "train_loss")
    resumed_equals_straight(train_dpo, RUN + pairs + [f"--eval_prompts={data['eval']}", "--max_new_tokens=16",
                                                      "--eval_samples=2"], data["root"] / "dpo", 4, "train_loss")


def test_collect_pairs_ppo_and_grpo_on_the_gpu(data, sft):
    root = data["root"]
    meta = collect_pairs.main(RUN + [f"--init_from={sft}", f"--train_file={data['sft_train']}",
                                     f"--val_file={data['sft_val']}", f"--out_dir={root / 'pairs'}",
                                     "--max_new_tokens=16"])
    assert meta["train"]["samples"] == 32 * 4
    rm = str(root / "rm_straight")  # made by the test before; else made here
    if not os.path.exists(os.path.join(rm, "ckpt.pt")):
        train_rm.main(RUN + [f"--init_from={sft}", f"--train_file={data['pref_train']}", f"--out_dir={rm}",
                             f"--val_file={data['pref_val']}", "--batch_size=8", "--max_iters=2"])
    rl = RUN + [f"--init_from={sft}", f"--prompts_file={data['prompts']}", f"--eval_prompts={data['prompts']}",
                "--eval_interval=2", "--eval_max_prompts=4", "--eval_samples=2", "--max_new_tokens=12"]
    resumed_equals_straight(train_ppo, rl + [f"--reward_model={rm}", "--batch_size=8", "--minibatch_size=4",
                                             "--adaptive_kl=True"], root / "ppo", 4, "score")
    resumed_equals_straight(train_grpo, rl + ["--reward=task", "--batch_size=4", "--group_size=4", "--kl=k3",
                                              "--update_epochs=2", "--minibatch_size=8"], root / "grpo", 4, "score")
