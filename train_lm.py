"""
Stage 0 of the recipe: pretraining. A GPT learns to predict the next token of Python source code.

The loss is the average negative log-likelihood of each next token (cross-entropy), over every position t
of every window of the training text:

    L(theta) = -1/T * sum_t log p_theta(x_{t+1} | x_1..x_t)

Run (on a laptop CPU, a few minutes):
    python data/pycode/prepare.py
    python train_lm.py config/lm_small.py
    python sample.py --out_dir=out/lm_small --start="def "
On one GPU, GPT-2 weights fine-tuned on the same data:
    python data/pycode/prepare.py --tokenizer=gpt2
    python train_lm.py config/lm_gpt2.py
On several GPUs (or, to try it, 2 CPU processes with the gloo backend):
    torchrun --standalone --nproc_per_node=4 train_lm.py config/lm_gpt2.py
Every key: python train_lm.py --help
"""
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (optimizer_step, Metrics, dataset_dir, field, NonFiniteGuard, RunConfig, StopRequest, TokenBatches,
                    UserError, cosine_lr, format_duration, grad_scaler, init_model, load_config, make_out_dir,
                    mfu_peak, plot_curves, print_config, read_jsonl_records, read_meta, rng_state,
                    save_checkpoint, seed_everything, set_rng_state, setup_runtime)
from tokenizer import get_tokenizer, tokenizer_name


@dataclass
class Config(RunConfig):
    out_dir: str = "out/lm"  # where ckpt.pt, metrics.jsonl and loss.png are written
    max_iters: int = 5000  # optimizer steps in total
    eval_interval: int = 250  # evaluate and save a checkpoint every this many steps
    eval_iters: int = field(20, min=1)  # batches per split in each evaluation
    dataset: str = "pycode"  # a folder under data/ (or any path) with train.bin, val.bin and meta.json
    # model (ignored when the weights come from GPT-2 or another out_dir, except block_size, which may crop)
    n_layer: int = field(6, min=1)  # Transformer blocks
    n_head: int = field(6, min=1)  # attention heads per block
    n_embd: int = field(384, min=1)  # width of the residual stream
    block_size: int = field(256, min=1)  # context length in tokens
    dropout: float = field(0.0, min=0, below=1)  # 0 for pretraining; try 0.1 when fine-tuning on little data
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    # optimisation
    batch_size: int = field(12, min=1)  # sequences per micro-step (per process)
    gradient_accumulation_steps: int = field(1, min=1)  # micro-steps per optimizer step, summed over all processes
    learning_rate: float = field(1e-3, min=0)  # peak learning rate, after warm-up
    min_lr: float = field(1e-4, min=0)  # the cosine schedule ends here (about learning_rate / 10)
    warmup_iters: int = field(100, min=0)  # linear warm-up steps: Adam's early steps are noisy while its moments settle
    lr_decay_iters: int = field(0, min=0)  # the cosine reaches min_lr here; 0 means max_iters
    weight_decay: float = field(0.1, min=0)  # AdamW decay, applied to matrices only
    beta1: float = field(0.9, min=0, below=1)  # AdamW
    beta2: float = field(0.99, min=0, below=1)  # AdamW: 0.99 rather than 0.999, as usual for small batches of tokens
    grad_clip: float = field(1.0, min=0)  # clip the global gradient norm to this; 0 turns clipping off
    peak_tflops: float = field(0.0, min=0)  # the hardware peak for MFU in TFLOP/s; 0: a known GPU's datasheet, else measured
    sample_at_end: bool = True  # print a short sample from the trained model


# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, batches, eval_iters, autocast, seed):
    """Mean loss over the same eval_iters batches of each split at every evaluation (a fixed seed), so that
    successive evaluations are comparable and the training batches' random stream is left untouched."""
    model.eval()
    out = {}
    for split, data in batches.items():
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = data.get(generator)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def batch_seed(seed, iter_num, micro_step):
    """The training batches are a pure function of (seed, step, micro-step): resuming at step N draws exactly
    the batches an uninterrupted run would, with no data-loader state to save, and N processes with DDP see
    the same batches as one process accumulating N times as many micro-steps."""
    return (seed * 1_000_003 + iter_num) * 10_007 + micro_step


