"""
Direct Preference Optimization (DPO): learn from preference pairs directly, with no reward model and no RL.

RLHF maximises E[r(x, y)] - beta * KL(pi || pi_ref). That objective's optimum has a closed form,
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), which read backwards says which reward a policy is optimal
for: r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + beta log Z(x). Put that *implicit reward* into the reward
model's Bradley-Terry loss: Z(x) is the same for both responses to a prompt and cancels, and what is left is a
loss on the policy itself, trained like SFT on fixed data:

    L_DPO = -log sigma(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

log pi(y|x) is the sum of the log-probabilities of the response's tokens; the prompt is only context. The
reference pi_ref is the frozen SFT model the policy starts from, and beta sets how far the policy may move from
it: the smaller beta, the larger the log-ratios it needs for the same loss.
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".)

The loss only asks the chosen response to gain on the rejected one. When the two differ in a token or two, as
many of our pairs do (one more space of indent, a bracket left out), plain DPO lowers the likelihood of both, and
here the greedy completions start to break their indentation. DPO-Positive (--dpop_lambda; Pal et al. 2024,
"Smaug") adds a penalty for every nat a chosen response loses against the reference; config/dpo_small.py uses it.

It reads the reward model's preference pairs (ours, or HH-RLHF's) and reports at every log and eval interval the
loss, the implicit reward accuracy (how often r(x, y_w) > r(x, y_l)), the margin r(x, y_w) - r(x, y_l), and the
drift from the reference (the log-ratio log pi/pi_ref of the chosen responses); before, during and after
training, the task's held-out measures (tasks/pycode.py), as every stage takes them (report.md, dpo.png).

Run (after train_sft.py; about 2 minutes on a 2-core laptop CPU; no reward model needed):
    python train_dpo.py config/dpo_small.py
    python sample.py --out_dir=out/dpo_small --start=FILE:prompt.txt --greedy=True
Anthropic HH-RLHF pairs {"chosen", "rejected"} (full texts) are read too, with their task's measure (the reward
model's preference of the policy's responses over the SFT model's):
    python data/hh_rlhf/prepare.py && python train_dpo.py config/dpo_hh_gpt2.py
On several GPUs (or, to try it, 2 CPU processes): the pairs of a step are shared out, the losses are those of one
    torchrun --standalone --nproc_per_node=4 train_dpo.py config/dpo_hh_gpt2.py
Every key: python train_dpo.py --help
"""
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.nn import functional as F

import tasks
from common import (average_gradients, before_after_table, cosine_lr, evaluation_due, field, format_duration,
                    gather_objects, grad_scaler, load_checkpoint, mean_over_processes, Metrics, model_from_checkpoint,
                    NonFiniteGuard, optimizer_step, plot_curves, read_jsonl_records,
                    read_preference_pairs, resume_checkpoint, rng_state, RunConfig, save_checkpoint, set_rng_state,
                    shard, start_stage, StopRequest, UserError, write_before_after)
from tokenizer import get_tokenizer
from train_rm import batch_indices, encode_pairs, pair_metrics_by_kind, pairwise_loss, rm_scorer
from train_sft import sft_batch


