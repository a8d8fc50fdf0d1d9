"""
Stage 3 of the recipe: reinforcement learning from the reward model with PPO and a KL penalty.

The policy (the SFT model) writes a response y to each prompt x; the reward model scores it; PPO nudges the
policy towards higher scores while a per-token KL penalty keeps it close to the SFT model it started from, so
that it cannot drift into text the reward model was never trained to judge:

    reward at response token t:  r_t = -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t))  [+ RM(x, y) at the last]
    advantages (GAE):            delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda A_{t+1}
    clipped objective:           L = -E[min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)],  rho_t = pi/pi_old
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022, InstructGPT;
Schulman et al. 2017, PPO; Schulman et al. 2016, GAE.)

One iteration, as the loop below reads: 1. rollout  2. score  3. per-token rewards  4. advantages  5. update.

    python train_ppo.py config/ppo_small.py                      # after train_sft.py and train_rm.py
    python train_ppo.py config/ppo_small.py --reward=task        # optimise the task's judge instead of the RM
    python train_ppo.py config/ppo_imdb_gpt2.py                  # GPT-2 writes positive movie reviews (data/imdb)
On several GPUs (or, to try it, 2 CPU processes): each process samples its share of the prompts; the advantages
are whitened over the whole batch, the KL and the template judge see every process's responses
    torchrun --standalone --nproc_per_node=4 train_ppo.py config/ppo_imdb_gpt2.py
Every key: python train_ppo.py --help
"""
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import tasks
from common import (all_reduce_mean, all_reduce_sum, average_gradients, before_after_table, dataset_dir, distributed,
                    evaluation_due, field, format_duration, load_checkpoint, mean_over_processes, Metrics,
                    model_from_checkpoint, NonFiniteGuard, pad_left, plot_curves, read_jsonl_records,
                    read_prompts, resume_checkpoint, rng_state, RunConfig, same_weights_everywhere, save_checkpoint,
                    set_rng_state, shard, start_stage, StopRequest, TokenBatches, unshard, UserError,
                    write_before_after)
from tokenizer import get_tokenizer, tokenizer_name
from train_rm import reward_at_last_token, rm_scorer  # the score, read at the last real token, as the RM was trained


