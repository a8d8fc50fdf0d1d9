"""
Benchmark: how fast this machine trains and samples a given model, measured, not asserted.

    python bench.py config/lm_small.py                 # the small pretraining config
    python bench.py --n_layer=6 --n_head=6 --n_embd=384 --vocab_size=50304 --batch_size=12   # nanoGPT's sizes
    python bench.py --what=sample --vocab_size=50257 --sample_batch=16 --prompt_len=32 --new_tokens=128
    python bench.py --what=ppo --n_layer=6 --n_head=6 --n_embd=384 --vocab_size=50257 --sample_batch=16 \
        --prompt_len=32 --new_tokens=48 --ppo_epochs=4      # trl's PPO benchmark sizes (../shared/bench)
    python bench.py --what=grpo --n_layer=4 --n_head=4 --n_embd=192 --vocab_size=50257 --sample_batch=16 --grpo_group=4 \
        --prompt_len=64 --new_tokens=96      # GRPO (4 prompts x 4 samples) beside PPO (16 prompts)

Prints
- this device's float32 matmul throughput (the peak MFU is measured against; on a GPU the table in common.py gives
  the datasheet's bf16/fp16 peak, which MFU is then taken against, beside the throughput measured in that dtype),
- training tokens/s, ms per step and MFU of train_lm.py's own loop (it runs train_lm.main on random tokens),
- sampling tokens/s of GPT.generate with and without the KV cache, and the speed-up;
- with --what=ppo, seconds per train_ppo.py iteration and its rollout / score / update split, on random-init
  policy, reference and reward models of the given size (every response runs to new_tokens);
- with --what=grpo, the same for train_grpo.py beside PPO's, with as many responses per iteration (sample_batch /
  grpo_group prompts x grpo_group samples), and the ratio of their times.
Training and sampling keys that config files for train_lm.py set are accepted and the others ignored, so
the same config file works here.
"""
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import train_lm
from common import (datasheet_peak_flops, load_config, machine, measure_matmul_flops, read_jsonl_records,
                    setup_runtime)
from model import GPT, GPTConfig


@dataclass
class Config(train_lm.Config):
    what: Literal["all", "train", "sample", "ppo", "grpo"] = "all"  # 'all': train and sample; 'grpo': GRPO and PPO
    vocab_size: int = 257  # random tokens from this vocabulary (257: byte tokenizer; 50304/50257: GPT-2)
    train_iters: int = 30  # timed training steps (after warmup_steps)
    warmup_steps: int = 5  # untimed steps first: allocation, compilation
    sample_batch: int = 16  # sequences sampled at once
    prompt_len: int = 32  # prompt tokens
    new_tokens: int = 128  # tokens generated per sequence
    sample_repeats: int = 3  # generate calls timed; the median is reported
    sample_uncached: bool = True  # also time generation without the KV cache (slow: the whole prefix every token)
    ppo_epochs: int = 1  # PPO epochs per iteration (--what=ppo); minibatch = the whole batch of sample_batch
    ppo_critic: Literal["shared", "separate"] = "shared"  # 'separate': a critic model of its own, as trl's PPO has
    ppo_iters: int = 5  # timed PPO (and GRPO) iterations, after one untimed
    grpo_group: int = 4  # --what=grpo: samples per prompt; sample_batch / grpo_group prompts, as many responses as PPO
    grpo_kl: Literal["none", "k1", "k2", "k3"] = "k3"  # --what=grpo: its KL, k3 (with a reference pass, as PPO's)


