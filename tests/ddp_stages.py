"""Run by tests/test_ddp.py under torchrun (2 CPU processes, gloo): several stages one after the other in the same
processes, then the statistics that must be those of the whole batch, each process holding a share of it.

    torchrun --standalone --nproc_per_node=2 tests/ddp_stages.py plan.json

plan.json: {"runs": [[module, [--key=value, ...]], ...], "statistics": path}. The first process saves the
statistics it computed to `statistics` (torch.save), for the test to compare with one process's on the whole batch.
"""
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from common import all_reduce_mean, complete, setup_runtime, shard, unshard  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402
from train_grpo import grpo_advantages, reinforce_advantages, reinforce_pp_advantages, rloo_advantages  # noqa: E402
from train_ppo import masked_whiten, task_scorer  # noqa: E402


def batch():
    """The rollout every process builds alike; each then keeps its share of the rows."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 3, 4])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    scores = torch.randint(0, 3, (8,), generator=g).float()  # 4 groups of 2 samples: ties and spreads
    return values, mask, scores


TEMPLATE_PROMPTS = [f"def f{i}(x):\n    \"\"\"Return x.\"\"\"\n" for i in range(4)]


def statistics():
    """Each statistic computed on this process's share of the batch (rows; whole groups of G = 2 for the group
    estimators), its results put back together in batch order."""
    values, mask, scores = batch()
    rows = shard(list(range(8)))
    groups = shard(list(range(4)))
    group_rows = [g * 2 + j for g in groups for j in range(2)]
    out = {
        "whiten": unshard(masked_whiten(values[rows], mask[rows]).tolist()),
        "reinforce": unshard(reinforce_advantages(values[rows], mask[rows]).tolist()),
        "reinforce_pp": unshard(reinforce_pp_advantages(values[rows], mask[rows]).tolist()),
        "grpo": sum(unshard([grpo_advantages(scores[group_rows], 2).view(-1, 2).tolist()]), []),
        "rloo": sum(unshard([rloo_advantages(scores[group_rows], 2).view(-1, 2).tolist()]), []),
        "kl_per_response": all_reduce_mean((values[rows] * mask[rows]).sum(1).mean().item()),
    }
    # the task's judge: one body given to 4 prompts is a template (3 or more); each process alone sees 2 of them
    tok = get_tokenizer("byte")
    responses = torch.tensor([list(b"    return x\n") + [tok.eot_token]] * 4)
    score = task_scorer(tok, [], window=0)
    out["task_reward"] = unshard(score(shard(TEMPLATE_PROMPTS), responses[shard([0, 1, 2, 3])],
                                       torch.ones(2, responses.size(1))).tolist())
    # completions of prompts shared out, put back in the order of the prompts
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=257)).eval()
    prompts = [f"def g{i}(" for i in range(5)]
    out["greedy"] = complete(model, tok, prompts, 6, batch_size=1)[0]
    return out


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    for module, args in plan["runs"]:
        importlib.import_module(module).main(args)
    rt = setup_runtime(type("Cfg", (), {"device": "cpu", "dtype": "float32"})())
    stats = statistics()
    if rt.is_master:
        torch.save(stats, plan["statistics"])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
