"""Every stage under torchrun: 2 CPU processes (gloo) against one process on the same global batch.

SFT, the reward model and DPO give the losses of one process, step by step; PPO and GRPO run and resume exactly under
torchrun; the statistics of the whole batch (advantage whitening, REINFORCE's baseline, group advantages, the KL
the controller sees, the task's judge, completions of prompts shared out) equal one process's on the same rollouts.
All of it runs in one torchrun call (tests/ddp_stages.py), so that the processes start once."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_dpo
import train_rm
import train_sft
from common import load_checkpoint, read_jsonl_records, save_checkpoint
from conftest import ROOT, write_jsonl
from ddp_stages import batch, TEMPLATE_PROMPTS
from model import GPT, GPTConfig
from test_ppo import toy_prompts
from test_rm import easy_pairs
from test_sft import tiny_function
from tokenizer import get_tokenizer
from train_grpo import grpo_advantages, reinforce_advantages, reinforce_pp_advantages, rloo_advantages
from train_ppo import masked_whiten, task_scorer

CPU = ["--device=cpu", "--dtype=float32"]


def stage_args(files):
    """Each stage's arguments, the same for one process and for two: batch sizes are global."""
    init = [*CPU, f"--init_from={files['init']}", "--log_interval=1", "--warmup_iters=1"]
    pairs = [f"--train_file={files['pref_train']}", f"--val_file={files['pref_val']}"]
    evaluation = [f"--eval_prompts={files['eval']}", "--eval_max_prompts=2", "--max_new_tokens=8"]
    return {
        "train_sft": init + [f"--train_file={files['sft_train']}", f"--val_file={files['sft_val']}", *evaluation,
                             "--eval_samples=0", "--batch_size=8", "--max_iters=4", "--eval_interval=4",
                             "--learning_rate=3e-3"],
        "train_rm": init + pairs + ["--batch_size=8", "--max_iters=4", "--eval_interval=4", "--learning_rate=1e-3"],
        "train_dpo": init + pairs + [*evaluation, "--eval_samples=0", "--batch_size=8", "--max_iters=4",
                                     "--eval_interval=4", "--learning_rate=1e-3"],
    }


def rl_args(files, rm_dir):
    """PPO (on the task's judge, which judges every process's responses together, with the adaptive KL controller)
    and GRPO (on the reward model, with a k3 KL), with sampled evaluation completions and pass@k: every global
    statistic of the RL stages is used."""
    common = [*CPU, f"--init_from={files['init']}", f"--prompts_file={files['prompts']}",
              f"--eval_prompts={files['prompts']}", "--eval_interval=2", "--eval_max_prompts=2", "--eval_samples=2",
              "--max_new_tokens=6"]
    return {"train_ppo": common + ["--reward=task", "--batch_size=4", "--minibatch_size=2", "--adaptive_kl=True",
                                   "--target_kl=0.01"],
            "train_grpo": common + ["--reward=model", f"--reward_model={rm_dir}", "--batch_size=2", "--group_size=2",
                                    "--kl=k3", "--update_epochs=2", "--minibatch_size=2"]}


def write_plan(root):
    """A tiny byte-level model and data for every stage, and the plan of the torchrun call: SFT, RM, DPO, then PPO
    and GRPO straight to 4 iterations and to 2 then resumed to 4, then the global statistics."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=257))
    save_checkpoint(str(root / "init" / "ckpt.pt"), {"stage": "lm", "model_args": vars(model.config),
                                                     "model": model.state_dict(), "tokenizer": "byte"})
    files = {
        "init": str(root / "init"),
        # examples of different lengths, so that the two processes' shares hold different numbers of tokens
        "sft_train": write_jsonl(root / "sft_train.jsonl", [{"prompt": p, "response": r * (1 + k % 3)} for k, (p, r)
                                                             in enumerate(map(tiny_function, range(24)))]),
        "sft_val": write_jsonl(root / "sft_val.jsonl", [{"prompt": p, "response": r}
                                                         for p, r in map(tiny_function, range(100, 107))]),
        "eval": write_jsonl(root / "eval.jsonl", [{"prompt": p, "reference": r}
                                                   for p, r in map(tiny_function, range(200, 203))]),
        "pref_train": write_jsonl(root / "pref_train.jsonl", easy_pairs(32, 0)),
        "pref_val": write_jsonl(root / "pref_val.jsonl", easy_pairs(9, 1)),
        "prompts": toy_prompts(root / "prompts.jsonl", 8),
    }
    ddp = root / "ddp"
    runs = [[stage, args + [f"--out_dir={ddp / stage}"]] for stage, args in stage_args(files).items()]
    runs.append(["collect_pairs", [*CPU, f"--init_from={files['init']}", f"--train_file={files['sft_train']}",
                                   f"--val_file={files['sft_val']}", f"--out_dir={ddp / 'pairs'}", "--max_new_tokens=8",
                                   "--samples_per_prompt=2"]])
    for stage, args in rl_args(files, ddp / "train_rm").items():
        runs += [[stage, args + [f"--out_dir={ddp / stage}_straight", "--max_iters=4"]],
                 [stage, args + [f"--out_dir={ddp / stage}_resumed", "--max_iters=2"]],
                 [stage, args + [f"--out_dir={ddp / stage}_resumed", "--max_iters=4", "--init_from=resume"]]]
    plan = root / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "statistics": str(root / "statistics.pt")}, default=str))
    return files, plan


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The torchrun call of write_plan's plan, 2 processes, each with one thread."""
    root = tmp_path_factory.mktemp("ddp")
    files, plan = write_plan(root)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "tests", "ddp_stages.py"), str(plan)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, files, proc.stdout


