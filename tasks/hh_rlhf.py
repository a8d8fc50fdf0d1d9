"""
The HH-RLHF task: answer the last human turn of a dialogue helpfully and harmlessly (Anthropic, Bai et al. 2022).

A prompt is a dialogue ending in "\\n\\nAssistant:"; data/hh_rlhf/prepare.py makes them from Anthropic's preference
pairs, whose chosen responses are also the SFT data. There is no program that can tell a good answer, so the measure
is the one the RLHF papers use: a reward model trained on the pairs (train_rm.py) compares the policy's response to
the SFT model's for the same held-out dialogue, and the win rate is the share of dialogues where the policy's scores
higher.

    read_eval_set(path, ...)     held-out dialogues (from the test split)
    evaluate_policy(...)         win rate over the SFT model by the reward model, their mean scores, KL, length
There is no verifiable reward (reward='model'), and no labeler for collect_pairs: the pairs are people's.
"""
import contextlib

import torch

from common import complete
from tasks.pycode import read_eval_set as _read_eval_set, sequence_logprobs


read_eval_set = _read_eval_set  # the held-out prompts {"prompt"} of a JSONL file, read as pycode's are


@torch.no_grad()
def evaluate_policy(model, tok, eval_set, max_new_tokens, device="cpu", autocast=None, samples=8, ref_model=None,
                    scorer=None, seed=0, batch_size=64):
    """Greedy responses of the policy, and of the SFT model (ref_model) to the same dialogues, both scored by the
    reward model (scorer: rows -> scores): win_rate, the share where the policy's response scores higher (a tie
    counts half; 0.5 when the policy is the SFT model), rm_score and rm_score_sft, the mean scores. With `samples`
    sampled responses per dialogue and a ref_model, the KL to it. Without a reward model or a reference, what can
    be measured without them. Returns (measures, the policy's greedy responses)."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    texts, rows = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size, device=device,
                           autocast=autocast)
    ended = [r[-1:] == [tok.eot_token] for _, r in rows]
    result = {"mean_length": sum(len(r) for _, r in rows) / len(rows), "no_eot_share": 1 - sum(ended) / len(ended),
              "n_prompts": len(rows)}
    if scorer is not None:
        scores = scorer(rows).float()
        result["rm_score"] = scores.mean().item()
        if ref_model is not None:
            _, ref_rows = complete(ref_model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size,
                                   device=device, autocast=autocast)
            ref_scores = scorer(ref_rows).float()
            result["rm_score_sft"] = ref_scores.mean().item()
            result["win_rate"] = ((scores > ref_scores).float() + 0.5 * (scores == ref_scores).float()).mean().item()
    if ref_model is model and samples > 0:  # the policy before any update is its own reference: KL 0
        result["kl"] = 0.0
    elif ref_model is not None and samples > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
        _, sampled, logprobs = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size,
                                        device=device, autocast=autocast, greedy=False, generator=generator,
                                        samples=samples, with_logprobs=True)
        log_ref = sequence_logprobs(ref_model, sampled, device, autocast, samples=samples).cpu()
        kl = torch.tensor(logprobs) - log_ref  # log pi: sampling's
        result["kl"] = kl.mean().item()
    model.train(was_training)
    return result, texts


MEASURES = [("win rate over SFT (reward model)", "win_rate"), ("RM score of SFT's responses", "rm_score_sft"),
            ("mean response tokens", "mean_length"), ("no end-of-text", "no_eot_share")]
CURVES = [("win rate over SFT (reward model)", "win_rate")]


def describe(m):
    """One line of the measures."""
    if "win_rate" in m:
        line = f"win rate over SFT {m['win_rate']:.3f} (RM score {m['rm_score']:+.3f} vs {m['rm_score_sft']:+.3f})"
    elif "rm_score" in m:
        line = f"RM score {m['rm_score']:+.3f} (no SFT model to compare with)"
    else:
        line = "no reward model to judge responses with (set reward_model): the loss measures this stage"
    line += f"; {m['n_prompts']} dialogues, length {m['mean_length']:.1f}, no end-of-text {m['no_eot_share']:.2f}"
    return line + (f", KL {m['kl']:.3f} nats" if "kl" in m else "")
