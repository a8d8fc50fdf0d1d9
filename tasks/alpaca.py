"""
The Alpaca task: follow an instruction (Taori et al. 2023: 52,002 instructions and answers written by
text-davinci-003), with the prompt in the instruction template (common.INSTRUCTION_TEMPLATE).

There is no judge: nothing here can tell whether an answer follows its instruction, and a reward model of
instruction following would need preference data Alpaca does not have. So a stage on this task is measured by its
held-out loss (SFT: the loss on the responses of held-out examples), and the held-out instructions are only
completed to be read: their length is the one number taken from them.

    read_eval_set(path, ...)     held-out instructions (data/alpaca/prepare.py: prompts_eval.jsonl)
    evaluate_policy(...)         greedy completions and their length, nothing judged
"""
import contextlib

import torch

from common import complete
from tasks.pycode import read_eval_set as _read_eval_set


read_eval_set = _read_eval_set  # the held-out prompts {"prompt"} of a JSONL file, read as pycode's are


@torch.no_grad()
def evaluate_policy(model, tok, eval_set, max_new_tokens, device="cpu", autocast=None, samples=8, ref_model=None,
                    scorer=None, seed=0, batch_size=64):
    """Greedy completions of the held-out instructions and their mean length; with a reward model (scorer), its
    mean score. No judge. Returns (measures, completions)."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    texts, rows = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size, device=device,
                           autocast=autocast)
    ended = [r[-1:] == [tok.eot_token] for _, r in rows]
    result = {"mean_length": sum(len(r) for _, r in rows) / len(rows), "no_eot_share": 1 - sum(ended) / len(ended),
              "n_prompts": len(rows)}
    if scorer is not None:
        result["rm_score"] = scorer(rows).float().mean().item()
    model.train(was_training)
    return result, texts


MEASURES = [("mean response tokens", "mean_length"), ("no end-of-text", "no_eot_share")]
CURVES = []  # nothing judged to plot: the loss curves are the measure


def describe(m):
    """One line: what was measured, and that nothing was judged."""
    return (f"no judge for instruction following: measured by the held-out loss ({m['n_prompts']} held-out "
            f"instructions completed to read, length {m['mean_length']:.1f}, no end-of-text {m['no_eot_share']:.2f})")