def bench_training(cfg, peak):
    """train_lm.py itself on random tokens: its logged ms/iter after the warm-up steps."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, cfg.vocab_size, size=500_000, dtype=np.uint16).tofile(os.path.join(data, f"{split}.bin"))
        tokenizer = "byte" if cfg.vocab_size <= 257 else "gpt2"
        with open(os.path.join(data, "meta.json"), "w") as f:
            json.dump({"tokenizer": tokenizer, "n_vocab": cfg.vocab_size}, f)
        steps = cfg.warmup_steps + cfg.train_iters
        args = [f"--{k}={v!r}" for k, v in vars(cfg).items() if k in train_lm.Config.__dataclass_fields__]
        args += [f"--dataset={data}", f"--out_dir={os.path.join(tmp, 'out')}", f"--max_iters={steps}",
                 f"--eval_interval={steps}", "--eval_iters=1", "--log_interval=1", "--sample_at_end=False",
                 f"--peak_tflops={peak / 1e12}", "--init_from='scratch'"]
        train_lm.main(args)
        records = read_jsonl_records(os.path.join(tmp, "out", "metrics.jsonl"))
    ms = [r["ms_per_iter"] for r in records if "ms_per_iter" in r and r["iter"] > cfg.warmup_steps]
    return statistics.median(ms)


@torch.no_grad()
def bench_sampling(cfg, device, use_cache, autocast):
    """GPT.generate's new tokens per second, under the dtype the stages sample in (rt.autocast), as they call it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                          block_size=max(cfg.block_size, cfg.prompt_len + cfg.new_tokens), bias=cfg.bias)).eval().to(device)
    prompt = torch.randint(0, cfg.vocab_size, (cfg.sample_batch, cfg.prompt_len), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with autocast:
        model.generate(prompt, 4, use_cache=use_cache, generator=generator)  # warm-up
    rates = []
    for _ in range(cfg.sample_repeats):
        t0 = time.perf_counter()
        with autocast:
            out = model.generate(prompt, cfg.new_tokens, use_cache=use_cache, generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(cfg.sample_batch * (out.size(1) - cfg.prompt_len) / (time.perf_counter() - t0))
    return statistics.median(rates)


def random_rl_run(cfg, tmp):
    """Random-init SFT and reward-model checkpoints of the given size in tmp, and prompts of exactly prompt_len
    tokens; returns the arguments an RL stage needs to run on them."""
    from common import save_checkpoint
    from tokenizer import get_tokenizer
    tokenizer = "byte" if cfg.vocab_size <= 257 else "gpt2"
    tok = get_tokenizer(tokenizer)
    g = torch.Generator().manual_seed(0)
    # prompts of exactly prompt_len tokens that survive decode -> encode: words that are one token each
    words = [t for t in range(tok.n_vocab - 1) if tok.decode([t]).startswith(" ") and tok.decode([t])[1:].isalpha()]
    words = words or [t for t in range(tok.n_vocab - 1) if tok.decode([t]).isalpha()]  # bytes: the ASCII letters
    for name, head in (("sft", False), ("rm", True)):
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                              block_size=cfg.block_size, scalar_head=head))
        save_checkpoint(os.path.join(tmp, name, "ckpt.pt"), {"model_args": vars(model.config),
                                                              "model": model.state_dict(), "tokenizer": tokenizer})
    with open(os.path.join(tmp, "prompts.jsonl"), "w") as f:
        for _ in range(4 * cfg.sample_batch):
            ids = [words[i] for i in torch.randint(len(words), (cfg.prompt_len,), generator=g).tolist()]
            f.write(json.dumps({"prompt": tok.decode(ids)}) + "\n")
    prompts = os.path.join(tmp, "prompts.jsonl")
    return [f"--init_from={os.path.join(tmp, 'sft')}", f"--reward_model={os.path.join(tmp, 'rm')}",
            f"--prompts_file={prompts}", f"--eval_prompts={prompts}", "--eval_max_prompts=4", "--eval_samples=2",
            f"--max_iters={cfg.ppo_iters + 1}", "--eval_interval=1000", f"--max_new_tokens={cfg.new_tokens}",
            f"--device={cfg.device}", f"--dtype={cfg.dtype}"]


def iteration_times(metrics_path):
    """Median seconds per iteration (the first one left out: allocation) and its rollout / score / update split."""
    rows = [r for r in read_jsonl_records(metrics_path) if "rollout_s" in r][1:]
    split = {k: statistics.median(r[k] for r in rows) for k in ("rollout_s", "score_s", "update_s")}
    total = statistics.median(r["rollout_s"] + r["score_s"] + r["update_s"] for r in rows)
    return total, split, statistics.median(r["response_length"] for r in rows)


def bench_ppo(cfg):
    """train_ppo.py's own loop on random-init models: seconds per iteration and where they go."""
    import train_ppo
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ppo")
        train_ppo.main(random_rl_run(cfg, tmp) + [
            f"--out_dir={out}", f"--batch_size={cfg.sample_batch}", f"--minibatch_size={cfg.sample_batch}",
            f"--ppo_epochs={cfg.ppo_epochs}", f"--critic={cfg.ppo_critic}"])
        return iteration_times(os.path.join(out, "metrics.jsonl"))


def bench_grpo(cfg):
    """train_grpo.py's own loop on the same random-init models, with as many responses per iteration as PPO's
    (sample_batch / grpo_group prompts x grpo_group samples), scored by the reward model, with a reference."""
    import train_grpo
    if cfg.sample_batch % cfg.grpo_group:
        raise SystemExit(f"error: sample_batch={cfg.sample_batch} must be a multiple of grpo_group={cfg.grpo_group}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grpo")
        train_grpo.main(random_rl_run(cfg, tmp) + [
            f"--out_dir={out}", "--reward=model", f"--batch_size={cfg.sample_batch // cfg.grpo_group}",
            f"--group_size={cfg.grpo_group}", f"--update_epochs={cfg.ppo_epochs}", "--minibatch_size=0",
            f"--kl={cfg.grpo_kl}"])
        return iteration_times(os.path.join(out, "metrics.jsonl"))


