"""
Stage 1 of the InstructGPT recipe: supervised fine-tuning (SFT). The pretrained GPT is shown demonstrations,
a prompt x and the response y a person (here: the Python standard library) gave to it, and learns to imitate
the responses. On our task a prompt is a function's `def` line and docstring, the response is its body.

Each example is the token sequence prompt + response + end-of-text. The model reads all of it, but only the
response tokens (and the end-of-text that ends the response) are predicted for the loss; the prompt is given:

    L(theta) = -1/|R| * sum_{t in R} log p_theta(y_t | x, y_<t)

with R the response positions of every example in the batch (a token-weighted mean). Learning to stop, the
end-of-text after the response, is part of the task: a fine-tuned model ends its answer by itself.

Before and after training (and at every evaluation) it reports the validation loss on response tokens and the
task's held-out measures (tasks/pycode.py: how often the greedy completion solves its prompt, i.e. is a valid,
non-trivial body that reads the function's arguments and is not a template; generated code is never executed),
and at the end pass@k of sampled completions. A task without a judge (alpaca) is measured by the loss alone.

Run (after `python train_lm.py config/lm_small.py`; about 3 minutes on a laptop CPU):
    python train_sft.py config/sft_small.py
    python sample.py --out_dir=out/sft_small --start=FILE:prompt.txt --greedy=True
Instruction data (Alpaca's {"instruction", "input", "output"} or {"user_input", "completion"} lines):
    python data/alpaca/prepare.py && python train_sft.py config/sft_alpaca_gpt2.py
    python train_sft.py --init_from=gpt2 --train_file=my.jsonl --val_file=my_val.jsonl --template=instruction \
        --task=alpaca --eval_prompts=none
    python sample.py --out_dir=out/sft_alpaca_gpt2 --chat=True
On several GPUs (or, to try it, 2 CPU processes): the batch is shared out, the losses are those of one process
    torchrun --standalone --nproc_per_node=4 train_sft.py config/sft_alpaca_gpt2.py
Every key: python train_sft.py --help
"""
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.nn import functional as F

import tasks
from common import (all_reduce_mean, all_reduce_sum, average_gradients, complete, cosine_lr, encode_prompt_response,
                    field, format_duration, format_prompt, grad_scaler, init_model, Metrics, NonFiniteGuard,
                    optimizer_step, pad_right, plot_curves, read_jsonl_records, read_sft_examples, rng_state, RunConfig,
                    same_weights_everywhere, save_checkpoint, set_rng_state, shard, start_stage, StopRequest, UserError)
from tokenizer import get_tokenizer


@dataclass
class Config(RunConfig):
    out_dir: str = "out/sft"  # where ckpt.pt, metrics.jsonl and sft.png are written
    init_from: str = "out/lm_small"  # a pretraining out_dir, a GPT-2 name or Hugging Face directory, or 'resume'
    max_iters: int = 600  # optimizer steps in total
    eval_interval: int = 100  # evaluate and save a checkpoint every this many steps
    # data
    train_file: str = "data/pycode/sft_train.jsonl"  # demonstrations: {"prompt","response"}, Alpaca or ChatLLaMA lines
    val_file: str = "data/pycode/sft_val.jsonl"  # held-out demonstrations: the validation loss on response tokens
    eval_prompts: str = "data/pycode/prompts_eval.jsonl"  # held-out prompts the task measures; 'none': the loss only
    task: str = "pycode"  # the task module (tasks/<task>.py) that reads and measures the eval prompts
    template: Literal["none", "instruction"] = "none"  # 'none': the prompt as it is; 'instruction': Alpaca's template
    block_size: int = field(0, min=0)  # context length; 0: the model's own, smaller crops it; longer examples are dropped
    # evaluation
    eval_max_prompts: int = field(0, min=0)  # complete this many eval prompts greedily at each evaluation; 0 means all
    eval_samples: int = field(8, min=0)  # sampled completions per prompt at the last evaluation (pass@k); 0: none
    max_new_tokens: int = field(96, min=1)  # completion length limit; eval prompts leaving less room than this are dropped
    eval_batch_size: int = field(64, min=1)  # rows per batch in evaluation (loss and generation)
    # optimisation
    batch_size: int = field(16, min=1)  # examples per step, over all processes
    learning_rate: float = field(3e-4, min=0)  # peak learning rate: below pretraining's, to adapt rather than overwrite
    min_lr: float = field(3e-5, min=0)  # the cosine schedule ends here
    warmup_iters: int = field(20, min=0)  # linear warm-up steps
    lr_decay_iters: int = field(0, min=0)  # the cosine reaches min_lr here; 0 means max_iters
    weight_decay: float = field(0.1, min=0)  # AdamW decay, applied to matrices only
    beta1: float = field(0.9, min=0, below=1)  # AdamW
    beta2: float = field(0.99, min=0, below=1)  # AdamW
    grad_clip: float = field(1.0, min=0)  # clip the global gradient norm to this; 0 turns clipping off
    dropout: float = field(0.0, min=0, below=1)  # may help a large model memorise less; hurt lm_small