def main(argv=None):
    cfg = load_config(Config, argv)
    rt = setup_runtime(cfg)
    if rt.is_master:
        make_out_dir(cfg.out_dir, cfg.init_from, stage="lm")
        print_config(cfg)
    seed_everything(cfg.seed + rt.rank)
    if cfg.gradient_accumulation_steps % rt.world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by the "
                        f"number of processes ({rt.world_size})")
    accum = cfg.gradient_accumulation_steps // rt.world_size  # each process does its share of the micro-steps
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size

    # ---- data
    data_dir = dataset_dir(cfg.dataset)
    meta = read_meta(data_dir)
    train_data = TokenBatches(data_dir, "train", cfg.block_size, cfg.batch_size, rt.device)
    val_data = TokenBatches(data_dir, "val", cfg.block_size, cfg.batch_size, rt.device)

    # ---- model
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      vocab_size=meta["n_vocab"], dropout=cfg.dropout, bias=cfg.bias)
    model, ckpt, tokenizer_spec = init_model(cfg.init_from, cfg.out_dir, model_args, meta["tokenizer"],
                                             stage_hint="make one with train_lm.py", stage="lm", what="pretraining run")
    if tokenizer_spec != meta["tokenizer"]:
        raise UserError(f"the model uses the {tokenizer_name(tokenizer_spec)!r} tokenizer but data/{cfg.dataset} was "
                        f"prepared with {tokenizer_name(meta['tokenizer'])!r}; pretrain on the data it was made with")
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} is longer than the model's context ({model.config.block_size})")
    model.to(rt.device)
    scaler = grad_scaler(rt)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    iter_num = 0
    if ckpt is not None:  # init_from='resume': continue exactly where the checkpoint left off
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
        set_rng_state(ckpt["rng"])
        if rt.is_master:
            print(f"resuming from {cfg.out_dir}/ckpt.pt at step {iter_num}")
    raw_model = model
    if cfg.compile:
        if rt.is_master:
            print("compiling the model (the first step takes a while)...")
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    if rt.is_master:
        print(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, tokenizer {tokenizer_name(tokenizer_spec)!r}, "
              f"{tokens_per_iter:,} tokens per step, {rt.world_size} process(es), {rt.device} {rt.dtype}")
        peak, source = mfu_peak(cfg.peak_tflops, rt)
        print(f"MFU is measured against a peak of {peak / 1e12:.3f} TFLOP/s ({source})")

    # ---- the training loop
    metrics = Metrics(cfg.out_dir, resume_iter=iter_num if ckpt else None, enabled=rt.is_master)
    resumed_at = iter_num if ckpt else None  # that step's evaluation is already in the metrics and checkpoint
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    generator = torch.Generator()
    eval_batches = {"train": train_data, "val": val_data}
    last = {"val": ckpt["val_loss"]} if ckpt else {}
    loss_sum, interval_iters, interval_time = torch.zeros((), device=rt.device), 0, 0.0
    guard = NonFiniteGuard(cfg.learning_rate, scaler, rt.device)
    t_start = time.time()
    with StopRequest() as stop:
        while True:
            lr = cosine_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate and checkpoint; the checkpoint holds everything needed to continue from this very step
            at_end = iter_num >= cfg.max_iters or stop.requested
            if rt.is_master and (iter_num % cfg.eval_interval == 0 or at_end) and iter_num != resumed_at:
                guard.check()  # a step that went nan or inf stops the run here, before evaluating or saving
                last = evaluate(model, eval_batches, cfg.eval_iters, rt.autocast, cfg.seed)
                print(f"step {iter_num}: train loss {last['train']:.4f}, val loss {last['val']:.4f}")
                metrics.log(iter=iter_num, eval_train_loss=last["train"], val_loss=last["val"])
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "stage": "lm", "model_args": asdict(raw_model.config), "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
                    "val_loss": last["val"], "config": asdict(cfg), "rng": rng_state(),
                    "tokenizer": tokenizer_spec, "dataset": cfg.dataset})
            if at_end:
                break

            # one optimizer step: gradients summed over micro-steps (and averaged over processes by DDP)
            t0 = time.time()
            for micro_step in range(accum):
                generator.manual_seed(batch_seed(cfg.seed, iter_num, rt.rank * accum + micro_step))
                x, y = train_data.get(generator)
                if rt.ddp:  # average gradients across processes only once, after the last micro-step
                    model.require_backward_grad_sync = micro_step == accum - 1
                with rt.autocast:
                    _, loss = model(x, y)
                    loss = loss / accum  # the mean over all micro-steps, not their sum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            grad_norm = optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip)
            guard.record(iter_num + 1, loss, grad_norm)
            if rt.device_type == "cuda" and (iter_num + 1) % cfg.log_interval == 0:
                torch.cuda.synchronize()  # honest timings
            interval_time += time.time() - t0
            interval_iters += 1
            iter_num += 1

            if rt.is_master and (iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters):
                guard.check()
                train_loss = loss_sum.item() / interval_iters
                dt = interval_time / interval_iters
                tok_s = tokens_per_iter / dt
                mfu = raw_model.estimate_mfu(tok_s, peak, cfg.block_size)
                eta = (cfg.max_iters - iter_num) * dt
                print(f"iter {iter_num}/{cfg.max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                      f"{tok_s:,.0f} tok/s, MFU {mfu * 100:.2f}%, eta {format_duration(eta)}", flush=True)
                metrics.log(iter=iter_num, train_loss=train_loss, lr=lr, ms_per_iter=dt * 1000,
                            tokens_per_s=tok_s, mfu=mfu)
                loss_sum.zero_()
                interval_iters, interval_time = 0, 0.0

    # ---- the end: a plot, a summary and a sample
    if rt.is_master:
        records = read_jsonl_records(metrics.path)
        train = [(r["iter"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
        panels = {"loss (nats per token)": {"train": tuple(zip(*train)) or ((), ()), "val": tuple(zip(*val))}}
        plot_curves(os.path.join(cfg.out_dir, "loss.png"), panels, f"pretraining: {cfg.out_dir}")
        print(f"done: step {iter_num}, val loss {last.get('val', float('nan')):.4f} in "
              f"{format_duration(time.time() - t_start)}; wrote {cfg.out_dir}/ckpt.pt, metrics.jsonl, loss.png")
        if cfg.sample_at_end:
            tok = get_tokenizer(tokenizer_spec)
            prompt = torch.tensor([tok.encode("def ")], device=rt.device)
            with rt.autocast:
                out = raw_model.eval().generate(prompt, 200, temperature=0.8, top_k=50, eot_token=tok.eot_token,
                                                generator=torch.Generator(device=rt.device).manual_seed(cfg.seed))
            print("sample:\n" + tok.decode(out[0].tolist()))
    if rt.ddp:  # leave together: a process that tears its connections down while another still runs can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return last


if __name__ == "__main__":
    main()
