"""
Stage 2 of the recipe: a reward model. It learns, from pairs of responses a person (here: a program) ranked,
to give the better response of each pair the higher score.

A reward model is the GPT with its language-model head set aside and a scalar head added: a Linear(n_embd, 1)
read at the last real token of prompt + response + end-of-text. That position has attended to every token of
the text, so it is the one place where a judgement of the whole text can be read: r(x, y) is one number.

The loss is the pairwise (Bradley-Terry) loss: the model's probability that the chosen response y_w beats the
rejected one y_l is sigma(r(x, y_w) - r(x, y_l)), and we maximise its log-likelihood over the pairs:

    L = -log sigma(r(x, y_w) - r(x, y_l))            (with a margin m:  L = -log sigma(r_w - r_l - m))

Only differences of rewards enter the loss, so the scale's origin is arbitrary: the mean and standard deviation
of the rewards on held-out responses are saved in the checkpoint, and PPO uses them to standardise its scores.
With scored examples {"user_input", "completion", "score"} (ChatLLaMA's format) the loss is pointwise instead,
the mean squared error (r(x, y) - score)^2 (--loss=mse), or, for labels 1 and 0 (a positive and a negative movie
review: data/imdb), the logistic loss -log sigma(r) and -log sigma(-r) (--loss=logistic): r is then a classifier's
log-odds that the text is positive, the sentiment reward of the IMDB recipe.

(Stiennon et al. 2020, "Learning to summarize from human feedback"; Ouyang et al. 2022, InstructGPT.)

Run (after train_sft.py; about 3 minutes on a 2-core laptop CPU):
    python train_rm.py config/rm_small.py
Anthropic HH-RLHF pairs {"chosen", "rejected"} (full texts) are read too:
    python data/hh_rlhf/prepare.py && python train_rm.py config/rm_hh_gpt2.py
A sentiment classifier on IMDB's labelled reviews, the reward of the IMDB recipe:
    python data/imdb/prepare.py && python train_rm.py config/rm_imdb_gpt2.py
On several GPUs (or, to try it, 2 CPU processes): the batch is shared out, the losses are those of one process
    torchrun --standalone --nproc_per_node=4 train_rm.py config/rm_hh_gpt2.py
Every key: python train_rm.py --help
"""
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common import (all_reduce_sum, average_gradients, batch_rows, batches_by_length, cosine_lr, encode_prompt_response, field,
                    format_duration, format_prompt, gpt2_weights, grad_scaler, load_checkpoint, mean_over_processes, Metrics,
                    micro_batch, model_from_checkpoint, NonFiniteGuard, optimizer_step, pad_right, plot_curves,
                    read_jsonl_records, read_preference_pairs, read_scored_examples, resume_checkpoint, rng_state,
                    RunConfig, same_weights_everywhere, save_checkpoint, set_rng_state, shard, start_stage, StopRequest,
                    UserError)
from tokenizer import get_tokenizer