def metrics(out_dir, key):
    return {r["iter"]: r[key] for r in read_jsonl_records(os.path.join(out_dir, "metrics.jsonl")) if key in r}


def assert_same_metrics(a, b, keys):
    for key in keys:
        one, two = metrics(a, key), metrics(b, key)
        assert sorted(one) == sorted(two) and one, key
        for it in one:
            assert two[it] == pytest.approx(one[it], rel=1e-4, abs=1e-5), (key, it)


def assert_same_weights(a, b, atol=1e-5):
    a, b = load_checkpoint(str(a))["model"], load_checkpoint(str(b))["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5), (k, (a[k] - b[k]).abs().max())


# --------------------------------------------------------------------------------------------------------------
# the losses of one process, with the batch shared out

@pytest.mark.parametrize("stage, keys", [
    ("train_sft", ["train_loss", "val_loss"]),
    ("train_dpo", ["train_loss", "train_accuracy", "train_margin", "val_loss", "val_accuracy"]),
])
def test_two_processes_give_the_losses_and_weights_of_one_process_on_the_same_global_batch(two_processes, stage, keys,
                                                                                           tmp_path):
    root, files, printed = two_processes
    module = {"train_sft": train_sft, "train_dpo": train_dpo}[stage]
    module.main(stage_args(files)[stage] + [f"--out_dir={tmp_path / stage}"])
    assert "2 process(es)" in printed
    assert_same_metrics(tmp_path / stage, root / "ddp" / stage, keys)
    assert_same_weights(tmp_path / stage, root / "ddp" / stage)


def test_two_reward_model_processes_give_the_weights_of_one_accumulating_their_two_micro_batches_to_the_last_bit(
        two_processes, tmp_path):
    """The pairwise loss sees differences of rewards only: the parameters that add a constant to every reward (the
    scalar head's bias, the final LayerNorm's bias) get gradients that are 0 up to rounding, and Adam, which divides
    a gradient by its own size, turns rounding into steps of full size; nearly cancelling gradients elsewhere do the
    same on a smaller scale. So the reward model is compared where the arithmetic is the same: one process, one
    thread like each of the two, accumulating the micro-batches the two processes take (micro_batch) -- every weight,
    those biases included, equal to the last bit."""
    root, files, _ = two_processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_rm.main(stage_args(files)["train_rm"] + [f"--out_dir={tmp_path}", "--gradient_accumulation_steps=2"])
    finally:
        torch.set_num_threads(threads)
    assert_same_metrics(tmp_path, root / "ddp" / "train_rm",
                        ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_margin"])
    assert_same_weights(tmp_path, root / "ddp" / "train_rm", atol=0)


def test_collect_pairs_samples_every_prompt_once_across_the_processes_and_one_writes(two_processes):
    root, _, _ = two_processes
    meta = json.load(open(root / "ddp" / "pairs" / "meta.json"))
    assert meta["train"]["samples"] == 24 * 2 and meta["val"]["samples"] == 7 * 2
    assert sum(meta["train"]["grades"].values()) == 48  # every sample graded once, all of them together
    pairs = read_jsonl_records(root / "ddp" / "pairs" / "pref_train.jsonl")
    assert len(pairs) == meta["train"]["pairs"]


# --------------------------------------------------------------------------------------------------------------
# PPO and GRPO: they run, and resume exactly, under torchrun

@pytest.mark.parametrize("stage, key", [("train_ppo", "score"), ("train_grpo", "score")])
def test_rl_stages_run_and_resume_exactly_under_torchrun(two_processes, stage, key):
    root, _, _ = two_processes
    straight, resumed = root / "ddp" / f"{stage}_straight", root / "ddp" / f"{stage}_resumed"
    rows = lambda d: [r for r in read_jsonl_records(d / "metrics.jsonl") if key in r]
    a, b = rows(straight), rows(resumed)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.endswith("_s"):  # timings
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (k, ra["iter"])
    assert_same_weights(straight, resumed, atol=1e-6)
    evals = metrics(straight, "eval_kl")
    assert sorted(evals) == [0, 2, 4]  # sampled completions of the prompts shared out, and the KL measured on them


# --------------------------------------------------------------------------------------------------------------
# the statistics of the whole batch

def test_global_statistics_equal_one_process_on_the_same_rollout(two_processes):
    root, _, _ = two_processes
    two = torch.load(root / "statistics.pt")
    values, mask, scores = batch()
    close = lambda got, want: torch.allclose(torch.tensor(got), want, atol=1e-6)
    assert close(two["whiten"], masked_whiten(values, mask))
    assert close(two["reinforce"], reinforce_advantages(values, mask))
    assert close(two["reinforce_pp"], reinforce_pp_advantages(values, mask))
    assert close(two["grpo"], grpo_advantages(scores, 2).view(-1, 2))
    assert close(two["rloo"], rloo_advantages(scores, 2).view(-1, 2))
    assert two["kl_per_response"] == pytest.approx((values * mask).sum(1).mean().item(), abs=1e-6)
    # a body given to the 4 prompts is a template (0), though each process alone saw it for 2 prompts only
    tok = get_tokenizer("byte")
    responses = torch.tensor([list(b"    return x\n") + [tok.eot_token]] * 4)
    one = task_scorer(tok, [], window=0)(TEMPLATE_PROMPTS, responses, torch.ones_like(responses)).tolist()
    assert two["task_reward"] == one == [0.0] * 4
    # completions come back in the order of the prompts, as one process completes them
    from common import complete
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=257)).eval()
    assert two["greedy"] == complete(model, tok, [f"def g{i}(" for i in range(5)], 6, batch_size=1)[0]