@dataclass
class Config(RunConfig):
    out_dir: str = "out/ppo"  # where ckpt.pt, metrics.jsonl, ppo.png and report.md are written
    init_from: str = "out/sft"  # the SFT out_dir the policy (and the frozen reference) start from; or 'resume'
    reward_model: str = "out/rm"  # the train_rm.py out_dir whose model scores responses
    reward: Literal["model", "task"] = "model"  # 'task': the task's judge, 1 if a response solves its prompt, else 0
    template_window: int = field(256, min=0)  # reward='task': earlier responses judged beside each rollout (templates)
    prompts_file: str = "data/pycode/prompts_train.jsonl"  # rollout prompts {"prompt": ...}
    eval_prompts: str = "data/pycode/prompts_eval.jsonl"  # held-out prompts for the before/after evaluation
    task: str = "pycode"  # the task module (tasks/<task>.py): its measures, and its judge for reward='task'
    eval_max_prompts: int = field(0, min=0)  # evaluate on this many held-out prompts; 0 means all of them
    eval_samples: int = field(8, min=0)  # sampled completions per held-out prompt per evaluation: pass@k, KL to SFT
    template: Literal["none", "instruction"] = "none"  # prompt template, as used in SFT
    max_iters: int = 100  # PPO iterations (rollout + update)
    eval_interval: int = 25  # evaluate and save a checkpoint every this many iterations
    eval_at_start: bool = True  # evaluate the SFT model first (pipeline.py: in one seed per stage, not in each)
    log_interval: int = 1  # print a line every this many iterations
    # rollout
    batch_size: int = field(32, min=1)  # prompts per rollout, over all processes
    max_new_tokens: int = field(96, min=1)  # response length limit; prompts leaving less room than this are dropped
    temperature: float = field(1.0, above=0)  # sampling temperature of rollouts; log-probs use the same one
    # reward
    score_norm: bool = True  # standardise RM scores with the mean/std train_rm.py saved
    score_clip: float = field(5.0, min=0)  # clip (normalised) scores to +-this; 0 turns it off
    missing_eot_penalty: float = -1.0  # added to the score of a response that never emits end-of-text
    kl_coef: float = field(0.05, min=0)  # beta, the weight of the per-token KL penalty
    adaptive_kl: bool = False  # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = field(3.0, above=0)  # nats per response, the adaptive controller's target
    kl_horizon: int = field(10000, min=1)  # the adaptive controller's horizon in samples
    # advantages
    gamma: float = field(1.0, min=0, max=1)  # discount; 1 is usual for short responses with one final reward
    lam: float = field(0.95, min=0, max=1)  # GAE lambda: lower trades variance for bias
    # update
    critic: Literal["shared", "separate"] = "shared"  # value head on the policy's backbone, or a model from the RM
    ppo_epochs: int = field(4, min=1)  # passes over each rollout
    minibatch_size: int = field(16, min=1)  # rollouts per gradient step, over all processes
    learning_rate: float = field(1e-4, min=0)  # Adam step size for policy and critic
    weight_decay: float = field(0.0, min=0)  # AdamW decay on matrices
    clip_range: float = field(0.2, above=0)  # epsilon of the clipped policy objective
    clip_range_value: float = field(0.2, above=0)  # the value function's clip around its old predictions
    vf_coef: float = field(0.5, min=0)  # weight of the value loss
    entropy_coef: float = field(0.0, min=0)  # weight of the entropy bonus
    ptx_coef: float = field(0.0, min=0)  # weight of a pretraining (PTX) loss mixed in, as InstructGPT's PPO-ptx
    ptx_dataset: str = "pycode"  # data/ folder the PTX batches come from
    ptx_batch_size: int = field(8, min=1)  # sequences per PTX batch
    max_grad_norm: float = field(1.0, above=0)  # clip the gradient norm
    early_stop_kl: float = field(0.0, min=0)  # end an iteration's epochs when approx-KL to pi_old exceeds this; 0: off
    eval_samples_shown: int = field(3, min=0)  # sample completions before and after written to the report


# --------------------------------------------------------------------------------------------------------------
# the math of one PPO iteration, as small functions the tests call