# --------------------------------------------------------------------------------------------------------------
# the batch and the loss

def sft_batch(examples, pad_id):
    """x, y (B, T) from [(prompt ids, response ids)], the response ending in end-of-text.

    Each row is prompt + response padded on the right; x is the row without its last token, y without its first
    (y[t] is the token that follows x[..t]). y is -1, which the loss ignores, wherever the token to predict is a
    prompt token or padding. The prompt is masked because it is the user's part: the model should learn to
    answer prompts, not to write them, and a loss on the (usually longer) prompt would mostly train it to
    imitate docstrings. The prompt still shapes the loss through the context the response is predicted from.
    """
    ids, _ = pad_right([p + r for p, r in examples], pad_id)
    targets = torch.full_like(ids, -1)
    for i, (p, r) in enumerate(examples):
        targets[i, len(p):len(p) + len(r)] = ids[i, len(p):len(p) + len(r)]
    # Why pad rather than pack (concatenate examples into full rows, as pretraining does): packed examples would
    # attend to the unrelated examples before them and start at arbitrary positions, unlike at generation time,
    # unless every row got a block-diagonal attention mask and restarted positions. Padding keeps each example
    # alone in its row from position 0. Padding on the right needs no attention mask at all: with causal
    # attention a real token only sees tokens before it, never the padding after it. The cost is the compute
    # spent on padding: a batch is as long as its longest example, so on pycode about a third of it is padding.
    return ids[:, :-1], targets[:, 1:]


def response_loss_sum(model, x, y):
    """Summed negative log-likelihood of the response tokens (y != -1) and their count: summing and dividing
    once gives the exact mean over a whole data set, whatever the batches."""
    logits, _ = model(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1,
                          reduction="sum")
    return nll, int((y != -1).sum())


def token_weighted(loss, count):
    """A process's mean loss over its `count` response tokens, weighted so that its mean over the processes (what
    averaged gradients take) is the mean over every process's tokens, as one process computes it on the whole
    batch: loss * count * N / (all tokens). Without it, a token in a shorter share of the batch would weigh more."""
    return loss * (count / all_reduce_mean(count))


def encode_examples(tok, examples, template, block_size):
    """Token ids (prompt, response + end-of-text) of each example, and how many were dropped for not fitting
    the context. An example is never truncated: a cut response would teach the model to stop mid-function."""
    encoded, dropped = [], 0
    for prompt, response in examples:
        pair = encode_prompt_response(tok, format_prompt(prompt, template), response, block_size)
        if pair is None:
            dropped += 1
        else:
            encoded.append(pair)
    return encoded, dropped