@dataclass
class Config(RunConfig):
    out_dir: str = "out/rm"  # where ckpt.pt, metrics.jsonl and rm.png are written
    init_from: str = "out/sft_small"  # the SFT (or pretraining) out_dir whose GPT is the backbone; 'resume'; 'gpt2'...
    max_iters: int = 300  # optimizer steps in total
    eval_interval: int = 50  # evaluate on the held-out pairs and save a checkpoint every this many steps
    train_file: str = "data/pycode/pref_train.jsonl"  # pairs (ours or HH-RLHF), or scored examples with loss='mse';
    # several files: comma-separated, e.g. the made-up pairs and collect_pairs.py's pairs of the model's own samples
    val_file: str = "data/pycode/pref_val.jsonl"  # held-out data in the same format(s): accuracy and margin per kind
    template: Literal["none", "instruction"] = "none"  # prompt template, as used in SFT
    loss: Literal["pairwise", "mse", "logistic"] = "pairwise"  # -log sigma(r_w - r_l); (r - score)^2; labels 1/0
    mismatched: bool = False  # also pair each chosen response against another prompt's chosen response (extra rows)
    margin: float = field(0.0, min=0)  # m in -log sigma(r_w - r_l - m): the chosen response should win by at least m
    train_backbone: bool = True  # False trains the scalar head only, on the frozen features of the init model
    frozen_layers: int = field(0, min=0)  # keep the embeddings and the lowest this many blocks fixed: faster steps
    dropout: float = field(0.0, min=0, below=1)  # dropout in the backbone while training
    batch_size: int = field(16, min=1)  # pairs per step (over all processes): chosen and rejected go through together
    gradient_accumulation_steps: int = field(1, min=1)  # each process takes its share in this many micro-batches
    eval_batch_size: int = field(64, min=1)  # responses per forward pass in evaluation
    learning_rate: float = field(3e-4, min=0)  # peak learning rate of the backbone, after warm-up
    head_lr_mult: float = field(10.0, min=0)  # the fresh scalar head learns this many times faster than the backbone
    min_lr: float = field(3e-5, min=0)  # the cosine schedule ends here
    warmup_iters: int = field(20, min=0)  # linear warm-up steps
    lr_decay_iters: int = field(0, min=0)  # the cosine reaches min_lr here; 0 means max_iters
    weight_decay: float = field(0.1, min=0)  # AdamW decay, applied to matrices only
    beta1: float = field(0.9, min=0, below=1)  # AdamW
    beta2: float = field(0.99, min=0, below=1)  # AdamW
    grad_clip: float = field(1.0, min=0)  # clip the global gradient norm to this; 0 turns clipping off


# --------------------------------------------------------------------------------------------------------------
# the reward and the losses

def reward_at_last_token(model, ids, mask):
    """(B,) rewards: the scalar head read at the last real token of each row of ids (B, T); mask is 1 on real
    tokens. Attention is causal, so the last real token is the only position that has seen the whole prompt and
    response (and the end-of-text saying the response is over): the one place a verdict on all of it can be read.
    Padding, wherever it is, is never read."""
    # with padding on the right only, a real token never attends to the padding after it (attention is causal)
    # and its position is its index: the plain causal pass, faster than a masked one, gives the same hidden states
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    hidden = model.hidden_states(ids, None if right_padded else mask)
    T = mask.size(1)
    last = T - 1 - mask.flip(1).float().argmax(dim=1)  # the right-most position with mask == 1
    return model.scalar(hidden)[torch.arange(ids.size(0), device=ids.device), last].float()


def rm_scorer(reward_model, tok, rt):
    """rows [(prompt ids, response ids)] -> the reward model's raw scores, as the tasks' evaluate_policy takes a
    scorer: what PPO, GRPO and DPO report as the reward model's score of their completions."""
    @torch.no_grad()
    def scorer(rows):
        scores = torch.empty(len(rows), device=rt.device)
        for batch in batches_by_length([(len(p), len(r)) for p, r in rows], 64):
            seqs, attn, _ = batch_rows([rows[i] for i in batch], tok.eot_token, rt.device)
            with rt.autocast:
                scores[batch] = reward_at_last_token(reward_model, seqs, attn)
        return scores
    return scorer


