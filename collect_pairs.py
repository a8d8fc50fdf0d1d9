"""
Stage 2a of the recipe: collect comparisons of the SFT model's own responses, for the reward model to learn from.

InstructGPT's labelers did not rank made-up answers: they ranked several samples of the SFT model for the same
prompt. That matters. A reward model only knows the responses it was shown; trained only on hand-made
corruptions (data/pycode/prepare.py's pref_*.jsonl: a bracket removed, a line cut off...), it cannot tell which
of the policy's own mistakes are mistakes, and PPO, which samples from the policy, finds that blind spot at once.

So for each prompt we sample a few responses from the SFT model, as PPO will, and a labeler ranks them. Our
labeler is a program instead of a person, the task's judge (tasks/pycode.py `grade`; nothing is executed): a
response that solves its prompt (a valid, non-trivial body that reads the function's arguments and is not a
template) ranks above one that is valid but ignores the arguments, above a trivial one, above one that does not
parse or never ends. Each sample that does not solve its prompt becomes the rejected response of a pair whose
chosen response is a sample of the same prompt that does, or the real body when the model wrote none. Pairs have kind 'sampled', and the files have the format of prepare.py's, so train_rm.py
reads them beside those (train_file and val_file take comma-separated lists).

Run (after train_sft.py; about 2 minutes on a 2-core laptop CPU):
    python collect_pairs.py config/pairs_small.py
On several GPUs (or CPU processes), each samples a share of the prompts; the labeler judges all samples together:
    torchrun --standalone --nproc_per_node=4 collect_pairs.py config/pairs_small.py
Every key: python collect_pairs.py --help
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

import tasks
from common import (complete, encode_prompt_response, field, format_duration, format_prompt, load_checkpoint,
                    model_from_checkpoint, read_sft_examples, RunConfig, start_stage, UserError, write_atomic,
                    write_jsonl)
from tokenizer import get_tokenizer


@dataclass
class Config(RunConfig):
    out_dir: str = "out/pairs"  # where pref_train.jsonl, pref_val.jsonl and meta.json are written
    init_from: str = "out/sft"  # the SFT out_dir whose samples are ranked
    train_file: str = "data/pycode/sft_train.jsonl"  # prompts (with their real responses) for training pairs
    val_file: str = "data/pycode/sft_val.jsonl"  # prompts for held-out pairs: the reward model never trains on them
    template: Literal["none", "instruction"] = "none"  # prompt template, as used in SFT
    task: str = "pycode"  # the task module (tasks/<task>.py) whose labeler, grade(), ranks the samples
    samples_per_prompt: int = field(4, min=1)  # responses sampled per prompt; each bad one can make a pair
    max_pairs_per_prompt: int = field(2, min=1)  # at most this many pairs per prompt, so no prompt dominates
    max_new_tokens: int = field(96, min=1)  # as in train_ppo.py: the responses PPO will sample
    temperature: float = field(1.0, above=0)  # as in train_ppo.py's rollouts
    batch_size: int = field(64, min=1)  # samples per generate call (batch_size // samples_per_prompt prompts)
    empty_pairs: bool = True  # also, for every training prompt, a good response against the empty one (kind 'empty')


def ranked_pairs(reference, samples, rng, max_pairs, task=tasks.load("pycode")):
    """[(chosen, rejected)] for one prompt from its [(response, grade)] samples: each distinct response that does not
    solve the prompt (an empty one too: saying nothing is a bad answer) against a sample that does, or against the
    real body if the model wrote none. The closest misses are paired first: a valid body that ignores the arguments
    teaches the difference the task is about, where broken syntax is plentiful among prepare.py's made-up pairs."""
    good = sorted({r for r, g in samples if g == task.SOLVED})
    # the random tie-break is drawn in sorted order: a set's own order changes with Python's string hashing
    # (PYTHONHASHSEED), and the same seed would then pair different samples from one run to the next
    bad = sorted(sorted({(g, r) for r, g in samples if g < task.SOLVED}), key=lambda gr: (-gr[0], rng.random()))
    return [(rng.choice(good) if good else reference, r) for _, r in bad[:max_pairs]]