def main(argv=None):
    cfg = load_config(Config, argv)
    rt = setup_runtime(cfg)
    print(f"machine: {machine()}")  # every figure below is this machine's
    print(f"torch {torch.__version__}, {rt.device}, {torch.get_num_threads()} threads, {rt.dtype}, "
          f"model {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}")
    results = {}
    if cfg.what in ("all", "train"):
        # MFU against the peak of the dtype the training runs in (bf16 autocast: bf16 products)
        peak = measure_matmul_flops(rt.device, n=2048, reps=10, dtype=rt.dtype)
        print(f"{rt.dtype} matmul (2048^3): {peak / 1e9:,.0f} GFLOP/s, the peak MFU is taken against")
        results["matmul_gflops"] = peak / 1e9
        datasheet = datasheet_peak_flops(rt.device, rt.dtype)
        if datasheet:  # on a GPU, MFU against the datasheet's peak of the dtype in use, as papers take it
            measured = measure_matmul_flops(rt.device, n=8192, reps=10, dtype=rt.dtype)
            print(f"{rt.dtype} matmul (8192^3): {measured / 1e12:,.0f} TFLOP/s measured; the datasheet's peak of the "
                  f"{torch.cuda.get_device_name(rt.device)}, {datasheet / 1e12:,.0f} TFLOP/s, is what MFU is taken "
                  f"against")
            results.update(matmul_tflops=measured / 1e12, peak_tflops=datasheet / 1e12)
            peak = datasheet
    if cfg.what in ("all", "train"):
        ms = bench_training(cfg, peak)
        tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              vocab_size=cfg.vocab_size, block_size=cfg.block_size, bias=cfg.bias))
        tok_s = tokens / (ms / 1000)
        mfu = model.estimate_mfu(tok_s, peak, cfg.block_size)
        results.update(train_ms_per_iter=ms, train_tokens_per_s=tok_s, train_mfu=mfu)
        print(f"training: {ms:.1f} ms/iter (median of {cfg.train_iters}), {tok_s:,.0f} tokens/s, MFU {mfu * 100:.1f}% "
              f"({model.get_num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size} x {cfg.block_size} tokens)")
    if cfg.what in ("all", "sample"):
        cached = bench_sampling(cfg, rt.device, use_cache=True, autocast=rt.autocast)
        results.update(sample_tokens_per_s_cached=cached)
        line = (f"sampling ({rt.dtype}, batch {cfg.sample_batch}, prompt {cfg.prompt_len}, {cfg.new_tokens} new): "
                f"{cached:,.1f} tokens/s with the KV cache")
        if cfg.sample_uncached:
            uncached = bench_sampling(cfg, rt.device, use_cache=False, autocast=rt.autocast)
            results.update(sample_tokens_per_s_uncached=uncached)
            line += f", {uncached:,.1f} without: {cached / uncached:.1f}x"
        print(line)
    lines = []
    if cfg.what in ("ppo", "grpo"):
        total, split, length = bench_ppo(cfg)
        ppo_length = length
        results.update(ppo_s_per_iter=total, **{f"ppo_{k}": v for k, v in split.items()})
        lines.append(f"PPO ({cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, batch {cfg.sample_batch}, "
                     f"prompts of {cfg.prompt_len} tokens, responses of {length:.0f}, {cfg.ppo_epochs} epoch(s), "
                     f"{cfg.ppo_critic} critic): {total:.2f} s/iteration (median of {cfg.ppo_iters}): rollout "
                     f"{split['rollout_s']:.2f} s, score {split['score_s']:.2f} s, update {split['update_s']:.2f} s")
    if cfg.what == "grpo":
        total, split, length = bench_grpo(cfg)
        results.update(grpo_s_per_iter=total, **{f"grpo_{k}": v for k, v in split.items()})
        lines.append(f"GRPO ({cfg.sample_batch // cfg.grpo_group} prompts x {cfg.grpo_group} samples, responses of "
                     f"{length:.0f}, {cfg.ppo_epochs} epoch(s), KL {cfg.grpo_kl}): {total:.2f} s/iteration (median of "
                     f"{cfg.ppo_iters}): rollout {split['rollout_s']:.2f} s, score {split['score_s']:.2f} s, "
                     f"update {split['update_s']:.2f} s")
        # with a small vocabulary a random model samples end-of-text now and then: compare at equal lengths only
        lines.append(f"GRPO / PPO time per iteration, {cfg.sample_batch} responses each: "
                     f"{results['grpo_s_per_iter'] / results['ppo_s_per_iter']:.2f} (mean response lengths "
                     f"{length:.0f} and {ppo_length:.0f} tokens)")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
