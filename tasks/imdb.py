"""
The IMDB task: continue the opening words of a movie review so that the review comes out positive.

This is the experiment of Ziegler et al. 2019 that trl's gpt2-sentiment notebook made the standard first RLHF run:
GPT-2, fine-tuned on IMDB reviews, is the policy; a sentiment classifier trained on IMDB's labelled reviews is the
reward; PPO teaches the policy to write positive continuations of review prefixes (prompts of 2-8 words) while a KL
penalty keeps it writing reviews. Here the classifier is our own reward model, `train_rm.py --loss=logistic` on
data/imdb's labelled reviews: its score is the log-odds that a text is positive, as trl's reward is the positive
logit of a DistilBERT classifier.

    read_eval_set(path, ...)     held-out review prefixes (from the test split; data/imdb/prepare.py)
    evaluate_policy(...)         the sentiment reward model's mean score of sampled continuations, the share it calls
                                 positive, the KL to the reference and the length
There is no verifiable reward: the reward is the reward model (reward='model'), and no labeler for collect_pairs.
"""
import contextlib

import torch

from common import complete
from tasks.pycode import read_eval_set as _read_eval_set, sequence_logprobs


read_eval_set = _read_eval_set  # the held-out prompts {"prompt"} of a JSONL file, read as pycode's are


@torch.no_grad()
def evaluate_policy(model, tok, eval_set, max_new_tokens, device="cpu", autocast=None, samples=8, ref_model=None,
                    scorer=None, seed=0, batch_size=64):
    """max(samples, 1) continuations of every held-out prefix, sampled at temperature 1 as rollouts are (greedy
    continuations of a review soon repeat themselves; trl reports sampled ones too), each scored by the sentiment
    reward model (scorer: rows -> scores) where there is one: rm_score, the mean score (trl's 'mean reward'), and
    positive, the share it calls positive (score > 0). With a ref_model, the KL to it in nats per continuation.
    Returns (measures, the first continuation of each prefix)."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    n = max(samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, rows, logprobs = complete(model, tok, eval_set.inputs, max_new_tokens, batch_size=batch_size, device=device,
                                     autocast=autocast, greedy=False, temperature=1.0, generator=generator,
                                     samples=n, with_logprobs=True)
    result = {"mean_length": sum(len(r) for _, r in rows) / len(rows), "n_prompts": len(eval_set.inputs),
              "samples": n}
    if scorer is not None:
        scores = scorer(rows).float()
        result["rm_score"] = scores.mean().item()
        result["positive"] = (scores > 0).float().mean().item()
    if ref_model is model:  # the policy before any update is its own reference: KL 0, nothing to estimate
        result["kl"] = 0.0
    elif ref_model is not None:
        log_ref = sequence_logprobs(ref_model, rows, device, autocast, samples=n).cpu()
        kl = torch.tensor(logprobs) - log_ref  # log pi from sampling
        result["kl"] = kl.mean().item()
    model.train(was_training)
    return result, texts[::n]


MEASURES = [("sentiment reward (RM score), sampled", "rm_score"), ("positive (RM score > 0)", "positive"),
            ("mean response tokens", "mean_length")]
CURVES = [("sentiment reward (RM score)", "rm_score"), ("positive share", "positive")]


def describe(m):
    """One line of the measures."""
    if "rm_score" not in m:
        line = "no sentiment reward model to score with (set reward_model)"
    else:
        line = f"sentiment reward {m['rm_score']:+.3f}, positive {m['positive']:.3f}"
    line += f" ({m['samples']} samples of {m['n_prompts']} prefixes), length {m['mean_length']:.1f}"
    return line + (f", KL {m['kl']:.3f} nats" if "kl" in m else "")
