"""
Critic-free RL: sample several responses to each prompt and judge each one against the others.

PPO (train_ppo.py) learns a critic to tell a good response from an average one. The methods here ask the data
instead: G samples of the same prompt, and each sample's advantage is its reward against its group's. No value
model, no GAE; the policy, a frozen reference (only when the KL needs one) and the reward. The reward is the task's
judge (reward='task': 1 if the response solves its prompt, else 0, a *verifiable* reward: RLVR) or the reward
model (reward='model': RLHF). Rewards R_i of the G samples of one prompt, r_t per response token:

    reinforce     A_t = sum_{s>=t} gamma^(s-t) r_s  [- the batch's mean]     (Williams 1992)
    rloo          A_i = R_i - mean_{j!=i} R_j = G/(G-1) (R_i - mean R)      (Ahmadian et al. 2024, "Back to Basics")
    grpo          A_i = (R_i - mean R) / (std R + eps)                       (Shao et al. 2024, DeepSeekMath)
    dr_grpo       A_i = R_i - mean R, loss summed over tokens / a constant   (Liu et al. 2025, "Dr. GRPO")
    reinforce_pp  A_t = whiten over the whole batch (sum_{s>=t} r_s), r_t = -beta k1_t (+ R at the last token)
                                                                              (Hu et al. 2025, REINFORCE++)
    loss          -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),  rho_t = pi(y_t|s_t) / pi_old(y_t|s_t)
                  (PPO's clipped ratio, with DAPO's clip-higher: eps_high > eps_low; Yu et al. 2025), averaged per
                  response then over responses (GRPO), over all tokens of the batch (DAPO), or summed and divided
                  by a constant, the batch's token budget (Dr. GRPO)
    KL to pi_ref  delta_t = log pi_ref(y_t|s_t) - log pi(y_t|s_t):  k1 = -delta in the reward (as our PPO),
                  k2 = delta^2 / 2 or k3 = e^delta - 1 - delta (DeepSeekMath's) as a loss term  (Schulman 2020)

Best-of-N, the baseline every one of them must beat: sample N responses from the SFT model and keep the one the
reward scores best (Llama 2's rejection sampling fine-tunes on exactly these); its KL to the sampling distribution
is log N - (N-1)/N, or less when rewards tie (Gao et al. 2022; Beirami et al. 2024). --best_of_n=N evaluates it (no
training) on the held-out prompts, with best-of-1, 2, 4, ... beside it.

One iteration, as the loop below reads: 1. rollout (G samples per prompt, the prompt run once)  2. score
3. advantages  4. update.

    python train_grpo.py config/grpo_small.py                          # GRPO on the task's judge (after train_sft.py)
    python train_grpo.py config/grpo_small.py --reward=model           # on the reward model (after train_rm.py)
    python train_grpo.py config/grpo_small.py --advantage=dr_grpo      # or rloo, reinforce, reinforce_pp
    python train_grpo.py config/grpo_small.py --kl=k3 --kl_coef=0.04   # DeepSeekMath's KL term
    python train_grpo.py config/grpo_small.py --best_of_n=8 --out_dir=out/bon8_small   # the baseline
On several GPUs (or, to try it, 2 CPU processes): each process samples the groups of its share of the prompts, so
group statistics stay within a process; the batch-wide ones (REINFORCE's baseline, REINFORCE++'s whitening) and
the task's judge take in every process's responses
    torchrun --standalone --nproc_per_node=4 train_grpo.py config/grpo_imdb_gpt2.py
Every key: python train_grpo.py --help
"""
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

import tasks
from common import (average_gradients, before_after_table, evaluation_due, field, format_duration, load_checkpoint,
                    mean_over_processes, Metrics, model_from_checkpoint, NonFiniteGuard, pad_left,
                    plot_curves, read_jsonl_records, read_prompts, resume_checkpoint, rng_state, RunConfig,
                    save_checkpoint, set_rng_state, shard, start_stage, StopRequest, UserError, write_before_after)
from tokenizer import get_tokenizer, tokenizer_name
from train_ppo import (global_masked_mean, masked_mean, masked_whiten, response_logprobs, response_mask,
                       task_scorer)  # shared with PPO
from train_rm import reward_at_last_token, rm_scorer  # the score, read at the last real token, as the RM was trained

NAMES = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "reinforce": "REINFORCE", "reinforce_pp": "REINFORCE++"}
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # a response against the other samples of its prompt
# each method's own loss aggregation, for loss_agg='auto': REINFORCE and RLOO treat a response as one action (a sum
# over its tokens), as Dr. GRPO does; GRPO averages within each response; REINFORCE++ averages over the batch's tokens
AUTO_LOSS_AGG = {"reinforce": "constant", "rloo": "constant", "grpo": "sequence", "dr_grpo": "constant",
                 "reinforce_pp": "token"}