def pairwise_loss(r_chosen, r_rejected, margin=0.0):
    """Bradley-Terry: P(chosen beats rejected) = sigma(r_w - r_l); the loss is its mean negative log:
    L = -log sigma(r_w - r_l - m). logsigmoid is -log(1 + e^-x), computed without overflow for large |x|."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def mse_loss(rewards, scores):
    """Pointwise regression onto given scores: L = mean (r(x, y) - score)^2."""
    return ((rewards - scores) ** 2).mean()


def logistic_loss(rewards, labels):
    """Pointwise classification of labels 1 and 0: r is the log-odds that the label is 1, P(1) = sigma(r), and the
    loss its mean negative log-likelihood, -log sigma(r) for a 1 and -log sigma(-r) for a 0 (binary cross-entropy).
    Trained on positive and negative reviews, r is a sentiment score: above 0, the classifier says positive."""
    return F.binary_cross_entropy_with_logits(rewards, labels)


def pair_metrics_by_kind(r_chosen, r_rejected, kinds):
    """{'all' and each kind: {'n', 'accuracy', 'margin'}}: accuracy is the share of pairs with r_chosen > r_rejected
    (a tie counts as wrong), margin the mean of r_chosen - r_rejected."""
    diff = (torch.as_tensor(r_chosen) - torch.as_tensor(r_rejected)).double()
    groups = {"all": list(range(len(kinds)))}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    out = {}
    for name, index in groups.items():
        d = diff[index]
        out[name] = {"n": len(index), "accuracy": (d > 0).double().mean().item(), "margin": d.mean().item()}
    return out


# --------------------------------------------------------------------------------------------------------------
# data: token ids of prompt + response + end-of-text; examples longer than the context are dropped and counted

def encode_pairs(pairs, tok, template, block_size):
    """Chosen and rejected token ids and the kind of each pair that fits the context; and the number dropped."""
    chosen, rejected, kinds, files, prompt_len, dropped = [], [], [], [], [], 0
    for pair in pairs:
        prompt = format_prompt(pair["prompt"], template)
        w = encode_prompt_response(tok, prompt, pair["chosen"], block_size)
        l = encode_prompt_response(tok, prompt, pair["rejected"], block_size)
        if w is None or l is None:
            dropped += 1
            continue
        chosen.append(w[0] + w[1])
        rejected.append(l[0] + l[1])
        kinds.append(pair["kind"])
        files.append(pair.get("file", ""))
        prompt_len.append(len(w[0]))
    return {"chosen": chosen, "rejected": rejected, "kinds": kinds, "files": files, "prompt_len": prompt_len}, dropped


def encode_scored(examples, tok, template, block_size):
    """Token ids and score of each scored example that fits the context; and the number dropped."""
    rows, scores, dropped = [], [], 0
    for prompt, completion, score in examples:
        pr = encode_prompt_response(tok, format_prompt(prompt, template), completion, block_size)
        if pr is None:
            dropped += 1
            continue
        rows.append(pr[0] + pr[1])
        scores.append(score)
    return {"rows": rows, "scores": scores}, dropped


def load_data(path, cfg, tok, block_size, split):
    """The encoded examples of one file, or of several given as a comma-separated list."""
    paths = [p.strip() for p in path.split(",") if p.strip()]
    if cfg.loss == "pairwise":
        data, dropped = encode_pairs([dict(x, file=p) for p in paths for x in read_preference_pairs(p)], tok,
                                     cfg.template, block_size)
        n, what = len(data["kinds"]), "pairs"
    else:
        data, dropped = encode_scored([x for p in paths for x in read_scored_examples(p)], tok, cfg.template,
                                      block_size)
        n, what = len(data["rows"]), "scored examples"
        if cfg.loss == "logistic" and set(data["scores"]) - {0.0, 1.0}:
            raise UserError(f"{path}: loss='logistic' learns labels 1 and 0, but the scores include "
                            f"{sorted(set(data['scores']) - {0.0, 1.0})[:3]}; use loss='mse' for other scores")
    print(f"{split}: {n} {what} from {path}" + (f"; dropped {dropped} longer than the context ({block_size} "
                                                  f"tokens)" if dropped else ""))
    if n == 0:
        raise UserError(f"{path}: no {what} fit the model's context of {block_size} tokens")
    return data


@functools.lru_cache(maxsize=2)
def epoch_batches(seed, epoch, lengths, batch_size):
    """One epoch's batches of example indices: a fresh shuffle, cut into batches of examples of similar length
    (every row of a batch is padded to its longest, so this wastes less compute on padding), in shuffled order.
    The n % batch_size examples left over (different ones each epoch) sit that epoch out."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 8 * batch_size  # sort by length within windows of 8 batches: a different mix every epoch
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def batch_indices(seed, iter_num, batch_size, lengths):
    """The examples of step iter_num, a pure function of (seed, step): a run resumed at step N reads exactly the
    batches an uninterrupted run would, with no data-loader state to save."""
    batch_size = min(batch_size, len(lengths))
    epoch, b = divmod(iter_num, len(lengths) // batch_size)
    return epoch_batches(seed, epoch, lengths, batch_size)[b]


def rewards_of_rows(model, rows, pad_id, device, autocast):
    """Rewards of a list of token-id rows, in one right-padded forward pass."""
    ids, mask = pad_right(rows, pad_id)
    with autocast:
        return reward_at_last_token(model, ids.to(device), mask.to(device))


@torch.no_grad()
def score_rows(model, rows, pad_id, batch_size, device, autocast):
    """Rewards of many rows, batched by length (little padding), returned in the original order."""
    model.eval()
    out = torch.zeros(len(rows))
    for index in shard(batches_by_length([len(r) for r in rows], batch_size)):  # under torchrun, a share each
        out[index] = rewards_of_rows(model, [rows[i] for i in index], pad_id, device, autocast).cpu()
    model.train()
    return all_reduce_sum(out)  # each row was scored by one process, and is 0 in the others' copies


def evaluate(model, data, cfg, pad_id, rt):
    """Held-out loss, accuracy and margin (overall and per kind) for pairs, loss and correlation for scores, loss and
    accuracy for labels; and the mean and std of the rewards of all held-out responses (saved for PPO's score
    normalisation). Under torchrun each process scores a share of the rows."""
    if cfg.loss == "pairwise":
        r = score_rows(model, data["chosen"] + data["rejected"], pad_id, cfg.eval_batch_size, rt.device, rt.autocast)
        r_w, r_l = r[:len(data["chosen"])], r[len(data["chosen"]):]
        by_kind = pair_metrics_by_kind(r_w, r_l, data["kinds"])
        result = {"val_loss": pairwise_loss(r_w, r_l, cfg.margin).item(), "val_accuracy": by_kind["all"]["accuracy"],
                  "val_margin": by_kind["all"]["margin"], "by_kind": by_kind}
        if len(set(data["files"])) > 1:  # several val files: the accuracy on each one too
            by_file = pair_metrics_by_kind(r_w, r_l, data["files"])
            result["val_accuracy_by_file"] = {f: m["accuracy"] for f, m in by_file.items() if f != "all"}
    else:
        r = score_rows(model, data["rows"], pad_id, cfg.eval_batch_size, rt.device, rt.autocast)
        scores = torch.tensor(data["scores"])
        corr = torch.corrcoef(torch.stack([r, scores]))[0, 1].item() if len(r) > 1 else float("nan")
        result = {"val_loss": mse_loss(r, scores).item(), "val_correlation": corr}
        if cfg.loss == "logistic":  # a classifier: its accuracy, r > 0 meaning label 1
            result = {"val_loss": logistic_loss(r, scores).item(), "val_correlation": corr,
                      "val_accuracy": ((r > 0).float() == scores).float().mean().item()}
    result["reward_mean"] = r.mean().item()
    result["reward_std"] = r.std().item() if len(r) > 1 else 1.0
    return result


def mismatched_rows(data, index, block_size):
    """Extra rejected responses: each prompt of the batch with the chosen response of the next pair in the batch.
    A response written for another prompt is a worse answer to this one, so (x_i, y_w_i) > (x_i, y_w_j) is one
    more preference pair for free, teaching the model to check that a response fits its prompt.
    Returns [(pair position in the batch, row)], leaving out rows too long for the context and identical texts."""
    out = []
    for k, i in enumerate(index):
        j = index[(k + 1) % len(index)]
        p = data["chosen"][i][:data["prompt_len"][i]]
        row = p + data["chosen"][j][data["prompt_len"][j]:]
        if len(row) <= block_size and row != data["chosen"][i]:
            out.append((k, row))
    return out


def train_step_loss(model, data, index, cfg, pad_id, rt):
    """The loss of one batch, and for pairs the batch accuracy. Chosen and rejected responses of the batch are
    padded together and scored in one forward pass of 2B rows: rows 0..B-1 chosen, B..2B-1 rejected (then, with
    mismatched=True, up to B more rejected rows: the prompts with other pairs' chosen responses)."""
    if cfg.loss == "pairwise":
        B = len(index)
        rows = [data["chosen"][i] for i in index] + [data["rejected"][i] for i in index]
        extra = mismatched_rows(data, index, model.config.block_size) if cfg.mismatched else []
        r = rewards_of_rows(model, rows + [row for _, row in extra], pad_id, rt.device, rt.autocast)
        r_w, r_l = r[:B], r[B:2 * B]
        accuracy = (r_w > r_l).float().mean()
        if extra:  # row (x_k, y_j) loses to (x_k, y_k), same prompt, and to (x_j, y_j), same response
            r_m = r[2 * B:]
            r_w = torch.cat([r_w, r_w[[k for k, _ in extra]], r_w[[(k + 1) % B for k, _ in extra]]])
            r_l = torch.cat([r_l, r_m, r_m])
        return pairwise_loss(r_w, r_l, cfg.margin), accuracy
    r = rewards_of_rows(model, [data["rows"][i] for i in index], pad_id, rt.device, rt.autocast)
    scores = torch.tensor([data["scores"][i] for i in index], device=r.device)
    if cfg.loss == "logistic":
        return logistic_loss(r, scores), ((r > 0).float() == scores).float().mean()
    return mse_loss(r, scores), None


# --------------------------------------------------------------------------------------------------------------
# the model: a GPT from another stage's checkpoint with a fresh scalar head (or this stage's, to resume)

def init_hint(init_from):
    """The command that makes a missing init checkpoint."""
    name = os.path.basename(os.path.normpath(init_from))
    if name.startswith("lm"):
        return f"make it with `python train_lm.py config/{name}.py`" if name == "lm_small" else \
            f"make it with `python train_lm.py --out_dir={init_from}`"
    if name == "sft_small":
        return "make it with `python train_sft.py config/sft_small.py`"
    return f"make it with `python train_sft.py --out_dir={init_from}` (or point init_from at another out_dir)"


def build_model(cfg):
    """(model, this stage's checkpoint when resuming or None, tokenizer name, where the backbone came from)."""
    if cfg.init_from == "resume":
        path, ckpt = resume_checkpoint(cfg.out_dir, "rm", "reward model")
        model = model_from_checkpoint(ckpt, path, dropout=cfg.dropout, scalar_head=True)
        return model, ckpt, ckpt["tokenizer"], ckpt.get("backbone", "?")
    if cfg.init_from.startswith("gpt2") and not os.path.isdir(cfg.init_from) or \
            os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        return gpt2_weights(cfg.init_from, dropout=cfg.dropout, scalar_head=True), None, "gpt2", cfg.init_from
    ckpt = load_checkpoint(cfg.init_from, hint=init_hint(cfg.init_from))
    model = model_from_checkpoint(ckpt, cfg.init_from, dropout=cfg.dropout, scalar_head=True)
    return model, None, ckpt["tokenizer"], cfg.init_from


def is_trained(name, cfg):
    """Whether the parameter called name learns: the scalar head always; the backbone if train_backbone, except
    the embeddings and blocks 0..frozen_layers-1 (no gradient is computed below the lowest trained block)."""
    if name.startswith("scalar_head"):
        return True
    if not cfg.train_backbone:
        return False
    if name.startswith("transformer.h."):
        return int(name.split(".")[2]) >= cfg.frozen_layers
    if name.startswith(("transformer.wte", "transformer.wpe", "lm_head")):
        return cfg.frozen_layers == 0
    return True  # the final LayerNorm


def make_optimizer(model, cfg, device_type):
    """AdamW with weight decay on the backbone's matrices only, and the scalar head in a group of its own that
    learns head_lr_mult times faster: a randomly initialised head that learns slowly sends the backbone
    gradients that are mostly noise, and those wear away the features the head is meant to read."""
    head = [p for n, p in model.named_parameters() if n.startswith("scalar_head") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("scalar_head") and p.requires_grad]
    groups = [{"params": [p for p in body if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": head, "weight_decay": 0.0, "lr_mult": cfg.head_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cpu", "cuda"))


# --------------------------------------------------------------------------------------------------------------

def print_summary(result):
    """The final table: held-out accuracy and mean margin, per kind and overall."""
    by_kind = result["by_kind"]
    kinds = sorted((k for k in by_kind if k != "all"), key=lambda k: by_kind[k]["accuracy"]) + ["all"]
    width = max(12, *(len(k) for k in kinds))
    print(f"{'kind'.ljust(width)}  {'pairs':>6}  {'accuracy':>8}  {'margin':>8}")
    for k in kinds:
        s = by_kind[k]
        print(f"{k.ljust(width)}  {s['n']:>6}  {s['accuracy']:>8.3f}  {s['margin']:>8.3f}")


def plot(cfg, path):
    records = read_jsonl_records(os.path.join(cfg.out_dir, "metrics.jsonl"))
    series = lambda key: tuple(zip(*[(r["iter"], r[key]) for r in records if key in r])) or ((), ())
    panels = {"loss": {"train": series("train_loss"), "val": series("val_loss")}}
    if cfg.loss == "pairwise":
        acc = {"all": series("val_accuracy")}
        kinds = sorted({k for r in records for k in r.get("val_accuracy_by_kind", {})})
        for kind in kinds:
            acc[kind] = tuple(zip(*[(r["iter"], r["val_accuracy_by_kind"][kind]) for r in records
                                    if kind in r.get("val_accuracy_by_kind", {})]))
        panels["held-out accuracy (r_chosen > r_rejected)"] = acc
    elif cfg.loss == "logistic":
        panels["held-out accuracy (r > 0 for label 1)"] = {"val": series("val_accuracy")}
    else:
        panels["held-out correlation with the scores"] = {"val": series("val_correlation")}
    plot_curves(path, panels, f"reward model: {cfg.out_dir}")


def main(argv=None):
    cfg, rt = start_stage(Config, argv, "train_rm.py", stage="rm")
    micro_batches = rt.world_size * cfg.gradient_accumulation_steps
    if cfg.batch_size % micro_batches:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({rt.world_size}) "
                        f"times gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")

    # ---- the model: backbone + scalar head; the data is tokenized with the backbone's own tokenizer
    model, ckpt, tokenizer_spec, backbone = build_model(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name, cfg))
    model.to(rt.device)
    same_weights_everywhere(model)  # the fresh scalar head, above all
    tok = get_tokenizer(tokenizer_spec)
    block_size = model.config.block_size
    train = load_data(cfg.train_file, cfg, tok, block_size, "train")
    val = load_data(cfg.val_file, cfg, tok, block_size, "val")
    if cfg.loss == "pairwise":  # a pair's two rows are padded together: its length is the longer one's
        lengths = tuple(max(len(w), len(l)) for w, l in zip(train["chosen"], train["rejected"]))
    else:
        lengths = tuple(len(row) for row in train["rows"])
    n_train = len(lengths)

    scaler = grad_scaler(rt)
    optimizer = make_optimizer(model, cfg, rt.device_type)
    iter_num = 0
    if ckpt is not None:  # init_from='resume': continue exactly where the checkpoint left off
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
        set_rng_state(ckpt["rng"])
        print(f"resuming from {cfg.out_dir}/ckpt.pt at step {iter_num}")
    if cfg.compile:  # compile the backbone's forward pass; the instance attribute shadows the method
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    total, trained = (sum(p.numel() for p in model.parameters() if p.requires_grad or everything)
                      for everything in (True, False))
    print(f"reward model: backbone {backbone} ({total / 1e6:.2f}M parameters, {trained / 1e6:.2f}M "
          f"trained), tokenizer {tok.name!r}, {rt.device} {rt.dtype}, {rt.world_size} process(es); "
          f"{cfg.max_iters * cfg.batch_size / n_train:.1f} epochs of {n_train} "
          f"{'pairs' if cfg.loss == 'pairwise' else 'examples'}")

    # ---- the training loop
    metrics = Metrics(cfg.out_dir, resume_iter=iter_num if ckpt else None, enabled=rt.is_master)
    resumed_at = iter_num if ckpt else None  # that step's evaluation is already in the metrics and checkpoint
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    last = {k: ckpt[k] for k in ("val_loss", "val_accuracy", "by_kind") if k in ckpt} if ckpt else {}
    loss_sum, acc_sum, interval_iters, interval_time = 0.0, 0.0, 0, 0.0
    guard = NonFiniteGuard(cfg.learning_rate, scaler, rt.device)
    t_start = time.time()
    with StopRequest() as stop:
        while True:
            lr = cosine_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            # evaluate on the held-out data and checkpoint, at the start, every eval_interval steps and at the end
            at_end = iter_num >= cfg.max_iters or stop.requested
            if (iter_num % cfg.eval_interval == 0 or at_end) and iter_num != resumed_at:
                guard.check()  # a step that went nan or inf stops the run here, before evaluating or saving
                last = evaluate(model, val, cfg, tok.eot_token, rt)
                record = {k: v for k, v in last.items() if k != "by_kind"}
                line = f"step {iter_num}: val loss {last['val_loss']:.4f}"
                if cfg.loss == "pairwise":
                    record["val_accuracy_by_kind"] = {k: s["accuracy"] for k, s in last["by_kind"].items() if k != "all"}
                    record["val_margin_by_kind"] = {k: s["margin"] for k, s in last["by_kind"].items() if k != "all"}
                    line += f", accuracy {last['val_accuracy']:.3f} (" + ", ".join(
                        f"{k} {a:.2f}" for k, a in sorted(record["val_accuracy_by_kind"].items())) + \
                        f"), margin {last['val_margin']:.3f}"
                elif cfg.loss == "logistic":
                    line += f", accuracy {last['val_accuracy']:.3f}"
                else:
                    line += f", correlation {last['val_correlation']:.3f}"
                print(line + f", rewards {last['reward_mean']:.3f} +- {last['reward_std']:.3f}", flush=True)
                metrics.log(iter=iter_num, **record)
                if rt.is_master:  # every process holds the same weights: one writes them
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                        "stage": "rm", "model_args": asdict(model.config), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
                        "config": asdict(cfg), "rng": rng_state(), "tokenizer": tokenizer_spec, "backbone": backbone,
                        **{k: v for k, v in last.items()}})
            if at_end:
                break

            # one optimizer step on the batch this step always gets, in micro-batches (under torchrun, this
            # process's share of them): all hold as many pairs, so the mean of their mean losses is the batch's
            t0 = time.time()
            index = batch_indices(cfg.seed, iter_num, cfg.batch_size, lengths)
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                part = micro_batch(index, micro, cfg.gradient_accumulation_steps)
                loss, acc = train_step_loss(model, train, part, cfg, tok.eot_token, rt)
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                step_loss = step_loss + loss.detach() / cfg.gradient_accumulation_steps
                acc_sum += acc.item() / cfg.gradient_accumulation_steps if acc is not None else 0.0
            average_gradients(model.parameters())
            grad_norm = optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)
            guard.record(iter_num + 1, step_loss, grad_norm)
            loss_sum += step_loss.item()
            interval_time += time.time() - t0
            interval_iters += 1
            iter_num += 1

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                guard.check()
                dt = interval_time / interval_iters
                record = {"train_loss": loss_sum / interval_iters, "lr": lr, "ms_per_iter": dt * 1000}
                if cfg.loss != "mse":
                    record["train_accuracy"] = acc_sum / interval_iters
                record = mean_over_processes(record)  # the whole batches' means
                line = f"iter {iter_num}/{cfg.max_iters}: loss {record['train_loss']:.4f}"
                if cfg.loss != "mse":
                    line += f", batch accuracy {record['train_accuracy']:.3f}"
                print(line + f", lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"eta {format_duration((cfg.max_iters - iter_num) * dt)}", flush=True)
                metrics.log(iter=iter_num, **record)
                loss_sum, acc_sum, interval_iters, interval_time = 0.0, 0.0, 0, 0.0

    # ---- the end: a plot and a summary per kind
    png = os.path.join(cfg.out_dir, "rm.png")
    if rt.is_master:
        plot(cfg, png)
    print(f"done: step {iter_num}, val loss {last.get('val_loss', float('nan')):.4f} in "
          f"{format_duration(time.time() - t_start)}; wrote {cfg.out_dir}/ckpt.pt, metrics.jsonl, rm.png")
    if "by_kind" in last:
        print_summary(last)
    for path, accuracy in last.get("val_accuracy_by_file", {}).items():
        print(f"accuracy on {path}: {accuracy:.3f}")
    return last


if __name__ == "__main__":
    main()