def batch_indices(seed, iter_num, batch_size, n):
    """The examples of step iter_num: a pure function of (seed, step), so a resumed run sees exactly the batches
    an uninterrupted one would. The examples are read epoch after epoch, each epoch in its own order, a
    permutation drawn from (seed, epoch); a batch may span the end of one epoch and the start of the next."""
    out = []
    for k in range(iter_num * batch_size, (iter_num + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(epoch_order(seed, epoch, n)[i])
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    """The order of the n examples in one epoch (computed once per epoch, not once per batch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


# --------------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, val_examples, eval_set, tok, task, cfg, rt, samples=0):
    """Validation loss on response tokens over every validation example, and the task's measures of greedy
    completions of the held-out prompts (with `samples` sampled completions per prompt: pass@k too); with no
    held-out prompts (eval_set None), the loss alone. Under torchrun each process takes a share of the batches."""
    model.eval()
    nll, count = 0.0, 0
    for i in shard(range(0, len(val_examples), cfg.eval_batch_size)):
        x, y = sft_batch(val_examples[i:i + cfg.eval_batch_size], tok.eot_token)
        with rt.autocast:
            s, c = response_loss_sum(model, x.to(rt.device), y.to(rt.device))
        nll, count = nll + s.item(), count + c
    nll, count = all_reduce_sum(nll), all_reduce_sum(count)
    measures, completions = {}, []
    if eval_set is not None:
        measures, completions = task.evaluate_policy(model, tok, eval_set, cfg.max_new_tokens, rt.device, rt.autocast,
                                                     samples=samples, seed=cfg.seed, batch_size=cfg.eval_batch_size)
    model.train()
    return {"val_loss": nll / count, **measures}, completions


def describe(m, task, eval_set):
    measured = task.describe(m) if eval_set is not None else "no held-out prompts (eval_prompts='none'): the loss only"
    return f"val response loss {m['val_loss']:.4f}; {measured}"


# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg, rt = start_stage(Config, argv, "train_sft.py", stage="sft")
    task = tasks.load(cfg.task)
    if cfg.batch_size % rt.world_size:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({rt.world_size})")

    # ---- model: the pretrained LM (or the SFT run to resume); its tokenizer is the one the data is encoded with
    if cfg.init_from == "scratch":
        raise UserError("SFT fine-tunes a pretrained model: set init_from to a pretraining out_dir (e.g. "
                        "out/lm_small, made by `python train_lm.py config/lm_small.py`), a GPT-2 name or 'resume'")
    model_args = {"dropout": cfg.dropout, **({"block_size": cfg.block_size} if cfg.block_size else {})}
    model, ckpt, tokenizer_spec = init_model(
        cfg.init_from, cfg.out_dir, model_args, None,
        stage_hint="make it with `python train_lm.py config/lm_small.py` (or set init_from to a pretraining out_dir)",
        stage="sft", what="fine-tuning run", start="init_from=<a pretraining out_dir>")
    if ckpt is not None and ckpt.get("template", cfg.template) != cfg.template:
        raise UserError(f"{cfg.out_dir}/ckpt.pt was trained with template={ckpt['template']!r}, not "
                        f"{cfg.template!r}; resume with the same template or use a new out_dir")
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} is longer than the model's context ({model.config.block_size})")
    if cfg.block_size and cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    block_size = model.config.block_size
    tok = get_tokenizer(tokenizer_spec)
    if model.config.vocab_size < tok.n_vocab:
        raise UserError(f"the model has {model.config.vocab_size} token embeddings, fewer than the "
                        f"{tok.name!r} tokenizer's {tok.n_vocab}")
    model.to(rt.device)

    # ---- data: text -> (prompt ids, response ids + end-of-text); examples longer than the context are dropped
    train_examples, train_dropped = encode_examples(tok, read_sft_examples(cfg.train_file), cfg.template, block_size)
    val_examples, val_dropped = encode_examples(tok, read_sft_examples(cfg.val_file), cfg.template, block_size)
    for path, kept, dropped in ((cfg.train_file, train_examples, train_dropped),
                                (cfg.val_file, val_examples, val_dropped)):
        print(f"{path}: {len(kept)} examples, {dropped} longer than the context ({block_size} tokens) dropped")
        if not kept:
            raise UserError(f"{path}: every example is longer than the context ({block_size} tokens)")
    # prompts leaving no room for max_new_tokens are dropped, the same rule every stage uses, so that the
    # measures of all stages are taken on the same prompts
    eval_set = None
    if cfg.eval_prompts != "none":
        eval_set = task.read_eval_set(cfg.eval_prompts, tok, cfg.template, block_size - cfg.max_new_tokens,
                                      cfg.eval_max_prompts)
        print(f"{cfg.eval_prompts}: completing {len(eval_set.prompts)} prompts greedily at each evaluation "
              f"({eval_set.dropped} longer than {block_size - cfg.max_new_tokens} tokens dropped), and "
              f"{cfg.eval_samples} samples of each at the last; task {cfg.task!r}")
    else:
        print("eval_prompts='none': no held-out prompts are completed; the model is measured by its validation loss")
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, tokenizer {tok.name!r}, context "
          f"{block_size}, template {cfg.template!r}, {rt.device} {rt.dtype}, {rt.world_size} process(es)")

    # ---- optimizer, and the state of an interrupted run
    scaler = grad_scaler(rt)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    iter_num, before, last = 0, None, {}
    if ckpt is not None:  # init_from='resume': continue exactly where the checkpoint left off
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, before, last = ckpt["iter_num"], ckpt["before"], ckpt["eval"]
        set_rng_state(ckpt["rng"])
        print(f"resuming from {cfg.out_dir}/ckpt.pt at step {iter_num}")
    raw_model = model
    same_weights_everywhere(raw_model)
    if cfg.compile:
        print("compiling the model (the first steps take a while)...")
        model = torch.compile(model, dynamic=True)  # dynamic: every batch has its own length

    # ---- the training loop
    metrics = Metrics(cfg.out_dir, resume_iter=iter_num if ckpt else None, enabled=rt.is_master)
    resumed_at = iter_num if ckpt else None  # that step's evaluation is already in the metrics and checkpoint
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    completions = []
    loss_sum, tokens, interval_iters, interval_time = 0.0, 0, 0, 0.0
    guard = NonFiniteGuard(cfg.learning_rate, scaler, rt.device)
    t_start = time.time()
    with StopRequest() as stop:
        while True:
            lr = cosine_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate and checkpoint; the checkpoint holds everything needed to continue from this very step
            at_end = iter_num >= cfg.max_iters or stop.requested
            if (iter_num % cfg.eval_interval == 0 or at_end) and iter_num != resumed_at:
                guard.check()  # a step that went nan or inf stops the run here, before evaluating or saving
                t0 = time.time()
                last, completions = evaluate(raw_model, val_examples, eval_set, tok, task, cfg, rt,
                                             samples=cfg.eval_samples if at_end else 0)
                before = before or last  # the first evaluation is of the initial (pretrained) model
                print(f"step {iter_num}: {describe(last, task, eval_set)} ({format_duration(time.time() - t0)})")
                metrics.log(iter=iter_num, **last)
                if rt.is_master:  # every process holds the same weights: one writes them
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                        "stage": "sft", "model_args": asdict(raw_model.config), "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
                        "val_loss": last["val_loss"], "eval": last, "before": before, "config": asdict(cfg),
                        "rng": rng_state(), "tokenizer": tokenizer_spec, "template": cfg.template})
            if at_end:
                break

            # one optimizer step on one batch of examples (under torchrun, this process's share of it)
            t0 = time.time()
            index = shard(batch_indices(cfg.seed, iter_num, cfg.batch_size, len(train_examples)))
            x, y = sft_batch([train_examples[i] for i in index], tok.eot_token)
            x, y = x.to(rt.device), y.to(rt.device)
            with rt.autocast:
                _, loss = model(x, y)  # the mean over response tokens: y is -1 on prompt and padding
            if rt.ddp:
                loss = token_weighted(loss, int((y != -1).sum()))
            scaler.scale(loss).backward()
            average_gradients(model.parameters())
            grad_norm = optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)
            guard.record(iter_num + 1, loss, grad_norm)
            loss_sum += loss.item()
            tokens += x.numel()
            interval_time += time.time() - t0
            interval_iters += 1
            iter_num += 1

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                guard.check()
                train_loss = all_reduce_mean(loss_sum / interval_iters)  # the mean over the whole batches
                tokens = all_reduce_sum(tokens)
                dt = interval_time / interval_iters
                eta = (cfg.max_iters - iter_num) * dt
                print(f"iter {iter_num}/{cfg.max_iters}: response loss {train_loss:.4f}, lr {lr:.2e}, "
                      f"{dt * 1000:.1f} ms/iter, {tokens / interval_time:,.0f} tok/s, eta {format_duration(eta)}",
                      flush=True)
                metrics.log(iter=iter_num, train_loss=train_loss, lr=lr, ms_per_iter=dt * 1000,
                            tokens_per_s=tokens / interval_time)
                loss_sum, tokens, interval_iters, interval_time = 0.0, 0, 0, 0.0

    # ---- the end: a plot, a summary and a few completions
    if rt.is_master:
        records = read_jsonl_records(metrics.path)
        series = lambda key: tuple(zip(*[(r["iter"], r[key]) for r in records if key in r])) or ((), ())
        panels = {"response loss (nats per token)": {"train": series("train_loss"), "val": series("val_loss")}}
        if eval_set is not None and task.CURVES:
            panels["greedy completions of held-out prompts"] = {label: series(key) for label, key in task.CURVES}
        plot_curves(os.path.join(cfg.out_dir, "sft.png"), panels, f"supervised fine-tuning: {cfg.out_dir}")
    measured = "".join(f", {label} {before[key]:.3f} -> {last[key]:.3f}" for label, key in task.CURVES
                       if key in before and key in last)
    print(f"done: step {iter_num} in {format_duration(time.time() - t_start)}; "
          f"val response loss {before['val_loss']:.4f} -> {last['val_loss']:.4f}{measured}"
          + (f" on {len(eval_set.prompts)} held-out prompts" if eval_set is not None else "")
          + f"; wrote {cfg.out_dir}/ckpt.pt, metrics.jsonl, sft.png")
    if eval_set is not None and not completions:  # resumed at the very end: nothing was evaluated in this run
        completions, _ = complete(raw_model, tok, eval_set.inputs[:3], cfg.max_new_tokens, device=rt.device,
                                  autocast=rt.autocast)
    for prompt, completion in list(zip(eval_set.inputs if eval_set is not None else [], completions))[:3]:
        print(f"---------- prompt\n{prompt}---------- completion\n{completion}")
    return {"before": before, "after": last}


if __name__ == "__main__":
    main()