def collect(model, tok, examples, cfg, rt, rng, generator, empty_pairs=False):
    """Sample, label and pair the responses for [(prompt, reference)]; returns (pair rows, counts).
    empty_pairs: also a pair (a good response, the empty one) for every prompt. Saying nothing is the cheapest
    response to score with, and PPO finds it for the prompts where the reward model never saw it lose.
    Under torchrun `complete` shares the prompts out and hands every process all the samples: each then ranks
    and pairs them alike, and the first one writes them."""
    task = tasks.load(cfg.task)
    max_prompt = model.config.block_size - cfg.max_new_tokens
    kept = [(format_prompt(p, cfg.template), r) for p, r in examples]
    kept = [(p, r) for p, r in kept if encode_prompt_response(tok, p, r, model.config.block_size) is not None
            and len(tok.encode(p)) <= max_prompt]
    texts, rows = complete(model, tok, [p for p, _ in kept], cfg.max_new_tokens, batch_size=cfg.batch_size,
                           device=rt.device, autocast=rt.autocast, greedy=False, temperature=cfg.temperature,
                           generator=generator, samples=cfg.samples_per_prompt)
    prompts = [p for p, _ in kept for _ in range(cfg.samples_per_prompt)]  # the prompt of each sample
    # every sample of the split is judged together: a body the model gives to many prompts is a template
    grades = task.grade(prompts, texts, [row[-1:] == [tok.eot_token] for _, row in rows])
    out, k = [], cfg.samples_per_prompt
    for i, (prompt, reference) in enumerate(kept):
        samples = list(zip(texts[i * k:(i + 1) * k], grades[i * k:(i + 1) * k]))
        for chosen, rejected in ranked_pairs(reference, samples, rng, cfg.max_pairs_per_prompt, task):
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": "sampled"})
        if empty_pairs and "" not in {r for r, _ in samples}:
            good = sorted({r for r, g in samples if g == task.SOLVED})
            out.append({"prompt": prompt, "chosen": rng.choice(good) if good else reference, "rejected": "",
                        "kind": "empty"})
    counts = {"prompts": len(kept), "prompts_dropped": len(examples) - len(kept), "samples": len(texts),
              "good_share": sum(g == task.SOLVED for g in grades) / max(len(grades), 1),
              "grades": {str(g): grades.count(g) for g in range(task.SOLVED + 1)}, "pairs": len(out)}
    return out, counts


def main(argv=None):
    cfg, rt = start_stage(Config, argv, "collect_pairs.py")
    if not hasattr(tasks.load(cfg.task), "grade"):
        raise UserError(f"the task {cfg.task!r} has no labeler to rank samples with (tasks/{cfg.task}.py has no "
                        f"grade()); its pairs come from its own data")
    ckpt = load_checkpoint(cfg.init_from, hint="make it with `python train_sft.py config/sft_small.py`")
    tok = get_tokenizer(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt, cfg.init_from, dropout=0.0).to(rt.device).eval()
    t0 = time.time()
    meta = {"config": asdict(cfg), "tokenizer": tok.name}
    for split, path in (("train", cfg.train_file), ("val", cfg.val_file)):
        rng = random.Random(f"{cfg.seed}:{split}")
        generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + (split == "val"))
        # the empty pairs are for training only: held-out pairs stay the model's own samples
        rows, counts = collect(model, tok, read_sft_examples(path), cfg, rt, rng, generator,
                               empty_pairs=cfg.empty_pairs and split == "train")
        if rt.is_master:
            write_jsonl(os.path.join(cfg.out_dir, f"pref_{split}.jsonl"), rows)
        meta[split] = counts
        print(f"{split}: {counts['prompts']} prompts x {cfg.samples_per_prompt} samples, "
              f"{counts['good_share']:.1%} good -> {counts['pairs']} pairs ({format_duration(time.time() - t0)})")
    if rt.is_master:
        write_atomic(os.path.join(cfg.out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    print(f"done in {format_duration(time.time() - t0)}; wrote {cfg.out_dir}/pref_train.jsonl, pref_val.jsonl, "
          f"meta.json")
    return meta


if __name__ == "__main__":
    main()