def masked_mean(x, mask):
    """The mean over real positions; whatever lies at masked positions (even inf or nan) never enters it."""
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def global_masked_mean(x, mask):
    """masked_mean over every process's positions: under torchrun each holds a share of the batch, and a statistic of
    the batch is a sum and a count over all of them."""
    if not distributed():
        return masked_mean(x, mask)
    total, count = all_reduce_sum(torch.stack([torch.where(mask.bool(), x, 0.0).sum(), mask.sum().to(x.dtype)]))
    return total / count.clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the real (mask == 1) positions only; padding stays out of the statistics.
    Under torchrun, the mean and variance of the whole batch, every process's share of it."""
    mean = global_masked_mean(x, mask)
    var = global_masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """r_t = -beta * (log pi(y_t) - log pi_ref(y_t)) at every response token, plus the score at the last one.

    log pi - log pi_ref, averaged over samples from pi, estimates KL(pi || pi_ref); as a per-token penalty it
    charges the policy for every token it makes more likely than the reference would."""
    kl = torch.where(mask.bool(), logprobs - ref_logprobs, 0.0)
    rewards = -beta * kl
    last = (mask.sum(dim=1) - 1).long().clamp(min=0)  # responses are right-padded: the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae_advantages(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, backwards over response tokens:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lambda * A_{t+1}
    V after the last real token is 0 (the episode ends there). Returns (advantages, returns = A + V)."""
    values = torch.where(mask.bool(), values, 0.0)
    rewards = torch.where(mask.bool(), rewards, 0.0)
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """The clipped surrogate: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi/pi_old. Clipping removes the
    incentive to move rho outside [1-eps, 1+eps], so one rollout cannot push the policy too far."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - (logprobs - old_logprobs), mask)  # >= 0, low variance (Schulman)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value):
    """0.5 * max((V - R)^2, (V_clipped - R)^2): like the policy, the critic may move only so far per rollout."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + K * e), e = clip(KL / target - 1, -0.2, 0.2), K = n / horizon.
    Too much KL raises beta, too little lowers it, so the KL settles near the target."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_samples):
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon


# --------------------------------------------------------------------------------------------------------------
# the models' side of each step

def response_logprobs(model, seqs, attn, prompt_len, temperature, with_values=False, with_entropy=False):
    """log pi(y_t | s_t) for each response token (B, R), from one forward pass over prompt + response; the value
    head, when asked, reads the same hidden states: V(s_t) is the value before token t is chosen."""
    hidden = model.hidden_states(seqs, attn)[:, prompt_len - 1:-1]  # the states that predict response tokens
    # the sampling distribution's temperature, always: lm_head(h) / T = lm_head(h / T), and h is much smaller
    logprobs = model.token_logprobs(hidden / temperature, seqs[:, prompt_len:])
    values = model.scalar(hidden).float() if with_values else None
    entropy = None
    if with_entropy:  # needs the whole distribution at every position
        logp_all = F.log_softmax(model.lm_head(hidden / temperature).float(), dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, values, entropy


def response_values(critic, seqs, attn, prompt_len):
    """V(s_t) for each response token (B, R): the critic's value head only, no language-model head."""
    return critic.scalar(critic.hidden_states(seqs, attn)[:, prompt_len - 1:-1]).float()


def response_mask(responses, eot_token):
    """1 on response tokens up to and including the first end-of-text, 0 after it."""
    is_eot = (responses == eot_token).long()
    after_eot = (is_eot.cumsum(dim=1) - is_eot) > 0
    return (~after_eot).float()


def task_scorer(tok, recent, window, task=None):
    """The task's judge as a reward (tasks/pycode.py, unless another task module is given): 1.0 for each response
    that solves its prompt, else 0.0. The last `window` responses scored before (`recent`, [prompt, text] pairs, kept
    in the checkpoint) are judged beside each batch, so that a body the policy gives to prompts of different
    rollouts counts as a template. Under torchrun every process judges the responses of all of them together, as
    one process would the whole batch, and keeps the scores of its own share; `recent` is the same in each."""
    task = task or tasks.load("pycode")

    def score(prompts, responses, mask):
        texts = [tok.decode([t for t, keep in zip(row, m) if keep and t != tok.eot_token])
                 for row, m in zip(responses.tolist(), mask.tolist())]
        ended = (responses == tok.eot_token).any(dim=1).tolist()
        prompts, texts, ended = unshard(prompts), unshard(texts), unshard(ended)  # every process's, in batch order
        scores = task.reward(prompts, texts, ended, context=[tuple(pair) for pair in recent[-window:]] if window else ())
        recent.extend([p, t] for p, t in zip(prompts, texts))
        del recent[:-window or len(recent)]
        return torch.tensor(shard(scores))
    return score


def evaluate(policy, ref, reward_model, tok, eval_set, cfg, rt):
    """The task's held-out measures (tasks/<cfg.task>.py) of the policy, with the reward model's mean score of its
    greedy completions and the KL to the reference from sampled ones."""
    scorer = rm_scorer(reward_model, tok, rt) if reward_model is not None else None
    return tasks.load(cfg.task).evaluate_policy(policy, tok, eval_set, cfg.max_new_tokens, rt.device, rt.autocast,
                                                samples=cfg.eval_samples, ref_model=ref, seed=cfg.seed, scorer=scorer)