@dataclass
class Config(RunConfig):
    out_dir: str = "out/dpo"  # where ckpt.pt, metrics.jsonl, dpo.png, report.md and before_after.json are written
    init_from: str = "out/sft_small"  # the SFT out_dir the policy and the frozen reference start from; or 'resume'
    max_iters: int = 200  # optimizer steps in total
    eval_interval: int = 50  # evaluate (held-out pairs, the task's measures) and save a checkpoint every this many steps
    eval_at_start: bool = True  # evaluate the SFT model first (pipeline.py: in one seed per stage, not in each)
    train_file: str = "data/pycode/pref_train.jsonl"  # pairs: ours {"prompt","chosen","rejected","kind"} or HH-RLHF
    val_file: str = "data/pycode/pref_val.jsonl"  # held-out pairs: loss, implicit accuracy, margin, drift per kind
    eval_prompts: str = "data/pycode/prompts_eval.jsonl"  # held-out prompts for the task's measures
    task: str = "pycode"  # the task module (tasks/<task>.py) that measures the policy on the eval prompts
    reward_model: str = "none"  # a train_rm.py out_dir the task may measure with (hh_rlhf does); 'none': no RM
    eval_max_prompts: int = field(0, min=0)  # complete this many of the eval prompts; 0 means all of them
    eval_samples: int = field(8, min=0)  # sampled completions per held-out prompt per evaluation: pass@k, KL to SFT
    template: Literal["none", "instruction"] = "none"  # prompt template, as used in SFT
    beta: float = field(0.1, above=0)  # the weight of the implicit KL to the reference: smaller lets the policy move more
    dpop_lambda: float = field(0.0, min=0)  # DPO-Positive: penalise a chosen response falling below the reference; 0: off
    max_new_tokens: int = field(96, min=1)  # completion length in evaluation: as in train_ppo.py, so the numbers compare
    batch_size: int = field(16, min=1)  # pairs per step (over all processes): chosen and rejected go through together
    eval_batch_size: int = field(32, min=1)  # pairs per forward pass in evaluation and for the reference log-probs
    learning_rate: float = field(5e-5, min=0)  # peak learning rate: small, the policy should stay near the SFT model
    min_lr: float = field(5e-6, min=0)  # the cosine schedule ends here
    warmup_iters: int = field(10, min=0)  # linear warm-up steps
    lr_decay_iters: int = field(0, min=0)  # the cosine reaches min_lr here; 0 means max_iters
    weight_decay: float = field(0.0, min=0)  # AdamW decay; 0: decay pulls towards zero, not towards the reference
    beta1: float = field(0.9, min=0, below=1)  # AdamW
    beta2: float = field(0.99, min=0, below=1)  # AdamW
    grad_clip: float = field(1.0, min=0)  # clip the global gradient norm to this; 0 turns clipping off
    dropout: float = field(0.0, min=0, below=1)  # dropout in the policy while training (never in the reference)
    eval_samples_shown: int = field(3, min=0)  # sample completions before and after written to the report


# --------------------------------------------------------------------------------------------------------------
# the math: sequence log-probabilities, the implicit reward, the DPO loss

def sequence_logprob(model, x, y):
    """(B,) log pi(y|x) of each row: the sum of the log-probabilities of its response tokens.

    x, y come from train_sft.sft_batch: y is -1 at prompt and padding positions, which add nothing to the sum
    (cross_entropy gives 0 where the target is ignore_index); the prompt still counts as the context each response
    token is predicted from. A sum, not a mean: log pi(y|x) of the whole response is what the derivation uses."""
    logits, _ = model(x)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
    return -nll.view(y.shape).sum(dim=1)


def implicit_reward(logp, ref_logp, beta):
    """r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)): the reward for which pi is the optimum of the KL-regularised
    RLHF objective (up to beta log Z(x), the same for every response to x, which cancels in a comparison)."""
    return beta * (logp - ref_logp)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta, dpop_lambda=0.0):
    """-log sigma(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]), the mean over pairs:
    the reward model's Bradley-Terry loss (train_rm.pairwise_loss) with the implicit reward in place of a learned one.
    Its gradient weighs each pair by sigma(r_l - r_w), how wrongly the implicit reward ranks it: pairs the policy
    already ranks right by a wide margin push little, so it does not drift further than the data asks.

    DPO-Positive (dpop_lambda > 0) subtracts beta * lambda * max(0, log pi_ref(y_w) - log pi(y_w)) from the chosen
    reward: a chosen response that became less likely than under the reference costs loss, however far the rejected
    one fell (plain DPO lets both fall, as long as the rejected one falls faster)."""
    r_chosen = implicit_reward(logp_chosen, ref_chosen, beta)
    if dpop_lambda > 0:
        r_chosen = r_chosen - dpop_lambda * beta * (ref_chosen - logp_chosen).clamp(min=0)
    return pairwise_loss(r_chosen, implicit_reward(logp_rejected, ref_rejected, beta))