@dataclass
class Config(RunConfig):
    out_dir: str = "out/grpo"  # where ckpt.pt, metrics.jsonl, grpo.png, report.md and before_after.json are written
    init_from: str = "out/sft"  # the SFT out_dir the policy (and the frozen reference) start from; or 'resume'
    reward_model: str = "out/rm"  # the train_rm.py out_dir whose model scores responses, for reward='model'
    reward: Literal["task", "model"] = "task"  # 'task': the task's judge, 1 if a response solves its prompt, else 0
    template_window: int = field(256, min=0)  # reward='task': earlier responses judged beside each rollout (templates)
    prompts_file: str = "data/pycode/prompts_train.jsonl"  # rollout prompts {"prompt": ...}
    eval_prompts: str = "data/pycode/prompts_eval.jsonl"  # held-out prompts for the before/after evaluation
    task: str = "pycode"  # the task module (tasks/<task>.py): its measures, and its judge for reward='task'
    eval_max_prompts: int = field(0, min=0)  # evaluate on this many held-out prompts; 0 means all of them
    eval_samples: int = field(8, min=0)  # sampled completions per held-out prompt per evaluation: pass@k, KL to SFT
    template: Literal["none", "instruction"] = "none"  # prompt template, as used in SFT
    max_iters: int = 30  # iterations (rollout + update)
    eval_interval: int = 30  # evaluate and save a checkpoint every this many iterations
    eval_at_start: bool = True  # evaluate the SFT model first (pipeline.py: in one seed per stage, not in each)
    log_interval: int = 1  # print a line every this many iterations
    best_of_n: int = field(0, min=0)  # > 0: train nothing; evaluate the best of this many SFT samples per prompt
    # rollout
    batch_size: int = field(8, min=1)  # prompts per rollout, drawn without replacement, over all processes
    group_size: int = field(8, min=1)  # G, samples per prompt: batch_size * group_size responses per iteration
    max_new_tokens: int = field(96, min=1)  # response length limit; prompts leaving less room than this are dropped
    temperature: float = field(1.0, above=0)  # sampling temperature of rollouts; log-probs use the same one
    # reward
    score_norm: bool = True  # reward='model': standardise its scores with the mean/std train_rm.py saved
    score_clip: float = field(5.0, min=0)  # clip (normalised) scores to +-this; 0 turns it off
    missing_eot_penalty: float = -1.0  # added to the score of a response cut off before it emits end-of-text
    # advantages
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp"] = "grpo"  # the estimator (above)
    baseline: bool = True  # reinforce: subtract the batch's mean return (Williams' reinforcement baseline)
    gamma: float = field(1.0, min=0, max=1)  # discount of the returns-to-go of reinforce and reinforce_pp
    # KL to the reference (the SFT model)
    kl: Literal["none", "k1", "k2", "k3"] = "none"  # 'none': beta = 0, no reference; 'k1' in the reward; k2, k3 a loss
    kl_coef: float = field(0.04, min=0)  # beta (DeepSeekMath's 0.04)
    # update
    loss_agg: Literal["auto", "sequence", "token", "constant"] = "auto"  # 'auto': the advantage's own (AUTO_LOSS_AGG)
    update_epochs: int = field(1, min=1)  # passes over each rollout; 1 with one minibatch is strictly on-policy
    minibatch_size: int = field(0, min=0)  # responses per optimizer step (over all processes); 0: the whole rollout
    learning_rate: float = field(1e-4, min=0)  # Adam step size
    weight_decay: float = field(0.0, min=0)  # AdamW decay on matrices
    clip_low: float = field(0.2, above=0, below=1)  # the ratio may fall to 1 - clip_low before the clip holds it
    clip_high: float = field(0.2, above=0)  # ...and rise to 1 + clip_high; DAPO's 0.28 lets unlikely tokens grow more
    max_grad_norm: float = field(1.0, above=0)  # clip the gradient norm
    eval_samples_shown: int = field(3, min=0)  # sample completions before and after written to the report


# --------------------------------------------------------------------------------------------------------------
# the math of one iteration, as small functions the tests call

def per_token_rewards(scores, mask, penalty=None):
    """r_t = -penalty_t at every response token (beta * k1_t when the KL is in the reward), plus the response's
    score at its last real token. Responses are right-padded; their rewards sum to the sequence reward R_i."""
    rewards = torch.where(mask.bool(), -penalty, 0.0) if penalty is not None else torch.zeros_like(mask)
    last = (mask.sum(dim=1) - 1).long().clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def returns_to_go(rewards, mask, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1}: what follows token t, the only part of the return token t can change."""
    rewards = torch.where(mask.bool(), rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def reinforce_advantages(rewards, mask, gamma=1.0, baseline=True):
    """REINFORCE (Williams 1992): A_t = G_t, less the batch's mean return over all response tokens when baseline
    (a constant baseline leaves the gradient unbiased and lowers its variance); under torchrun, the whole batch's."""
    returns = returns_to_go(rewards, mask, gamma)
    if baseline:
        returns = returns - global_masked_mean(returns, mask)
    return torch.where(mask.bool(), returns, 0.0)