def main(argv=None, score_fn=None):
    """score_fn(prompt texts, response ids, response mask) -> scores, when given, replaces the reward model
    (the tests use a toy reward with a known optimum)."""
    cfg, rt = start_stage(Config, argv, "train_ppo.py", stage="ppo")
    task = tasks.load(cfg.task)
    for key in ("batch_size", "minibatch_size"):
        if getattr(cfg, key) % rt.world_size:
            raise UserError(f"{key}={getattr(cfg, key)} must be divisible by the number of processes ({rt.world_size})")

    # ---- the four models: policy (trained), critic (trained), reference (frozen SFT), reward model (frozen)
    resuming = cfg.init_from == "resume"
    sft_source = cfg.init_from
    ckpt = None
    if resuming:
        _, ckpt = resume_checkpoint(cfg.out_dir, "ppo", "PPO run")
        sft_source = ckpt.get("sft_source", ckpt["config"]["init_from"])  # where the run began, resumed or not
    hint = "make it with `python train_sft.py config/sft_small.py`"
    sft_ckpt = load_checkpoint(sft_source, hint=hint)
    tok = get_tokenizer(sft_ckpt["tokenizer"])
    shared = cfg.critic == "shared"
    policy = model_from_checkpoint(sft_ckpt, sft_source, dropout=0.0, scalar_head=shared)
    ref = model_from_checkpoint(sft_ckpt, sft_source, dropout=0.0, scalar_head=False).eval().requires_grad_(False)
    recent = list(ckpt.get("recent", [])) if ckpt else []  # the task reward's memory of earlier responses
    if score_fn is None and cfg.reward == "task":
        if not hasattr(task, "reward"):
            raise UserError(f"the task {cfg.task!r} has no judge to reward with (tasks/{cfg.task}.py has no reward()); "
                            f"use reward='model'")
        score_fn = task_scorer(tok, recent, cfg.template_window, task)
    reward_model, rm_stats, critic = None, (0.0, 1.0), None
    if score_fn is None or not shared:
        rm_ckpt = load_checkpoint(cfg.reward_model, hint="make it with `python train_rm.py config/rm_small.py`")
        if not rm_ckpt["model_args"].get("scalar_head"):
            raise UserError(f"{cfg.reward_model} holds a {rm_ckpt.get('stage', '?')!r} model without a scalar head, "
                            f"not a reward model; make one with `python train_rm.py config/rm_small.py`")
        if rm_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
            raise UserError(f"the reward model uses the {tokenizer_name(rm_ckpt['tokenizer'])!r} tokenizer but the "
                            f"policy uses {tokenizer_name(sft_ckpt['tokenizer'])!r}; train both from the same "
                            f"pretraining run")
        rm_stats = (rm_ckpt.get("reward_mean", 0.0), max(rm_ckpt.get("reward_std", 1.0), 1e-6))
        if score_fn is None:
            reward_model = model_from_checkpoint(rm_ckpt, cfg.reward_model, dropout=0.0).eval().requires_grad_(False)
        if not shared:  # the critic starts as the reward model: it already knows what a good response looks like
            critic = model_from_checkpoint(rm_ckpt, cfg.reward_model, dropout=0.0)
    if ckpt is not None:
        policy.load_state_dict(ckpt["model"])
        if critic is not None and ckpt.get("critic") is not None:
            critic.load_state_dict(ckpt["critic"])
    for m in (policy, ref, reward_model, critic):
        if m is not None:
            m.to(rt.device)
    trained = [policy] + ([critic] if critic is not None else [])
    same_weights_everywhere(*trained)  # the shared critic's fresh value head, above all
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(0.9, 0.95), fused=rt.device_type in ("cpu", "cuda"))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    start_iter = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        kl_ctl.beta, start_iter = ckpt["kl_coef"], ckpt["iter_num"]
        set_rng_state(ckpt["rng"])
        print(f"resuming from {cfg.out_dir}/ckpt.pt at iteration {start_iter}")
    ptx_data = None
    if cfg.ptx_coef > 0:
        ptx_data = TokenBatches(dataset_dir(cfg.ptx_dataset), "train", policy.config.block_size - 1,
                                cfg.ptx_batch_size, rt.device, tokenizer=tok.spec)

    # ---- prompts
    max_prompt = policy.config.block_size - cfg.max_new_tokens
    # raw prompts are what the task's judge reads; prompt_ids what the policy reads (the template applied)
    prompts, _, prompt_ids, dropped = read_prompts(cfg.prompts_file, tok, cfg.template, max_prompt)
    eval_set = task.read_eval_set(cfg.eval_prompts, tok, cfg.template, max_prompt, cfg.eval_max_prompts)
    show = tasks.shown(task, eval_set.prompts, cfg.eval_samples_shown)  # the held-out prompts the report shows
    print(f"{len(prompts)} rollout prompts ({dropped} longer than {max_prompt} tokens dropped), "
          f"{len(eval_set.prompts)} evaluation prompts ({eval_set.dropped} dropped); policy "
          f"{policy.get_num_params() / 1e6:.2f}M "
          f"parameters, critic {cfg.critic}, reward {cfg.reward}")

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
            "stage": "ppo", "model_args": asdict(policy.config), "model": policy.state_dict(),
            "critic": critic.state_dict() if critic is not None else None, "optimizer": optimizer.state_dict(),
            "iter_num": iter_num, "kl_coef": kl_ctl.beta, "config": asdict(cfg), "rng": rng_state(),
            "tokenizer": tok.spec, "before": before, "template": cfg.template, "sft_source": sft_source,
            "eval": last_eval, "completions": after_completions, "recent": recent})

    with StopRequest() as stop:
        for it in range(start_iter, cfg.max_iters + 1):
            # ---- evaluate: before any update, every eval_interval, at the end
            at_end = it == cfg.max_iters or stop.requested
            due = evaluation_due(it, cfg.eval_interval, cfg.eval_at_start)
            if (due or at_end) and not (ckpt and it == start_iter):
                # the evaluation at iteration 0 is the SFT model's: its own reference (KL 0, not estimated)
                last_eval, completions = evaluate(policy, ref if it > 0 else policy, reward_model, tok, eval_set, cfg,
                                                  rt)
                if it == 0:
                    before = {"metrics": last_eval, "completions": [completions[i] for i in show]}
                print(f"eval @ {it}: {task.describe(last_eval)}; RM score {last_eval.get('rm_score', float('nan')):.3f}",
                      flush=True)
                metrics.log(iter=it, **{f"eval_{k}": v for k, v in last_eval.items()})
                after_completions = [completions[i] for i in show]
                save(it)
            if at_end:
                break

            t0 = time.time()
            # ---- 1. rollout: sample responses with plain temperature sampling (no top-k/top-p), so that the
            # log-probs kept with them, log pi_old, are those of the distribution the tokens were drawn from
            cpu_generator.manual_seed(cfg.seed * 100_003 + it)  # rollouts are a pure function of (seed, iteration)
            generator.manual_seed(cfg.seed * 100_003 + it + rt.rank * 1_000_000_007)  # (and rank: a stream each)
            pick = shard(torch.randint(len(prompts), (cfg.batch_size,), generator=cpu_generator).tolist())
            prompt_batch, prompt_mask = pad_left([prompt_ids[i] for i in pick], tok.eot_token)
            prompt_batch, prompt_mask = prompt_batch.to(rt.device), prompt_mask.to(rt.device)
            policy.eval()
            with torch.no_grad(), rt.autocast:
                # the shared critic's values V(s_t) come from the same pass: the value head reads the policy's states
                seqs, logprobs, *rollout_values = policy.generate(
                    prompt_batch, cfg.max_new_tokens, attention_mask=prompt_mask, temperature=cfg.temperature,
                    eot_token=tok.eot_token, generator=generator, return_logprobs=True, return_values=shared)
            P = prompt_batch.size(1)
            responses = seqs[:, P:]
            mask = response_mask(responses, tok.eot_token)
            attn = torch.cat([prompt_mask, mask.long()], dim=1)
            has_eot = (responses == tok.eot_token).any(dim=1)
            t1 = time.time()

            # ---- 2. score each response, and the values and reference log-probs the update needs (no gradients)
            with torch.no_grad(), rt.autocast:
                values = rollout_values[0] if shared else response_values(critic, seqs, attn, P)
                ref_logprobs, _, _ = response_logprobs(ref, seqs, attn, P, cfg.temperature)
                if score_fn is not None:
                    scores = score_fn([prompts[i] for i in pick], responses, mask).float().to(rt.device)
                else:
                    raw = reward_at_last_token(reward_model, seqs, attn)
                    scores = (raw - rm_stats[0]) / rm_stats[1] if cfg.score_norm else raw
                if cfg.score_clip > 0:
                    scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
                scores = scores + cfg.missing_eot_penalty * (~has_eot).float()

                # ---- 3. per-token rewards: the KL penalty everywhere, the score at the last token
                rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.beta)
                # ---- 4. advantages by GAE; returns are the critic's targets; advantages whitened over the batch
                advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
                advantages = masked_whiten(advantages, mask)
            t2 = time.time()

            # ---- 5. update: several epochs of clipped-objective steps on shuffled minibatches of this rollout
            policy.train()
            stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [], "entropy": [], "ptx": []}
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(len(pick), generator=cpu_generator).to(rt.device)
                epoch_kl = []
                for mb in order.split(cfg.minibatch_size // rt.world_size):
                    with rt.autocast:
                        new_logprobs, new_values, entropy = response_logprobs(
                            policy, seqs[mb], attn[mb], P, cfg.temperature, with_values=shared,
                            with_entropy=cfg.entropy_coef > 0)
                        if critic is not None:
                            new_values = response_values(critic, seqs[mb], attn[mb], P)
                    pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, logprobs[mb], advantages[mb], mask[mb],
                                                               cfg.clip_range)
                    vf_loss = value_loss(new_values, values[mb], returns[mb], mask[mb], cfg.clip_range_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if entropy is not None:  # a bonus for keeping the distribution spread out: exploration
                        ent = masked_mean(entropy, mask[mb])
                        loss = loss - cfg.entropy_coef * ent
                        stats["entropy"].append(ent.item())
                    if ptx_data is not None:  # keep the pretraining objective alive (InstructGPT's PPO-ptx)
                        x, y = ptx_data.get(cpu_generator)
                        with rt.autocast:
                            _, ptx_loss = policy(x, y)
                        loss = loss + cfg.ptx_coef * ptx_loss
                        stats["ptx"].append(ptx_loss.item())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    guard.record(it + 1, loss, grad_norm)
                    optimizer.step()
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(vf_loss.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["approx_kl"].append(approx_kl.item())
                    epoch_kl.append(approx_kl.item())
                if cfg.early_stop_kl > 0 and all_reduce_mean(sum(epoch_kl) / len(epoch_kl)) > cfg.early_stop_kl:
                    break  # the policy already moved far from the one that collected the rollout
            t3 = time.time()

            guard.check()  # an update that went nan or inf stops the run before the next rollout samples from it
            # ---- bookkeeping: the adaptive controller sees the KL of this rollout, per response (of the whole
            # batch under torchrun: every process must take the same beta)
            kl_per_response = all_reduce_mean(kl.sum(dim=1).mean().item())
            if cfg.adaptive_kl:
                kl_ctl.update(kl_per_response, cfg.batch_size)
            explained_var = 1 - masked_mean((returns - values) ** 2, mask) / masked_mean(
                (returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8)
            if not stats["entropy"]:  # no entropy bonus: estimate it from the sampled tokens' log-probs, for free
                stats["entropy"].append(-masked_mean(logprobs, mask).item())
            row = {"iter": it + 1, "score": scores.mean().item(), "kl": kl_per_response, "beta": kl_ctl.beta,
                   **{k: sum(v) / len(v) for k, v in stats.items() if v},
                   "explained_variance": explained_var.item(), "response_length": mask.sum(1).mean().item(),
                   "no_eot_share": (~has_eot).float().mean().item(), "rollout_s": t1 - t0, "score_s": t2 - t1,
                   "update_s": t3 - t2}
            row = mean_over_processes(row)  # each share holds as many responses: the whole batch's means
            metrics.log(**row)
            if (it + 1) % cfg.log_interval == 0:
                eta = (time.time() - t_start) / (it + 1 - start_iter) * (cfg.max_iters - it - 1)
                print(f"iter {it + 1}/{cfg.max_iters}: score {row['score']:+.3f}, KL {row['kl']:.3f}, beta {row['beta']:.3f}, "
                      f"entropy {row['entropy']:.2f}, pg {row['policy_loss']:+.4f}, vf {row['value_loss']:.4f}, "
                      f"clip {row['clipfrac']:.3f}, akl {row['approx_kl']:.4f}, ev {row['explained_variance']:+.2f}, "
                      f"len {row['response_length']:.1f}, no-eot {row['no_eot_share']:.2f} | rollout {t1 - t0:.2f}s "
                      f"score {t2 - t1:.2f}s update {t3 - t2:.2f}s | eta {format_duration(eta)}", flush=True)

    # ---- the report: before/after table, curves, samples
    before = before or {"metrics": {}, "completions": []}  # eval_at_start=False: the SFT model not evaluated here
    table = write_report(cfg, before, last_eval, after_completions, eval_set.inputs, show, task) if rt.is_master else ""
    print(table)
    print(f"done in {format_duration(time.time() - t_start)}; wrote {cfg.out_dir}/ckpt.pt, metrics.jsonl, ppo.png, "
          f"report.md")
    return {"before": before["metrics"], "after": last_eval}


def write_report(cfg, before, after, after_completions, eval_texts, show, task):
    rows = [("RM score mean", "rm_score")] + task.MEASURES + [("KL to SFT (nats/response)", "kl")]
    rows += [(f"pass@{cfg.eval_samples}, functions with arguments", f"pass@{cfg.eval_samples}_args")]
    table = before_after_table(before["metrics"], after, rows, "PPO")
    records = read_jsonl_records(os.path.join(cfg.out_dir, "metrics.jsonl"))
    train = [r for r in records if "score" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    series = lambda rs, key: ([r["iter"] for r in rs if key in r], [r[key] for r in rs if key in r])
    panels = {"rollout score (reward)": {"score": series(train, "score")},
              "KL to SFT (nats/response)": {"rollout": series(train, "kl"), "held-out": series(evals, "eval_kl")},
              "held-out prompts": {label: series(evals, f"eval_{key}") for label, key in task.CURVES}}
    if any("eval_rm_score" in r for r in evals):
        panels["reward model's score, held-out"] = {"RM score": series(evals, "eval_rm_score")}
    plot_curves(os.path.join(cfg.out_dir, "ppo.png"), panels, f"PPO ({cfg.reward} reward, seed {cfg.seed}): "
                                                              f"{cfg.out_dir}")
    write_before_after(cfg.out_dir, "PPO", f"reward: {cfg.reward}; {len(eval_texts)} held-out prompts, greedy "
                       f"completions (KL and pass@k from sampled ones)", table, "ppo.png", before,
                       {"metrics": after, "completions": after_completions}, [eval_texts[i] for i in show])
    return table


if __name__ == "__main__":
    main()
