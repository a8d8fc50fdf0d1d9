"""
Benchmark: how fast this machine trains and samples a given model, measured, not asserted.

    python bench.py config/lm_small.py                 # the small pretraining config
    python bench.py --n_layer=6 --n_head=6 --n_embd=384 --vocab_size=50304 --batch_size=12   # nanoGPT's sizes
    python bench.py --what=sample --vocab_size=50257 --sample_batch=16 --prompt_len=32 --new_tokens=128

Prints
- this device's float32 matmul throughput (the peak MFU is measured against),
- training tokens/s, ms per step and MFU of train_lm.py's own loop (it runs train_lm.main on random tokens),
- sampling tokens/s of GPT.generate with and without the KV cache, and the speed-up.
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
from common import RunConfig, load_config, measure_matmul_flops, read_jsonl_records, setup_runtime
from model import GPT, GPTConfig


@dataclass
class Config(train_lm.Config):
    what: Literal["all", "train", "sample"] = "all"  # which measurements to take
    vocab_size: int = 257  # random tokens from this vocabulary (257: byte tokenizer; 50304/50257: GPT-2)
    train_iters: int = 30  # timed training steps (after warmup_steps)
    warmup_steps: int = 5  # untimed steps first: allocation, compilation
    sample_batch: int = 16  # sequences sampled at once
    prompt_len: int = 32  # prompt tokens
    new_tokens: int = 128  # tokens generated per sequence
    sample_repeats: int = 3  # generate calls timed; the median is reported


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
def bench_sampling(cfg, device, use_cache):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                          block_size=max(cfg.block_size, cfg.prompt_len + cfg.new_tokens), bias=cfg.bias)).eval().to(device)
    prompt = torch.randint(0, cfg.vocab_size, (cfg.sample_batch, cfg.prompt_len), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    model.generate(prompt, 4, use_cache=use_cache, generator=generator)  # warm-up
    rates = []
    for _ in range(cfg.sample_repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, cfg.new_tokens, use_cache=use_cache, generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(cfg.sample_batch * (out.size(1) - cfg.prompt_len) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None):
    cfg = load_config(Config, argv)
    rt = setup_runtime(cfg)
    print(f"torch {torch.__version__}, {rt.device}, {torch.get_num_threads()} threads, {rt.dtype}, "
          f"model {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}")
    peak = measure_matmul_flops(rt.device, n=2048, reps=10)
    print(f"float32 matmul (2048^3): {peak / 1e9:,.0f} GFLOP/s")
    results = {"matmul_gflops": peak / 1e9}
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
        cached = bench_sampling(cfg, rt.device, use_cache=True)
        uncached = bench_sampling(cfg, rt.device, use_cache=False)
        results.update(sample_tokens_per_s_cached=cached, sample_tokens_per_s_uncached=uncached)
        print(f"sampling (batch {cfg.sample_batch}, prompt {cfg.prompt_len}, {cfg.new_tokens} new): "
              f"{cached:,.1f} tokens/s with the KV cache, {uncached:,.1f} without: {cached / uncached:.1f}x")
    return results


if __name__ == "__main__":
    main()
