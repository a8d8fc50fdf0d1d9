"""
The whole recipe at the small scale in one command: prepare -> pretrain -> SFT -> comparisons of the SFT model's
samples -> reward model -> PPO, GRPO (critic-free, on the task's judge) and DPO (from the same SFT model, with no
reward model), then a report with every stage's numbers and plots and SFT, PPO, GRPO and DPO side by side on the
same held-out prompts. Each stage is exactly the
command you could type yourself; it is printed as it starts.

RL results vary from seed to seed, so every RL stage runs once per seed (--seeds, 3 by default) from the same SFT
and reward model, and the report gives the mean, min and max over seeds of each measure. The first seed's run goes
on to twice the config's iterations (its result is still read at the config's last iteration), so that its curve
shows whether the default stops at a lucky peak; it also evaluates the SFT model all seeds start from.

Pretraining and SFT take every thread, one after the other. After them, two runs at a time, one thread each, each
as soon as what it needs exists: the pairs, then the reward model beside GRPO and DPO (which need no reward model),
then PPO.

    python pipeline.py                 # about 25 minutes on a 2-core CPU; finished stages are skipped
    python pipeline.py --seeds=1       # one seed per RL stage: a quick look, not a result
    python pipeline.py --compare=True  # also PPO on the judge, GRPO on the RM, Dr. GRPO, RLOO, best-of-8, over the seeds
    python pipeline.py --redo=sft      # run SFT again, and every stage after it
    python pipeline.py --redo=all      # everything from scratch
The report: out/report.md (and the tables are printed at the end).
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import (auto_cpu_dtype, field, format_duration, load_config, machine, plot_curves, read_jsonl_records,
                    UserError, write_atomic)

ROOT = os.path.dirname(os.path.abspath(__file__))
# the RL stages, each run once per seed: (title, script, config file, extra arguments)
RL_STAGES = {"ppo": ("PPO", "train_ppo.py", "config/ppo_small.py", []),
             "grpo": ("GRPO", "train_grpo.py", "config/grpo_small.py", []),
             "dpo": ("DPO", "train_dpo.py", "config/dpo_small.py", [])}
# --compare=True adds the other methods, over the same seeds, to the side-by-side table
BEST_OF = 8
VARIANTS = {"ppo_task": ("PPO on the judge", "train_ppo.py", "config/ppo_small.py", ["--reward=task"]),
            "grpo_rm": ("GRPO on the reward model", "train_grpo.py", "config/grpo_small.py", ["--reward=model"]),
            "dr_grpo": ("Dr. GRPO", "train_grpo.py", "config/grpo_small.py", ["--advantage=dr_grpo"]),
            "rloo": ("RLOO", "train_grpo.py", "config/grpo_small.py", ["--advantage=rloo"]),
            "bon_task": (f"best-of-{BEST_OF}, the judge", "train_grpo.py", "config/grpo_small.py",
                         [f"--best_of_n={BEST_OF}"]),
            "bon_rm": (f"best-of-{BEST_OF}, the reward model", "train_grpo.py", "config/grpo_small.py",
                       [f"--best_of_n={BEST_OF}", "--reward=model"])}
STAGE_NAMES = ("prepare", "pretrain", "sft", "pairs", "rm") + tuple(RL_STAGES) + tuple(VARIANTS)


@dataclass
class Config:
    redo: Literal["none", "all", "prepare", "pretrain", "sft", "pairs", "rm", "ppo", "grpo", "dpo", "ppo_task", "grpo_rm",
                  "dr_grpo", "rloo", "bon_task", "bon_rm"] = "none"  # run this stage, and every stage after it, again
    out: str = "out"  # where the stages' out_dirs and report.md go
    seeds: int = field(3, min=1)  # each RL stage runs with seeds 1..seeds; the report gives mean, min and max
    long_run: bool = True  # the first seed of each RL stage runs to twice the config's iterations
    jobs: int = field(2, min=1)  # RL runs at once, one thread each: on 2 cores, two such runs beat one after the other
    compare: bool = False  # also PPO on the judge, GRPO on the RM, Dr. GRPO, RLOO, best-of-N, over the same seeds
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # every stage's precision ('auto': bf16 where native and faster)
    tiny: bool = False  # seconds, not minutes: tiny models and data, to check that the plumbing works


@dataclass
class Run:
    stage: str  # one of STAGE_NAMES
    cmd: list  # the command, as typed
    done: str  # the file a finished run leaves last
    out_dir: str
    seed: int = 0  # RL stages: the seed of this run
    report_iter: int = 0  # RL stages: the iteration whose evaluation is this run's result (the config's max_iters)
    needs: tuple = ()  # the stages whose runs must all have finished before this one starts
    alone: bool = False  # runs with every thread, nothing beside it (the stages everything after needs)


def rl_iterations(script, config_file, extra):
    """(max_iters, eval_interval) of an RL stage as its config and the extra arguments set them."""
    module = __import__(script[:-3])
    cfg = load_config(module.Config, [config_file] + [a for a in extra if a.startswith("--")])
    return cfg.max_iters, cfg.eval_interval


def stages(cfg):
    """Every run in order. Plain commands, unless --out or --tiny change where things go."""
    py = sys.executable
    data = "data/pycode" if not cfg.tiny else os.path.join(cfg.out, "data")
    out = lambda name: os.path.join(cfg.out, name)
    custom = cfg.out != "out" or cfg.tiny
    precision = [f"--dtype={cfg.dtype}"] if cfg.dtype != "auto" else []
    extra = {name: ([f"--out_dir={out(name)}"] if custom else []) + precision
             for name in ("lm_small", "sft_small", "pairs_small", "rm_small", "ppo_small", "grpo_small", "dpo_small")}
    prepare = [py, "data/pycode/prepare.py"]
    if cfg.tiny:
        prepare += [f"--out_dir={data}", "--max_files=120", "--val_every=3"]
        extra["lm_small"] += [f"--dataset={os.path.abspath(data)}", "--max_iters=30", "--eval_interval=15",
                              "--n_layer=2", "--n_embd=64", "--n_head=2", "--eval_iters=2", "--log_interval=10"]
        files = [f"--train_file={data}/sft_train.jsonl", f"--val_file={data}/sft_val.jsonl"]
        extra["sft_small"] += files + [f"--eval_prompts={data}/prompts_eval.jsonl", "--max_iters=10",
                                       "--eval_interval=10", "--eval_max_prompts=16", "--log_interval=5",
                                       "--eval_samples=2"]
        extra["pairs_small"] += files + ["--max_new_tokens=32", "--samples_per_prompt=2"]
        extra["rm_small"] += ["--max_iters=10", "--eval_interval=10", "--log_interval=5"]
        extra["ppo_small"] += [f"--prompts_file={data}/prompts_train.jsonl", f"--eval_prompts={data}/prompts_eval.jsonl",
                               "--max_iters=2", "--eval_interval=1", "--eval_max_prompts=16", "--batch_size=8",
                               "--minibatch_size=4", "--max_new_tokens=32", "--eval_samples=2"]
        extra["grpo_small"] += [f"--prompts_file={data}/prompts_train.jsonl",
                                f"--eval_prompts={data}/prompts_eval.jsonl", "--max_iters=2", "--eval_interval=1",
                                "--eval_max_prompts=16", "--batch_size=4", "--group_size=2", "--max_new_tokens=32",
                                "--eval_samples=2"]
        extra["dpo_small"] += [f"--eval_prompts={data}/prompts_eval.jsonl", "--max_iters=4", "--eval_interval=2",
                               "--eval_max_prompts=16", "--batch_size=8", "--max_new_tokens=32", "--log_interval=2",
                               "--eval_samples=2"]
    if custom:
        extra["sft_small"] += [f"--init_from={out('lm_small')}"]
        extra["pairs_small"] += [f"--init_from={out('sft_small')}"]
        extra["rm_small"] += [f"--init_from={out('lm_small')}"] + [
            f"--{split}_file={data}/pref_{split}.jsonl,{out('pairs_small')}/pref_{split}.jsonl" for split in ("train", "val")]
        extra["ppo_small"] += [f"--init_from={out('sft_small')}", f"--reward_model={out('rm_small')}"]
        extra["grpo_small"] += [f"--init_from={out('sft_small')}", f"--reward_model={out('rm_small')}"]
        extra["dpo_small"] += [f"--init_from={out('sft_small')}"] + [
            f"--{split}_file={out('pairs_small')}/pref_{split}.jsonl" for split in ("train", "val")]
    runs = [
        Run("prepare", prepare, os.path.join(data, "meta.json"), data, alone=True),
        Run("pretrain", [py, "train_lm.py", "config/lm_small.py"] + extra["lm_small"], "loss.png", out("lm_small"),
            alone=True),
        Run("sft", [py, "train_sft.py", "config/sft_small.py"] + extra["sft_small"], "sft.png", out("sft_small"),
            alone=True),
        Run("pairs", [py, "collect_pairs.py", "config/pairs_small.py"] + extra["pairs_small"], "meta.json",
            out("pairs_small"), needs=("sft",)),
        Run("rm", [py, "train_rm.py", "config/rm_small.py"] + extra["rm_small"], "rm.png", out("rm_small"),
            needs=("pairs",)),
    ]
    for stage, (_, script, config_file, variant_args) in {**RL_STAGES, **(VARIANTS if cfg.compare else {})}.items():
        base = {"train_ppo.py": "ppo_small", "train_grpo.py": "grpo_small", "train_dpo.py": "dpo_small"}[script]
        args = [a for a in extra[base] if not a.startswith("--out_dir=")] + variant_args
        max_iters, eval_interval = rl_iterations(script, config_file, args)
        if max_iters % eval_interval:
            raise UserError(f"{config_file}: eval_interval={eval_interval} must divide max_iters={max_iters}, so that "
                            f"every seed is evaluated at its last iteration")
        best_of = any(a.startswith("--best_of_n=") for a in variant_args)
        # GRPO on the judge needs only the SFT model, DPO the pairs: they run while the reward model trains
        needs = {"train_ppo.py": ("rm",), "train_dpo.py": ("pairs",),
                 "train_grpo.py": ("rm",) if "--reward=model" in args else ("sft",)}[script]
        for seed in range(1, cfg.seeds + 1):
            out_dir = os.path.join(out(f"{stage}_small"), f"seed{seed}")
            # the long run: twice the iterations, evaluated twice as often, so its curve shows what comes after
            longer = ([f"--max_iters={2 * max_iters}", f"--eval_interval={max_iters // 2 or 1}"]
                      if seed == 1 and cfg.long_run and stage in RL_STAGES else [])
            # every seed starts from the same SFT model: the first seed evaluates it, the others need not again
            once = ["--eval_at_start=False"] if seed > 1 and not best_of else []
            runs.append(Run(stage, [py, script, config_file] + args + [f"--out_dir={out_dir}", f"--seed={seed}"]
                            + longer + once, "report.md", out_dir, seed, BEST_OF if best_of else max_iters, needs))
    return runs


def run_stages(cfg):
    """Run each stage that has not finished (or that --redo asks for); return {stage: seconds}. Pretraining and SFT
    run one after the other with every thread; the runs after them (the pairs, the reward model, every seed of
    every RL stage) cfg.jobs at a time, each as soon as the stages it needs have finished."""
    timings_path = os.path.join(cfg.out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    redo_from = STAGE_NAMES.index(cfg.redo) if cfg.redo in STAGE_NAMES else (0 if cfg.redo == "all" else None)
    redone, later = set(), []

    def save_timings():
        os.makedirs(os.path.join(ROOT, cfg.out), exist_ok=True)
        write_atomic(os.path.join(ROOT, timings_path), lambda f: f.write(json.dumps(timings, indent=1).encode()))

    for run in stages(cfg):
        done_path = run.done if run.stage == "prepare" else os.path.join(run.out_dir, run.done)
        again = redo_from is not None and STAGE_NAMES.index(run.stage) >= redo_from
        if os.path.exists(os.path.join(ROOT, done_path)) and not again:
            print(f"[{run.stage}] done already ({done_path}); skipping (--redo={run.stage} runs it again)")
            continue
        if run.stage not in redone:  # a stage's time is the sum of its runs, counted afresh when it runs again
            timings[run.stage] = 0.0
            redone.add(run.stage)
        if not run.alone:
            later.append(run)
            continue
        print(f"\n[{run.stage}] $ {shown(run.cmd)}", flush=True)
        t0 = time.time()
        if subprocess.run(run.cmd, cwd=ROOT).returncode != 0:
            raise UserError(f"stage '{run.stage}' failed; see its output above. Fix it and run `python pipeline.py` "
                            f"again: finished stages are skipped")
        timings[run.stage] += time.time() - t0
        save_timings()
        print(f"[{run.stage}] finished in {format_duration(time.time() - t0)}")
    if later:
        t0 = time.time()
        run_in_parallel(later, cfg.jobs, timings, save_timings)
        timings["parallel_wall"] = time.time() - t0  # shorter than the runs' sum: several run at once
        save_timings()
    return timings


def shown(cmd):
    return " ".join(shlex.quote(c) for c in ["python"] + cmd[1:])


def run_in_parallel(runs, jobs, timings, save_timings):
    """Run `jobs` runs at a time, each once every stage it needs has no run left to do, the first ready in the
    order of `runs` (the reward model before the RL runs that wait for it). With more than one at a time, each gets
    one thread (two processes of two threads each on two cores spin against each other) and writes its output to
    out_dir/log.txt."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else None
    pending, running = list(runs), []
    unfinished = lambda stage: any(r.stage == stage for r in pending) or any(r.stage == stage for r, *_ in running)
    while pending or running:
        while len(running) < jobs:
            run = next((r for r in pending if not any(unfinished(stage) for stage in r.needs)), None)
            if run is None:
                break
            pending.remove(run)
            name = f"{run.stage} seed {run.seed}" if run.seed else run.stage
            if jobs > 1:
                os.makedirs(os.path.join(ROOT, run.out_dir), exist_ok=True)
                log = open(os.path.join(ROOT, run.out_dir, "log.txt"), "w")
                print(f"\n[{name}] $ {shown(run.cmd)}   (output: {os.path.join(run.out_dir, 'log.txt')})", flush=True)
            else:
                log = None
                print(f"\n[{name}] $ {shown(run.cmd)}", flush=True)
            proc = subprocess.Popen(run.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
            running.append((run, name, proc, log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            run, name, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if log:
                log.close()
            if proc.returncode != 0:
                for _, _, other, _, _ in running:
                    other.terminate()  # stops after its current step and saves a checkpoint (StopRequest)
                tail = open(os.path.join(ROOT, run.out_dir, "log.txt")).read()[-2000:] if log else ""
                raise UserError(f"'{name}' failed (exit status {proc.returncode}){'; the end of its output:' if tail else ''}"
                                f"\n{tail}\nFix it and run `python pipeline.py` again: finished runs are skipped")
            timings[run.stage] += time.time() - t0
            save_timings()
            print(f"[{name}] finished in {format_duration(time.time() - t0)}"
                  + (f"; {len(pending) + len(running)} runs to go" if pending or running else ""), flush=True)


# --------------------------------------------------------------------------------------------------------------
# the report

def records(path, key):
    return [r for r in read_jsonl_records(path) if key in r] if os.path.exists(path) else []


def evaluations(out_dir):
    """{iteration: the task's measures} of one RL run, from its metrics.jsonl (PPO and GRPO prefix them with
    'eval_'); for a best-of-N run, {k: the measures of best-of-k}."""
    out = {}
    for r in (read_jsonl_records(os.path.join(out_dir, "metrics.jsonl"))
              if os.path.exists(os.path.join(out_dir, "metrics.jsonl")) else []):
        if "eval_solved" in r:
            out[r.get("iter", r.get("best_of"))] = {k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_")}
        elif "solved" in r:
            out[r["iter"]] = r
    return out


def spread(values):
    """'mean (min–max)' of the seeds' values, or the one value."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout
        return rev.strip() + (" with uncommitted changes" if dirty.strip() else "") if rev.strip() else "unknown"
    except OSError:
        return "unknown"


def seed_curve(run, start):
    """{iteration: measures} of one RL run, from the SFT model's evaluation (start: iteration 0) on. Seeds after the
    first do not evaluate the SFT model again (--eval_at_start=False): it is the same model, evaluated once."""
    ev = evaluations(run.out_dir)
    if 0 not in ev and start and ev:
        ev[0] = start
    return dict(sorted(ev.items()))


def plot_seeds(path, stage, title, runs, start):
    """One PNG per RL stage: each seed's held-out solved rate, reward-model score and KL to SFT against the
    iteration, and solved against KL (gold against distance from SFT: where over-optimisation shows)."""
    panels = {"solved, functions with arguments": {}, "reward model's score (the proxy)": {},
              "KL to SFT (nats/response)": {}, "solved against KL to SFT": {}}
    for run in runs:
        ev = seed_curve(run, start)
        its = sorted(ev)
        name = f"seed {run.seed}"
        panels["solved, functions with arguments"][name] = (its, [ev[i]["solved_args"] for i in its])
        if all("rm_score" in ev[i] for i in its) and its:
            panels["reward model's score (the proxy)"][name] = (its, [ev[i]["rm_score"] for i in its])
        with_kl = [i for i in its if "kl" in ev[i]]
        panels["KL to SFT (nats/response)"][name] = (with_kl, [ev[i]["kl"] for i in with_kl])
        panels["solved against KL to SFT"][name] = ([ev[i]["kl"] for i in with_kl], [ev[i]["solved_args"] for i in with_kl])
    panels = {k: v for k, v in panels.items() if v}
    marks = {"solved, functions with arguments": runs[0].report_iter, "reward model's score (the proxy)":
             runs[0].report_iter, "KL to SFT (nats/response)": runs[0].report_iter}
    plot_curves(path, panels, f"{title}: {len(runs)} seeds (dashed: the config's last iteration)",
                xlabels={"solved against KL to SFT": "KL to SFT (nats/response)"}, vlines=marks)


def write_report(cfg, timings, argv):
    runs = stages(cfg)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    wall = lambda name: format_duration(timings[name]) if name in timings else "–"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "–"
    lm = records(os.path.join(by_stage["pretrain"][0].out_dir, "metrics.jsonl"), "val_loss")
    sft_records = records(os.path.join(by_stage["sft"][0].out_dir, "metrics.jsonl"), "solved")
    sft0, sft = (sft_records[0], sft_records[-1]) if sft_records else ({}, {})
    rm = (records(os.path.join(by_stage["rm"][0].out_dir, "metrics.jsonl"), "val_accuracy") or [{}])[-1]
    pairs_meta = os.path.join(by_stage["pairs"][0].out_dir, "meta.json")
    pairs = json.load(open(pairs_meta)).get("train", {}) if os.path.exists(pairs_meta) else {}

    lines = ["| stage | measure | value | wall time |", "|---|---|---|---|",
             f"| prepare | data | {by_stage['prepare'][0].out_dir} | {wall('prepare')} |",
             f"| pretrain | val loss (nats/token) | {fmt((lm or [{}])[-1].get('val_loss'))} | {wall('pretrain')} |",
             f"| SFT | val response loss | {fmt(sft0.get('val_loss'))} → {fmt(sft.get('val_loss'))} | {wall('sft')} |",
             f"| SFT | solved, functions with arguments | {fmt(sft0.get('solved_args'))} → {fmt(sft.get('solved_args'))} | |",
             f"| SFT | solved, all prompts | {fmt(sft0.get('solved'))} → {fmt(sft.get('solved'))} | |",
             f"| pairs | SFT samples that solve their prompt | {fmt(pairs.get('good_share'))} | {wall('pairs')} |",
             f"| RM | held-out accuracy, all pairs | {fmt(rm.get('val_accuracy'))} | {wall('rm')} |"]
    for path, acc in sorted(rm.get("val_accuracy_by_file", {}).items()):
        lines.append(f"| RM | held-out accuracy: {path} | {fmt(acc)} | |")
    for kind, acc in sorted(rm.get("val_accuracy_by_kind", {}).items()):
        lines.append(f"| RM | accuracy: {kind} | {fmt(acc)} | |")
    methods = {**RL_STAGES, **{k: v for k, v in VARIANTS.items() if k in by_stage}}
    for stage, (title, *_) in methods.items():
        lines.append(f"| {title} | {len(by_stage[stage])} seeds (the time: all of them, one thread each) | | "
                     f"{wall(stage)} |")
    if "parallel_wall" in timings:
        lines.append(f"| pairs, RM and RL runs | wall time, {cfg.jobs} runs at a time (one thread each when more "
                     f"than one) | | {wall('parallel_wall')} |")

    # the side-by-side table: SFT (the same evaluation, from the first RL run's iteration 0) and each method at the
    # config's last iteration, mean (min–max) over seeds
    results = {stage: [evaluations(r.out_dir).get(r.report_iter, {}) for r in by_stage[stage]] for stage in methods}
    befores = [evaluations(r.out_dir).get(0, {}) for stage in RL_STAGES for r in by_stage[stage]]
    sft_eval = next((b for b in befores if b), {})
    k = next((key.split("@")[1] for key in sft_eval if key.startswith("pass@") and not key.endswith("_args")), "k")
    measures = [("solved, with arguments", "solved_args"), ("solved, all", "solved"), ("parses", "parses"),
                ("template share", "template"), ("chrF to the real body", "chrf"), (f"pass@{k}, with arguments",
                f"pass@{k}_args"), ("KL to SFT (nats)", "kl"), ("reward model's score", "rm_score")]
    side = ["| method | seeds | " + " | ".join(label for label, _ in measures) + " | wall time, all seeds |",
            "|---" * (3 + len(measures)) + "|",
            "| SFT | | " + " | ".join("0" if key == "kl" else fmt(sft_eval.get(key)) for _, key in measures) + " | |"]
    for stage, (title, *_) in methods.items():
        side.append(f"| {title} | {len(by_stage[stage])} | "
                    + " | ".join(spread([r.get(key) for r in results[stage]]) for _, key in measures)
                    + f" | {wall(stage)} |")
    gains = []
    for stage, (title, *_) in methods.items():
        deltas = [r["solved_args"] - sft_eval["solved_args"] for r in results[stage] if "solved_args" in r and sft_eval]
        if deltas:
            gains.append(f"- {title}: solved on functions with arguments {min(deltas):+.3f} to {max(deltas):+.3f} "
                         f"against SFT over {len(deltas)} seeds (per seed: {', '.join(f'{d:+.3f}' for d in deltas)}); "
                         + ("it helps in every seed" if min(deltas) > 0 else "it does not help in every seed"))
    # the wall time: pretraining and SFT one after the other, then the wall time of the runs after them (several
    # at once)
    total = sum(timings.get(n, 0) for n in STAGE_NAMES[:3]) + timings.get(
        "parallel_wall", sum(timings.get(n, 0) for n in STAGE_NAMES[3:5] + tuple(methods)))
    command = " ".join(["python pipeline.py"] + [shlex.quote(a) for a in argv])
    sections = [f"# The RLHF recipe, small scale\n\n`{command}` at commit {commit()}, {time.strftime('%Y-%m-%d %H:%M')}, on {machine()}. Wall time of the "
                f"stages: {format_duration(total)}.\n\n## Results\n\n" + "\n".join(lines),
                "\n## SFT and the RL stages on the held-out prompts\n\nGreedy completions of the same held-out prompts "
                "(tasks/pycode.py judges them); pass@k and the KL to the SFT model from sampled ones (best-of-N: the "
                "closed form, an upper bound). Each method: mean (min–max) over seeds, at the config's last "
                "iteration.\n\n" + "\n".join(side) + "\n\n"
                + "\n".join(gains) + "\n\n## Curves\n"]
    for title, stage, png in (("pretraining", "pretrain", "loss.png"), ("SFT", "sft", "sft.png"),
                              ("reward model", "rm", "rm.png")):
        sections.append(f"### {title}\n\n![{title}]({os.path.relpath(os.path.join(by_stage[stage][0].out_dir, png), cfg.out)})\n")
    for stage, (title, _, _, args) in methods.items():
        if any(a.startswith("--best_of_n=") for a in args):
            continue  # no iterations: its table row says it all
        png = os.path.join(cfg.out, f"{stage}_seeds.png")
        plot_seeds(png, stage, title, by_stage[stage], sft_eval)
        sections.append(f"### {title}, every seed\n\n![{title}]({os.path.basename(png)})\n")
        # at the config's last iteration, and along the whole curve: its peak, and where the longest run ended
        per_seed = ["| seed | iterations run | solved, with arguments | solved | template | chrF | KL | "
                    "peak of the curve, with arguments (iteration) | last evaluation, with arguments (iteration) |",
                    "|---" * 9 + "|"]
        for run, r in zip(by_stage[stage], results[stage]):
            ev = {i: m for i, m in seed_curve(run, sft_eval).items() if "solved_args" in m}
            peak = max(ev, key=lambda i: ev[i]["solved_args"]) if ev else None
            curve = (f"{fmt(ev[peak]['solved_args'])} ({peak}) | {fmt(ev[max(ev)]['solved_args'])} ({max(ev)})"
                     if ev else "– | –")
            per_seed.append(f"| {run.seed} | {max(ev) if ev else '–'} | {fmt(r.get('solved_args'))} | {fmt(r.get('solved'))} | "
                            f"{fmt(r.get('template'))} | {fmt(r.get('chrf'))} | {fmt(r.get('kl'))} | {curve} |")
        sections.append("\n".join(per_seed) + "\n")
    for stage, (title, *_) in RL_STAGES.items():
        stage_report = os.path.join(by_stage[stage][0].out_dir, "report.md")
        if os.path.exists(stage_report):
            text = open(stage_report).read()
            samples = text[text.find("## Samples") + len("## Samples"):] if "## Samples" in text else ""
            sections.append(f"## Before and after {title} (seed 1): sample completions" + samples)
    report = "\n".join(sections)
    write_atomic(os.path.join(cfg.out, "report.md"), lambda f: f.write(report.encode("utf-8")))
    return "\n".join(lines) + "\n\n" + "\n".join(side) + "\n\n" + "\n".join(gains), total


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(Config, argv)
    if not cfg.tiny:
        os.chdir(ROOT)
    if cfg.dtype == "auto" and not torch.cuda.is_available():  # decided once, so that every stage runs in the same
        cfg.dtype, why = auto_cpu_dtype()
        print(f"dtype 'auto': {cfg.dtype} ({why}); every stage runs with --dtype={cfg.dtype}")
    timings = run_stages(cfg)
    table, total = write_report(cfg, timings, argv)
    print(f"\n{table}\n\nall stages: {format_duration(total)}; report: {os.path.join(cfg.out, 'report.md')}")


if __name__ == "__main__":
    main()