def pair_stats(logp, ref_logp, beta, kinds, dpop_lambda=0.0):
    """The measures of pairs whose log-probs (n, 2) [chosen, rejected] under the policy and the reference are given:
    loss, the one trained on, and dpo_loss, -log sigma(r_w - r_l) without DPO-Positive's penalty; implicit accuracy,
    the share with r(x, y_w) > r(x, y_l) (a tie counts as wrong: at step 0, where the policy is the reference, every
    reward is 0 and the accuracy is 0, not a coin toss); margin, the mean r_w - r_l; drift, the mean log pi/pi_ref
    of the chosen responses (nats per response; drift_rejected: of the rejected ones). Per kind too."""
    logp, ref_logp = logp.detach().double(), ref_logp.detach().double()
    r = implicit_reward(logp, ref_logp, beta)
    by_kind = pair_metrics_by_kind(r[:, 0], r[:, 1], kinds)
    ratio = (logp - ref_logp).mean(dim=0)
    return {"loss": dpo_loss(logp[:, 0], logp[:, 1], ref_logp[:, 0], ref_logp[:, 1], beta, dpop_lambda).item(),
            "dpo_loss": pairwise_loss(r[:, 0], r[:, 1]).item(), "accuracy": by_kind["all"]["accuracy"],
            "margin": by_kind["all"]["margin"],
            "drift": ratio[0].item(), "drift_rejected": ratio[1].item(), "by_kind": by_kind}


# --------------------------------------------------------------------------------------------------------------
# data and the forward passes

def load_pairs(path, tok, template, block_size, split):
    """The pairs of a file, as train_rm.py encodes them; pairs longer than the context are dropped and counted."""
    data, dropped = encode_pairs(read_preference_pairs(path), tok, template, block_size)
    print(f"{split}: {len(data['kinds'])} pairs from {path}" + (
        f"; dropped {dropped} longer than the context ({block_size} tokens)" if dropped else ""))
    if not data["kinds"]:
        raise UserError(f"{path}: no pairs fit the model's context of {block_size} tokens")
    return data


def pairs_fingerprint(data):
    """A short hash of the encoded pairs, in order: the reference log-probs a checkpoint keeps are indexed by pair,
    so a resumed run must read the very same pairs."""
    return hashlib.sha256(repr((data["chosen"], data["rejected"])).encode()).hexdigest()[:16]


def pair_logprobs(model, data, index, pad_id, rt):
    """(len(index), 2): log pi(y_w|x) and log pi(y_l|x) of the pairs in index, chosen and rejected responses in one
    right-padded forward pass of 2 x len(index) rows (chosen rows first)."""
    rows = [(data[side][i][:data["prompt_len"][i]], data[side][i][data["prompt_len"][i]:])
            for side in ("chosen", "rejected") for i in index]
    x, y = sft_batch(rows, pad_id)
    with rt.autocast:
        logp = sequence_logprob(model, x.to(rt.device), y.to(rt.device))
    return torch.stack(logp.chunk(2), dim=1)


def merged(known):
    """known (n, 2), NaN where not computed, completed with what the other processes computed (under torchrun each
    computes the pairs of its own share of every batch): a pair computed by several processes keeps the value of the
    first of them. In one process, known itself."""
    parts = gather_objects(known)
    out = parts[0].clone()
    for part in parts[1:]:
        out = torch.where(out.isnan(), part, out)
    return out