def rloo_advantages(rewards, G):
    """RLOO: each response against the mean of the other G - 1 samples of its prompt, a baseline that does not
    depend on the response itself, so the gradient stays unbiased. rewards (B*G,), prompt by prompt. A group of
    one has no other sample to compare with: its advantage is 0."""
    R = rewards.view(-1, G)
    if G == 1:
        return torch.zeros_like(rewards)
    return (R - (R.sum(dim=1, keepdim=True) - R) / (G - 1)).view(-1)


def grpo_advantages(rewards, G, eps=1e-4):
    """GRPO: the reward standardised within its group, (R_i - mean) / (std + eps), the sample std (n - 1) as
    DeepSeekMath's implementations take it. A group of equal rewards gives 0 to every sample: no signal."""
    R = rewards.view(-1, G)
    std = R.std(dim=1, keepdim=True, correction=1 if G > 1 else 0)
    return ((R - R.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def dr_grpo_advantages(rewards, G):
    """Dr. GRPO: R_i - mean R. Dividing by the group's std weighs the prompts the policy nearly always (or never)
    solves most, a bias of difficulty; without it, every prompt counts by its rewards' spread."""
    R = rewards.view(-1, G)
    return (R - R.mean(dim=1, keepdim=True)).view(-1)


def reinforce_pp_advantages(rewards, mask, gamma=1.0):
    """REINFORCE++: returns-to-go of the per-token rewards (the KL penalty at every token, the score at the last),
    whitened over every token of the batch (every process's share of it): the batch, not the group, is the
    baseline."""
    return masked_whiten(returns_to_go(rewards, mask, gamma), mask)


def advantages_of(name, rewards, mask, G, gamma=1.0, baseline=True):
    """(B*G, R) advantages of the named estimator from per-token rewards; a group estimator scores the sequence
    reward R_i (the sum of its per-token rewards) and gives every token of the response its A_i."""
    if name == "reinforce":
        return reinforce_advantages(rewards, mask, gamma, baseline)
    if name == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma)
    estimator = {"rloo": rloo_advantages, "grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages}[name]
    return estimator(torch.where(mask.bool(), rewards, 0.0).sum(dim=1), G)[:, None] * mask


def kl_k1(delta):
    """k1 = -delta = log pi - log pi_ref: unbiased for KL(pi || pi_ref), but of high variance and often negative."""
    return -delta


def kl_k2(delta):
    """k2 = delta^2 / 2: biased, low variance; as a loss its gradient is the reverse KL's, KL(pi || pi_ref)."""
    return 0.5 * delta ** 2


def kl_k3(delta):
    """k3 = e^delta - 1 - delta = pi_ref/pi - 1 - log(pi_ref/pi): unbiased, always >= 0 (DeepSeekMath's). expm1:
    e^delta - 1 in float32 loses every digit of delta^2/2 when |delta| is small; expm1(delta) - delta keeps them."""
    return (torch.expm1(delta) - delta).clamp(min=0.0)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def clipped_token_loss(logprobs, old_logprobs, advantages, clip_low, clip_high):
    """-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) per token, and where the clip is active: low (rho fell
    below 1 - clip_low on a token with A < 0) and high (rose above 1 + clip_high with A > 0); there the gradient
    is zero. A wider clip_high lets a token the policy found unlikely but good grow faster (DAPO)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    low = (ratio < 1.0 - clip_low) & (advantages < 0)
    high = (ratio > 1.0 + clip_high) & (advantages > 0)
    return loss, low, high


def aggregate(values, mask, how, max_new_tokens):
    """One number from per-token values (B, R): 'sequence', the mean within each response, then over responses
    (GRPO: a long response's tokens weigh less each); 'token', the mean over all tokens of the batch (DAPO);
    'constant', the sum over tokens divided by B * max_new_tokens, the same for every batch (Dr. GRPO: no length
    bias). Under Adam a constant factor changes little; which tokens weigh how much is what differs."""
    values = torch.where(mask.bool(), values, 0.0)
    if how == "sequence":
        return (values.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if how == "token":
        return values.sum() / mask.sum().clamp(min=1)
    return values.sum() / (values.size(0) * max_new_tokens)


def no_signal_share(scores, G):
    """The share of groups whose G scores are all equal: their group-relative advantages are all 0."""
    R = scores.view(-1, G)
    return (R == R[:, :1]).all(dim=1).float().mean().item()


def best_of_n_kl(n):
    """KL(best-of-n || pi) = log n - (n - 1)/n, exact when no two samples tie in reward, an upper bound otherwise
    (Beirami et al. 2024): 0.19 nats for n = 2, 1.20 for n = 8, 3.17 for n = 64."""
    return math.log(n) - (n - 1) / n


# --------------------------------------------------------------------------------------------------------------

def evaluate(policy, ref, reward_model, tok, eval_set, cfg, rt):
    """The task's held-out measures (tasks/<cfg.task>.py) of the policy, with the reward model's mean score of its
    greedy completions (when there is one) and the KL to the reference from sampled ones."""
    return tasks.load(cfg.task).evaluate_policy(
        policy, tok, eval_set, cfg.max_new_tokens, rt.device, rt.autocast, samples=cfg.eval_samples, ref_model=ref,
        seed=cfg.seed, scorer=rm_scorer(reward_model, tok, rt) if reward_model is not None else None)


@torch.no_grad()
def best_of_n(policy, tok, eval_set, score, reward_model, cfg, rt):
    """Sample n = cfg.best_of_n responses to each held-out prompt and keep the one `score` ranks first (ties: the
    earliest sample). The samples of batch_size prompts are scored together, as one rollout's are. Returns
    {k: (measures, kept completions)} for k = 1, 2, 4, ..., n: best-of-k from the first k of the same samples."""
    n, generator = cfg.best_of_n, torch.Generator(device=rt.device).manual_seed(cfg.seed)
    texts, rows, ended, scores = [], [], [], []
    for start in range(0, len(eval_set.inputs), cfg.batch_size):
        prompt_ids = [tok.encode(p) for p in eval_set.inputs[start:start + cfg.batch_size]]
        ids, mask = pad_left(prompt_ids, tok.eot_token)
        ids, mask = ids.to(rt.device), mask.to(rt.device)
        with rt.autocast:
            seqs = policy.generate(ids, cfg.max_new_tokens, attention_mask=mask, temperature=cfg.temperature,
                                   eot_token=tok.eot_token, generator=generator, num_samples=n)
        P = ids.size(1)
        attn = torch.cat([mask.repeat_interleave(n, 0), response_mask(seqs[:, P:], tok.eot_token).long()], dim=1)
        raw = [p for p in eval_set.prompts[start:start + cfg.batch_size] for _ in range(n)]
        scores.append(score(raw, seqs, attn, P).float().cpu())
        for i, row in enumerate(seqs[:, P:].tolist()):
            cut = row.index(tok.eot_token) if tok.eot_token in row else len(row)
            texts.append(tok.decode(row[:cut]))
            rows.append((prompt_ids[i // n], row[:cut + 1]))  # the response keeps its end-of-text, if it has one
            ended.append(cut < len(row))
    scores = torch.cat(scores).view(-1, n)
    results = {}
    for k in sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n}):
        pick = [i * n + j for i, j in enumerate(scores[:, :k].argmax(dim=1).tolist())]  # argmax: the first of ties
        kept = [texts[i] for i in pick]
        m = tasks.load(cfg.task).summarize(eval_set.prompts, kept, eval_set.references, [ended[i] for i in pick])
        m["mean_length"] = sum(len(rows[i][1]) for i in pick) / len(pick)
        m["no_eot_share"] = 1 - sum(ended[i] for i in pick) / len(pick)
        m["kl"] = best_of_n_kl(k)
        if reward_model is not None:  # the reward model's raw score, as evaluate() reports it
            m["rm_score"] = rm_scorer(reward_model, tok, rt)([rows[i] for i in pick]).float().mean().item()
        results[k] = (m, kept)
    return results


def main(argv=None, score_fn=None):
    """score_fn(prompt texts, response ids, response mask) -> scores, when given, replaces the task's judge and the
    reward model (the tests use a toy reward with a known optimum)."""
    cfg, rt = start_stage(Config, argv, "train_grpo.py", stage="grpo")
    task = tasks.load(cfg.task)
    G = cfg.group_size
    if cfg.best_of_n and (rt.ddp or not hasattr(task, "summarize")):
        raise UserError("best_of_n evaluates the SFT model in one process, on a task that summarises completions "
                        "(pycode): start it with python, with task='pycode'")
    if cfg.minibatch_size % rt.world_size:
        raise UserError(f"minibatch_size={cfg.minibatch_size} must be divisible by the number of processes "
                        f"({rt.world_size})")
    if cfg.advantage in GROUP_ESTIMATORS and G < 2 and not cfg.best_of_n:
        raise UserError(f"advantage={cfg.advantage!r} compares the samples of one prompt: group_size must be at "
                        f"least 2 (use advantage='reinforce' for one sample per prompt)")
    loss_agg = AUTO_LOSS_AGG[cfg.advantage] if cfg.loss_agg == "auto" else cfg.loss_agg

    # ---- the models: the policy (trained), the reference (frozen SFT; only when the KL needs it), the reward model
    resuming = cfg.init_from == "resume"
    sft_source, ckpt = cfg.init_from, None
    if resuming:
        _, ckpt = resume_checkpoint(cfg.out_dir, "grpo", "GRPO run")
        sft_source = ckpt["sft_source"]  # where the run began, however often it was resumed
    sft_ckpt = load_checkpoint(sft_source, hint="make it with `python train_sft.py config/sft_small.py`")
    tok = get_tokenizer(sft_ckpt["tokenizer"])
    policy = model_from_checkpoint(sft_ckpt, sft_source, dropout=0.0)

    def reference():  # the frozen SFT model
        return model_from_checkpoint(sft_ckpt, sft_source, dropout=0.0).eval().requires_grad_(False).to(rt.device)

    ref = reference() if cfg.kl != "none" else None  # beta = 0: not loaded for training; each evaluation loads it
    reward_model, rm_stats = None, (0.0, 1.0)
    recent = list(ckpt.get("recent", [])) if ckpt else []  # the task reward's memory of earlier responses
    if score_fn is None and cfg.reward == "task":
        if not hasattr(task, "reward"):
            raise UserError(f"the task {cfg.task!r} has no judge to reward with (tasks/{cfg.task}.py has no reward()); "
                            f"use reward='model'")
        score_fn = task_scorer(tok, recent, cfg.template_window, task)
    if score_fn is None:
        rm_ckpt = load_checkpoint(cfg.reward_model, hint="make it with `python train_rm.py config/rm_small.py`")
        if not rm_ckpt["model_args"].get("scalar_head"):
            raise UserError(f"{cfg.reward_model} holds a {rm_ckpt.get('stage', '?')!r} model without a scalar head, "
                            f"not a reward model; make one with `python train_rm.py config/rm_small.py`")
        if rm_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
            raise UserError(f"the reward model uses the {tokenizer_name(rm_ckpt['tokenizer'])!r} tokenizer but the "
                            f"policy uses {tokenizer_name(sft_ckpt['tokenizer'])!r}; train both from the same "
                            f"pretraining run")
        rm_stats = (rm_ckpt.get("reward_mean", 0.0), max(rm_ckpt.get("reward_std", 1.0), 1e-6))
        reward_model = model_from_checkpoint(rm_ckpt, cfg.reward_model, dropout=0.0).eval().requires_grad_(False)
        reward_model.to(rt.device)
    if ckpt is not None:
        policy.load_state_dict(ckpt["model"])
    policy.to(rt.device)

    def score(texts, seqs, attn, P):
        """One number per response: the task's judge or the reward model's (normalised) score, plus the penalty
        for a response cut off before its end-of-text."""
        responses, mask = seqs[:, P:], attn[:, P:].float()
        if score_fn is not None:
            scores = score_fn(texts, responses, mask).float().to(seqs.device)
        else:
            raw = reward_at_last_token(reward_model, seqs, attn)
            scores = (raw - rm_stats[0]) / rm_stats[1] if cfg.score_norm else raw
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores + cfg.missing_eot_penalty * (~(responses == tok.eot_token).any(dim=1)).float()

    # ---- prompts
    max_prompt = policy.config.block_size - cfg.max_new_tokens
    # raw prompts are what the task's judge reads; prompt_ids what the policy reads (the template applied)
    prompts, _, prompt_ids, dropped = read_prompts(cfg.prompts_file, tok, cfg.template, max_prompt)
    eval_set = task.read_eval_set(cfg.eval_prompts, tok, cfg.template, max_prompt, cfg.eval_max_prompts)
    show = tasks.shown(task, eval_set.prompts, cfg.eval_samples_shown)  # the held-out prompts the report shows
    print(f"{len(prompts)} rollout prompts ({dropped} longer than {max_prompt} tokens dropped), "
          f"{len(eval_set.prompts)} evaluation prompts ({eval_set.dropped} dropped); policy "
          f"{policy.get_num_params() / 1e6:.2f}M parameters; reward {cfg.reward}")
    if cfg.best_of_n:
        return run_best_of_n(policy, reference, reward_model, tok, eval_set, score, cfg, rt)
    if min(cfg.batch_size, len(prompts)) % rt.world_size:  # every process samples as many groups
        raise UserError(f"the {min(cfg.batch_size, len(prompts))} prompts of a rollout (batch_size) must be divisible "
                        f"by the number of processes ({rt.world_size})")

    optimizer = policy.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), rt.device_type)
    start_iter = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter_num"]
        set_rng_state(ckpt["rng"])
        print(f"resuming from {cfg.out_dir}/ckpt.pt at iteration {start_iter}")
    n_responses = min(cfg.batch_size, len(prompts)) * G
    minibatch = (cfg.minibatch_size or n_responses) // rt.world_size  # each process's share of a minibatch
    print(f"{NAMES[cfg.advantage]}: {min(cfg.batch_size, len(prompts))} prompts x {G} samples per iteration, "
          f"loss aggregation '{loss_agg}', KL {cfg.kl}" + (f" (beta {cfg.kl_coef})" if cfg.kl != "none" else ""))
    if cfg.update_epochs == 1 and minibatch * rt.world_size >= n_responses:
        print("one update per rollout: the ratio pi/pi_old is 1 when the loss is taken, so nothing is clipped and the "
              "loss value is ~0 by design (zero-mean advantages); its gradient, not its value, carries the signal")

    metrics = Metrics(cfg.out_dir, resume_iter=start_iter if ckpt else None, enabled=rt.is_master)
    before = ckpt["before"] if ckpt else None
    generator = torch.Generator(device=rt.device)
    cpu_generator = torch.Generator()
    # resumed at the last iteration, nothing is evaluated again: the report takes the checkpoint's evaluation
    last_eval, after_completions = (ckpt.get("eval"), ckpt.get("completions", [])) if ckpt else (None, [])
    guard = NonFiniteGuard(cfg.learning_rate, device=rt.device)
    t_start = time.time()

    def save(iter_num):
        if not rt.is_master:  # every process holds the same weights: one writes them
            return
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
            "stage": "grpo", "model_args": asdict(policy.config), "model": policy.state_dict(),
            "optimizer": optimizer.state_dict(), "iter_num": iter_num, "config": asdict(cfg), "rng": rng_state(),
            "tokenizer": tok.spec, "before": before, "template": cfg.template, "sft_source": sft_source,
            "eval": last_eval, "completions": after_completions, "recent": recent})

    with StopRequest() as stop:
        for it in range(start_iter, cfg.max_iters + 1):
            # ---- evaluate: before any update, every eval_interval, at the end
            at_end = it == cfg.max_iters or stop.requested
            due = evaluation_due(it, cfg.eval_interval, cfg.eval_at_start)
            if (due or at_end) and not (ckpt and it == start_iter):
                # the evaluation at iteration 0 is the SFT model's: its own reference (KL 0, not estimated)
                last_eval, completions = evaluate(policy, (ref or reference()) if it > 0 else policy, reward_model,
                                                  tok, eval_set, cfg, rt)
                if it == 0:
                    before = {"metrics": last_eval, "completions": [completions[i] for i in show]}
                print(f"eval @ {it}: {task.describe(last_eval)}" + (f"; RM score {last_eval['rm_score']:.3f}"
                                                                     if "rm_score" in last_eval else ""), flush=True)
                metrics.log(iter=it, **{f"eval_{k}": v for k, v in last_eval.items()})
                after_completions = [completions[i] for i in show]
                save(it)
            if at_end:
                break

            t0 = time.time()
            # ---- 1. rollout: G samples of each prompt in one batched, KV-cached call that runs each prompt once;
            # plain temperature sampling, so the log-probs kept with the tokens are log pi_old of what was sampled
            cpu_generator.manual_seed(cfg.seed * 100_003 + it)  # rollouts are a pure function of (seed, iteration)
            generator.manual_seed(cfg.seed * 100_003 + it + rt.rank * 1_000_000_007)  # (and rank: a stream each)
            # under torchrun each process takes a share of the prompts, and all G samples of each: a group's
            # statistics (GRPO's mean and std, RLOO's leave-one-out mean) never need another process
            pick = shard(torch.randperm(len(prompts), generator=cpu_generator)[:cfg.batch_size].tolist())
            prompt_batch, prompt_mask = pad_left([prompt_ids[i] for i in pick], tok.eot_token)
            prompt_batch, prompt_mask = prompt_batch.to(rt.device), prompt_mask.to(rt.device)
            policy.eval()
            with torch.no_grad(), rt.autocast:
                seqs, logprobs = policy.generate(prompt_batch, cfg.max_new_tokens, attention_mask=prompt_mask,
                                                 temperature=cfg.temperature, eot_token=tok.eot_token,
                                                 generator=generator, return_logprobs=True, num_samples=G)
            P = prompt_batch.size(1)
            mask = response_mask(seqs[:, P:], tok.eot_token)  # (B*G, R): prompt b's samples are rows b*G .. b*G+G-1
            attn = torch.cat([prompt_mask.repeat_interleave(G, dim=0), mask.long()], dim=1)
            has_eot = (seqs[:, P:] == tok.eot_token).any(dim=1)
            t1 = time.time()

            # ---- 2. score each response; the reference's log-probs when the KL needs them
            with torch.no_grad(), rt.autocast:
                scores = score([prompts[i] for i in pick for _ in range(G)], seqs, attn, P)
                ref_logprobs = response_logprobs(ref, seqs, attn, P, cfg.temperature)[0] if ref is not None else None
                k1 = kl_k1(ref_logprobs - logprobs) * mask if ref is not None else None  # log pi_old - log pi_ref

                # ---- 3. advantages: the KL penalty in the reward (k1) or not, then the estimator
                penalty = cfg.kl_coef * k1 if cfg.kl == "k1" else None
                rewards = per_token_rewards(scores, mask, penalty)
                advantages = advantages_of(cfg.advantage, rewards, mask, G, cfg.gamma, cfg.baseline)
            t2 = time.time()

            # ---- 4. update: the clipped objective (and the KL term for k2/k3) on minibatches of this rollout
            policy.train()
            stats = {"loss": [], "kl_loss": [], "clip_low": [], "clip_high": [], "grad_norm": []}
            for epoch in range(cfg.update_epochs):
                order = torch.randperm(len(seqs), generator=cpu_generator).to(rt.device)
                for mb in order.split(minibatch):
                    with rt.autocast:
                        new_logprobs = response_logprobs(policy, seqs[mb], attn[mb], P, cfg.temperature)[0]
                    token_loss, low, high = clipped_token_loss(new_logprobs, logprobs[mb], advantages[mb],
                                                               cfg.clip_low, cfg.clip_high)
                    loss = aggregate(token_loss, mask[mb], loss_agg, cfg.max_new_tokens)
                    stats["loss"].append(loss.item())
                    if cfg.kl in ("k2", "k3"):  # the KL as a loss: its gradient pulls the policy back to pi_ref
                        kl_loss = aggregate(KL_ESTIMATORS[cfg.kl](ref_logprobs[mb] - new_logprobs), mask[mb],
                                            loss_agg, cfg.max_new_tokens)
                        loss = loss + cfg.kl_coef * kl_loss
                        stats["kl_loss"].append(kl_loss.item())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(policy.parameters())
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    guard.record(it + 1, loss, grad_norm)
                    stats["grad_norm"].append(grad_norm.item())
                    optimizer.step()
                    stats["clip_low"].append(masked_mean(low.float(), mask[mb]).item())
                    stats["clip_high"].append(masked_mean(high.float(), mask[mb]).item())
            t3 = time.time()
            guard.check()  # an update that went nan or inf stops the run before the next rollout samples from it

            # ---- bookkeeping: the diagnostics of the silent failures (no signal, cut responses, collapse, drift)
            row = {"iter": it + 1, "score": scores.mean().item(), "no_signal_groups": no_signal_share(scores, G),
                   "no_eot_share": (~has_eot).float().mean().item(),
                   "entropy": -masked_mean(logprobs, mask).item(),  # estimated from the sampled tokens, for free
                   "response_length": mask.sum(1).mean().item(),
                   **{k: sum(v) / len(v) for k, v in stats.items() if v},
                   "rollout_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2}
            if k1 is not None:
                row["kl"] = k1.sum(dim=1).mean().item()  # nats per response, to the reference
            row = mean_over_processes(row)  # each share holds as many responses: the whole batch's means
            metrics.log(**row)
            if (it + 1) % cfg.log_interval == 0:
                eta = (time.time() - t_start) / (it + 1 - start_iter) * (cfg.max_iters - it - 1)
                print(f"iter {it + 1}/{cfg.max_iters}: score {row['score']:+.3f}, no-signal groups "
                      f"{row['no_signal_groups']:.2f}, cut {row['no_eot_share']:.2f}, entropy {row['entropy']:.2f}, "
                      + (f"KL {row['kl']:.3f}, " if "kl" in row else "")
                      + f"clip low/high {row['clip_low']:.3f}/{row['clip_high']:.3f}, "
                      f"len {row['response_length']:.1f}, loss {row['loss']:+.4f}, |g| {row['grad_norm']:.2f} | "
                      f"rollout {t1 - t0:.2f}s score {t2 - t1:.2f}s update {t3 - t2:.2f}s | eta {format_duration(eta)}",
                      flush=True)

    # ---- the report: before/after table, curves, samples
    before = before or {"metrics": {}, "completions": []}  # eval_at_start=False: the SFT model not evaluated here
    table = write_report(cfg, before, last_eval, after_completions, eval_set.inputs, show, task) if rt.is_master else ""
    print(table)
    print(f"done in {format_duration(time.time() - t_start)}; wrote {cfg.out_dir}/ckpt.pt, metrics.jsonl, grpo.png, "
          f"report.md")
    return {"before": before["metrics"], "after": last_eval}


def report_rows(eval_samples, task):
    return ([("RM score mean", "rm_score")] + task.MEASURES + [("KL to SFT (nats/response)", "kl")]
            + [(f"pass@{eval_samples}, functions with arguments", f"pass@{eval_samples}_args")])


def write_report(cfg, before, after, after_completions, eval_texts, show, task):
    name = NAMES[cfg.advantage]
    table = before_after_table(before["metrics"], after, report_rows(cfg.eval_samples, task), name)
    records = read_jsonl_records(os.path.join(cfg.out_dir, "metrics.jsonl"))
    train = [r for r in records if "score" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    series = lambda rs, key: ([r["iter"] for r in rs if key in r], [r[key] for r in rs if key in r])
    panels = {"rollouts": {"score (reward)": series(train, "score"), "groups with no signal": series(
                  train, "no_signal_groups"), "cut at max_new_tokens": series(train, "no_eot_share")},
              "KL to SFT (nats/response)": {"rollout": series(train, "kl"), "held-out": series(evals, "eval_kl")},
              "held-out prompts": {label: series(evals, f"eval_{key}") for label, key in task.CURVES},
              "policy": {"entropy (nats/token)": series(train, "entropy"), "clipped low": series(train, "clip_low"),
                         "clipped high": series(train, "clip_high")}}
    if any("eval_rm_score" in r for r in evals):
        panels["reward model's score, held-out"] = {"RM score": series(evals, "eval_rm_score")}
    plot_curves(os.path.join(cfg.out_dir, "grpo.png"), panels, f"{name} ({cfg.reward} reward, G = {cfg.group_size}, "
                                                               f"KL {cfg.kl}, seed {cfg.seed}): {cfg.out_dir}")
    write_before_after(cfg.out_dir, name, f"advantage: {cfg.advantage}; reward: {cfg.reward}; KL: {cfg.kl}; "
                       f"{len(eval_texts)} held-out prompts, greedy completions (KL and pass@k from sampled ones)",
                       table, "grpo.png", before, {"metrics": after, "completions": after_completions},
                       [eval_texts[i] for i in show])
    return table


def run_best_of_n(policy, reference, reward_model, tok, eval_set, score, cfg, rt):
    """--best_of_n=N: the SFT model's greedy measures (before) and best-of-1, 2, ..., N of its samples (after),
    with report.md, before_after.json, metrics.jsonl (one record per k) and best_of_n.png (measures against KL)."""
    t0 = time.time()
    task = tasks.load(cfg.task)
    show = tasks.shown(task, eval_set.prompts, cfg.eval_samples_shown)
    before, completions = evaluate(policy, policy, reward_model, tok, eval_set, cfg, rt)  # SFT: its own reference
    print(f"SFT, greedy: {task.describe(before)}", flush=True)
    results = best_of_n(policy, tok, eval_set, score, reward_model, cfg, rt)
    metrics = Metrics(cfg.out_dir)
    for k, (m, _) in results.items():
        print(f"best-of-{k} (KL <= {m['kl']:.3f}): {task.describe(m)}", flush=True)
        metrics.log(best_of=k, **{f"eval_{key}": v for key, v in m.items()})
    n = cfg.best_of_n
    after, kept = results[n]
    name = f"best-of-{n}"
    table = before_after_table(before, after, report_rows(cfg.eval_samples, task), name)
    kl = [m["kl"] for m, _ in results.values()]
    panels = {"held-out prompts": {"solved, with arguments": (kl, [m["solved_args"] for m, _ in results.values()]),
                                   "solved, all": (kl, [m["solved"] for m, _ in results.values()]),
                                   "template share": (kl, [m["template"] for m, _ in results.values()])}}
    if reward_model is not None:
        panels["reward model's score"] = {"RM score": (kl, [m["rm_score"] for m, _ in results.values()])}
    plot_curves(os.path.join(cfg.out_dir, "best_of_n.png"), panels, f"best-of-k, k = 1..{n}, of the SFT model's "
                f"samples at temperature {cfg.temperature}, ranked by the {cfg.reward} reward",
                xlabels={p: "KL to the sampling policy, log k - (k-1)/k (nats)" for p in panels})
    write_before_after(cfg.out_dir, name, f"no training: {n} samples per held-out prompt from the SFT model at "
                       f"temperature {cfg.temperature}, the one the {cfg.reward} reward scores best kept (before: the "
                       f"SFT model's greedy completions). KL: log n - (n-1)/n, an upper bound when rewards tie. "
                       f"{len(eval_set.inputs)} held-out prompts.", table, "best_of_n.png",
                       {"metrics": before, "completions": [completions[i] for i in show]},
                       {"metrics": after, "completions": [kept[i] for i in show]}, [eval_set.inputs[i] for i in show])
    print(table)
    print(f"done in {format_duration(time.time() - t0)}; wrote {cfg.out_dir}/report.md, before_after.json, "
          f"metrics.jsonl, best_of_n.png")
    return {"before": before, "after": after, "best_of": {k: m for k, (m, _) in results.items()}}


if __name__ == "__main__":
    main()