@torch.no_grad()
def logprobs_of_pairs(model, data, batches, pad_id, rt, known=None):
    """Fill known (n, 2), NaN where not yet computed, with the log-probs of the pairs each batch of indices reads,
    batch by batch, leaving the pairs already there alone. The same pairs in the same batches give the same numbers
    to the last bit, which exact resume and the exact log 2 at step 0 rely on."""
    known = torch.full((len(data["kinds"]), 2), float("nan")) if known is None else known
    for index in batches:
        new = [i for i in index if known[i, 0].isnan()]
        if new:
            known[new] = pair_logprobs(model, data, new, pad_id, rt).float().cpu()
    return known


def eval_batches(data, batch_size):
    """The held-out pairs in batches of similar length (less padding), always the same batches."""
    lengths = [max(len(w), len(l)) for w, l in zip(data["chosen"], data["rejected"])]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------------------
# evaluation: the held-out pairs, and the task's measures as every stage takes them

def evaluate(policy, ref, val, ref_val, val_batches, eval_set, tok, task, scorer, cfg, rt):
    """Loss, implicit accuracy, margin and drift on the held-out pairs; the task's measures of the policy on the
    held-out prompts and the KL to the reference (tasks/pycode.py), so that SFT, PPO and DPO are measured alike.
    Under torchrun each process computes a share of the held-out batches (val_batches is this process's share)."""
    policy.eval()
    logp = merged(logprobs_of_pairs(policy, val, val_batches, tok.eot_token, rt))
    stats = pair_stats(logp, ref_val, cfg.beta, val["kinds"], cfg.dpop_lambda)
    gold, completions = task.evaluate_policy(policy, tok, eval_set, cfg.max_new_tokens, rt.device, rt.autocast,
                                             samples=cfg.eval_samples, ref_model=ref, scorer=scorer, seed=cfg.seed)
    policy.train()
    by_kind = stats.pop("by_kind")
    result = {**{f"val_{k}": v for k, v in stats.items()}, **gold,
              "val_accuracy_by_kind": {k: s["accuracy"] for k, s in by_kind.items() if k != "all"},
              "val_margin_by_kind": {k: s["margin"] for k, s in by_kind.items() if k != "all"}}
    return result, completions


def describe(m, task):
    kinds = ", ".join(f"{k} {a:.2f}" for k, a in sorted(m["val_accuracy_by_kind"].items()))
    penalty = f" (without the penalty {m['val_dpo_loss']:.4f})" if m["val_dpo_loss"] != m["val_loss"] else ""
    return (f"val loss {m['val_loss']:.4f}{penalty}, implicit accuracy {m['val_accuracy']:.3f} ({kinds}), margin "
            f"{m['val_margin']:+.3f}, drift {m['val_drift']:+.2f} (rejected {m['val_drift_rejected']:+.2f}) nats; "
            f"{task.describe(m)}")


def report_rows(task):
    return task.MEASURES + [("KL to SFT (nats/response)", "kl"), ("val loss", "val_loss"),
                            ("val loss without penalty", "val_dpo_loss"),
                            ("val implicit accuracy", "val_accuracy"), ("val implicit margin", "val_margin"),
                            ("val drift (chosen, nats)", "val_drift"),
                            ("val drift (rejected, nats)", "val_drift_rejected")]


def plot(cfg, path, task):
    records = read_jsonl_records(os.path.join(cfg.out_dir, "metrics.jsonl"))
    series = lambda key: tuple(zip(*[(r["iter"], r[key]) for r in records if key in r])) or ((), ())
    accuracy = {"train": series("train_accuracy"), "val": series("val_accuracy")}
    for kind in sorted({k for r in records for k in r.get("val_accuracy_by_kind", {})}):
        accuracy[f"val: {kind}"] = tuple(zip(*[(r["iter"], r["val_accuracy_by_kind"][kind]) for r in records
                                               if kind in r.get("val_accuracy_by_kind", {})]))
    loss = {"train": series("train_loss"), "val": series("val_loss")}
    if cfg.dpop_lambda > 0:  # the loss trained on has DPO-Positive's penalty in it; here is the DPO loss alone
        loss["train, without the penalty"] = series("train_dpo_loss")
        loss["val, without the penalty"] = series("val_dpo_loss")
    panels = {"DPO loss": loss,
              "implicit reward accuracy (r_w > r_l)": accuracy,
              "margin and drift (val)": {"margin r_w - r_l": series("val_margin"),
                                         "drift: log pi/pi_ref, chosen": series("val_drift"),
                                         "log pi/pi_ref, rejected": series("val_drift_rejected")},
              "held-out prompts": {label: series(key) for label, key in task.CURVES}}
    plot_curves(path, panels, f"DPO (beta {cfg.beta}, dpop_lambda {cfg.dpop_lambda}): {cfg.out_dir}")


# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg, rt = start_stage(Config, argv, "train_dpo.py", stage="dpo")
    task = tasks.load(cfg.task)
    if cfg.batch_size % rt.world_size:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({rt.world_size})")

    # ---- the two models, both the SFT model at the start: the policy (trained) and the reference (frozen)
    ckpt, sft_source = None, cfg.init_from
    if cfg.init_from == "scratch":
        raise UserError("DPO fine-tunes an SFT model: set init_from to an SFT out_dir (e.g. out/sft_small, made by "
                        "`python train_sft.py config/sft_small.py`) or 'resume'")
    if cfg.init_from == "resume":
        path, ckpt = resume_checkpoint(cfg.out_dir, "dpo", "DPO run")
        if ckpt["template"] != cfg.template:
            raise UserError(f"{path} was trained with template={ckpt['template']!r}, not {cfg.template!r}; resume "
                            f"with the same template or use a new out_dir")
        sft_source = ckpt.get("sft_source", ckpt["config"]["init_from"])  # where the run began, resumed or not
    sft_ckpt = load_checkpoint(sft_source, hint="make it with `python train_sft.py config/sft_small.py`")
    policy = model_from_checkpoint(ckpt or sft_ckpt, cfg.out_dir if ckpt else sft_source, dropout=cfg.dropout,
                                   scalar_head=False)
    ref = model_from_checkpoint(sft_ckpt, sft_source, dropout=0.0, scalar_head=False).eval().requires_grad_(False)
    policy.to(rt.device)
    ref.to(rt.device)
    tok = get_tokenizer(sft_ckpt["tokenizer"])
    block_size = policy.config.block_size
    scorer = None  # the reward model, for a task that measures policies with it
    if cfg.reward_model != "none":
        rm_ckpt = load_checkpoint(cfg.reward_model, hint="make it with train_rm.py")
        if not rm_ckpt["model_args"].get("scalar_head") or rm_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
            raise UserError(f"{cfg.reward_model} is not a reward model with the policy's tokenizer; make one with "
                            f"train_rm.py from the same pretraining run")
        reward_model = model_from_checkpoint(rm_ckpt, cfg.reward_model, dropout=0.0).eval().requires_grad_(False)
        scorer = rm_scorer(reward_model.to(rt.device), tok, rt)

    # ---- data: the reward model's pairs, and the held-out prompts train_ppo.py evaluates on
    train = load_pairs(cfg.train_file, tok, cfg.template, block_size, "train")
    val = load_pairs(cfg.val_file, tok, cfg.template, block_size, "val")
    lengths = tuple(max(len(w), len(l)) for w, l in zip(train["chosen"], train["rejected"]))
    train_pairs = pairs_fingerprint(train)
    eval_set = task.read_eval_set(cfg.eval_prompts, tok, cfg.template, block_size - cfg.max_new_tokens,
                                  cfg.eval_max_prompts)
    show = tasks.shown(task, eval_set.prompts, cfg.eval_samples_shown)  # the held-out prompts the report shows
    print(f"{cfg.eval_prompts}: {len(eval_set.prompts)} held-out prompts ({eval_set.dropped} longer than "
          f"{block_size - cfg.max_new_tokens} tokens dropped); policy {policy.get_num_params() / 1e6:.2f}M parameters "
          f"from {sft_source}, beta {cfg.beta}, {cfg.max_iters * cfg.batch_size / len(lengths):.1f} epochs of "
          f"{len(lengths)} pairs, {rt.device} {rt.dtype}, {rt.world_size} process(es)")

    # ---- optimizer, and the state of an interrupted run
    scaler = grad_scaler(rt)
    optimizer = policy.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                            rt.device_type)
    iter_num, before, last, last_completions = 0, None, {}, []
    ref_train = None
    if ckpt is not None:  # init_from='resume': continue exactly where the checkpoint left off
        if ckpt["train_pairs"] != train_pairs:
            raise UserError(f"{cfg.train_file} no longer holds the pairs {cfg.out_dir}/ckpt.pt was trained on (the "
                            f"reference log-probs saved with it are theirs); resume with that file or a new out_dir")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, before, last, last_completions = ckpt["iter_num"], ckpt["before"], ckpt["eval"], ckpt["completions"]
        ref_train = ckpt["ref_train"]
        set_rng_state(ckpt["rng"])
        print(f"resuming from {cfg.out_dir}/ckpt.pt at step {iter_num}")

    # ---- the reference's log-probs, once per pair, before the first step. The reference is frozen, so
    # log pi_ref(y|x) of a pair is a constant of the data: computing it in every step would spend a forward pass of
    # a second model per step for numbers that never change, and a pair read again in a later epoch would pay
    # again. The run's batches are known in advance (a pure function of seed and step), so exactly the pairs the
    # run will read are computed, in the batches that first read them; the checkpoint keeps them for a resume.
    # Under torchrun each process computes those of its own share of each batch, and of the held-out batches.
    t0 = time.time()
    run_batches = [shard(batch_indices(cfg.seed, s, cfg.batch_size, lengths)) for s in range(iter_num, cfg.max_iters)]
    ref_train = logprobs_of_pairs(ref, train, run_batches, tok.eot_token, rt, known=ref_train)
    val_batches = shard(eval_batches(val, cfg.eval_batch_size))
    ref_val = merged(logprobs_of_pairs(ref, val, val_batches, tok.eot_token, rt))
    print(f"reference log-probs of {int((~ref_train[:, 0].isnan()).sum())} training and {len(val['kinds'])} held-out "
          f"pairs in {format_duration(time.time() - t0)}")
    raw_policy = policy
    if cfg.compile:
        print("compiling the policy (the first steps take a while)...")
        policy = torch.compile(policy, dynamic=True)  # dynamic: every batch has its own length

    # ---- the training loop
    metrics = Metrics(cfg.out_dir, resume_iter=iter_num if ckpt else None, enabled=rt.is_master)
    resumed_at = iter_num if ckpt else None  # that step's evaluation is already in the metrics and checkpoint
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    interval = {"loss": 0.0, "dpo_loss": 0.0, "accuracy": 0.0, "margin": 0.0, "drift": 0.0}
    interval_iters, interval_time = 0, 0.0
    guard = NonFiniteGuard(cfg.learning_rate, scaler, rt.device)
    t_start = time.time()
    with StopRequest() as stop:
        while True:
            lr = cosine_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate and checkpoint: at the start (the SFT model), every eval_interval steps and at the end
            at_end = iter_num >= cfg.max_iters or stop.requested
            due = evaluation_due(iter_num, cfg.eval_interval, cfg.eval_at_start)
            if (due or at_end) and iter_num != resumed_at:
                guard.check()  # a step that went nan or inf stops the run here, before evaluating or saving
                t0 = time.time()
                # the evaluation at step 0 is the SFT model's: its own reference (KL 0, not estimated)
                last, completions = evaluate(raw_policy, ref if iter_num > 0 else raw_policy, val, ref_val, val_batches,
                                             eval_set, tok, task, scorer, cfg, rt)
                last_completions = [completions[i] for i in show]
                if iter_num == 0:
                    before = {"metrics": last, "completions": last_completions}
                print(f"step {iter_num}: {describe(last, task)} ({format_duration(time.time() - t0)})", flush=True)
                metrics.log(iter=iter_num, **last)
                every_ref_train = merged(ref_train)  # under torchrun, every process's pairs
                if rt.is_master:  # every process holds the same weights: one writes them
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                        "stage": "dpo", "model_args": asdict(raw_policy.config), "model": raw_policy.state_dict(),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
                        "config": asdict(cfg), "rng": rng_state(), "tokenizer": tok.spec, "template": cfg.template,
                        "before": before, "eval": last, "completions": last_completions, "ref_train": every_ref_train,
                        "train_pairs": train_pairs, "sft_source": sft_source})
            if at_end:
                break

            # one optimizer step on the pairs this step always gets (under torchrun, this process's share of them:
            # every share holds as many pairs, so the mean of the processes' mean losses is the batch's mean loss)
            t0 = time.time()
            index = shard(batch_indices(cfg.seed, iter_num, cfg.batch_size, lengths))
            logp = pair_logprobs(policy, train, index, tok.eot_token, rt)  # with gradients: the policy moves
            ref_logp = ref_train[index].to(rt.device)  # looked up: computed once, before the loop
            loss = dpo_loss(logp[:, 0], logp[:, 1], ref_logp[:, 0], ref_logp[:, 1], cfg.beta, cfg.dpop_lambda)
            scaler.scale(loss).backward()
            average_gradients(policy.parameters())
            grad_norm = optimizer_step(optimizer, scaler, policy.parameters(), cfg.grad_clip)
            guard.record(iter_num + 1, loss, grad_norm)
            stats = pair_stats(logp, ref_logp, cfg.beta, [train["kinds"][i] for i in index], cfg.dpop_lambda)
            for key in interval:
                interval[key] += stats[key]
            interval_time += time.time() - t0
            interval_iters += 1
            iter_num += 1

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                guard.check()
                record = mean_over_processes({f"train_{k}": v / interval_iters for k, v in interval.items()})
                dt = interval_time / interval_iters
                print(f"iter {iter_num}/{cfg.max_iters}: loss {record['train_loss']:.4f}, implicit accuracy "
                      f"{record['train_accuracy']:.3f}, margin {record['train_margin']:+.3f}, drift "
                      f"{record['train_drift']:+.2f} nats, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"eta {format_duration((cfg.max_iters - iter_num) * dt)}", flush=True)
                metrics.log(iter=iter_num, **record, lr=lr, ms_per_iter=dt * 1000)
                interval = dict.fromkeys(interval, 0.0)
                interval_iters, interval_time = 0, 0.0

    # ---- the end: the before/after table (printed, report.md, before_after.json), the curves, samples
    before = before or {"metrics": {}, "completions": []}  # eval_at_start=False: the SFT model not evaluated here
    table = before_after_table(before["metrics"], last, report_rows(task), "DPO")
    intro = (f"beta {cfg.beta}, dpop_lambda {cfg.dpop_lambda}; {len(eval_set.inputs)} held-out prompts, greedy completions "
             f"(KL from sampled ones); val: {len(val['kinds'])} held-out pairs")
    if rt.is_master:
        plot(cfg, os.path.join(cfg.out_dir, "dpo.png"), task)
        write_before_after(cfg.out_dir, "DPO", intro, table, "dpo.png", before,
                           {"metrics": last, "completions": last_completions}, [eval_set.inputs[i] for i in show])
    print(table)
    print(f"done: step {iter_num} in {format_duration(time.time() - t_start)}; wrote {cfg.out_dir}/ckpt.pt, "
          f"metrics.jsonl, dpo.png, report.md, before_after.json")
    return {"before": before["metrics"], "after": last}


if __name__ == "__main__":
    main()
