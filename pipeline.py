"""
The whole recipe at the small scale in one command: prepare -> pretrain -> SFT -> comparisons of the SFT model's
samples -> reward model -> PPO, and DPO (from the same SFT model, with no reward model), then a report with every stage's numbers and plots and SFT, PPO
and DPO side by side on the same held-out prompts. Each stage is exactly the command you could type yourself; it is
printed as it starts.

    python pipeline.py                 # 17-19 minutes on a 2-core CPU; finished stages are skipped
    python pipeline.py --redo=sft      # run SFT again, and every stage after it
    python pipeline.py --redo=all      # everything from scratch
The report: out/report.md (and the table is printed at the end).
"""
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

from common import UserError, format_duration, load_config, read_jsonl_records, write_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
# DPO needs only the SFT model; it runs last so that --redo=dpo runs it alone
STAGE_NAMES = ("prepare", "pretrain", "sft", "pairs", "rm", "ppo", "dpo")


@dataclass
class Config:
    redo: Literal["none", "all", "prepare", "pretrain", "sft", "pairs", "rm", "ppo", "dpo"] = "none"  # it and all after
    out: str = "out"  # where the stages' out_dirs and report.md go
    tiny: bool = False  # seconds, not minutes: tiny models and data, to check that the plumbing works


def stages(cfg):
    """(name, command, the file a finished run leaves last, out_dir). Plain commands unless --out or --tiny."""
    py = sys.executable
    data = "data/pycode" if not cfg.tiny else os.path.join(cfg.out, "data")
    out = lambda name: os.path.join(cfg.out, name)
    custom = cfg.out != "out" or cfg.tiny
    extra = {name: ([f"--out_dir={out(name)}"] if custom else [])
             for name in ("lm_small", "sft_small", "pairs_small", "rm_small", "ppo_small", "dpo_small")}
    prepare = [py, "data/pycode/prepare.py"]
    if cfg.tiny:
        prepare += [f"--out_dir={data}", "--max_files=120", "--val_every=3"]
        extra["lm_small"] += [f"--dataset={os.path.abspath(data)}", "--max_iters=30", "--eval_interval=15",
                              "--n_layer=2", "--n_embd=64", "--n_head=2", "--eval_iters=2", "--log_interval=10"]
        files = [f"--train_file={data}/sft_train.jsonl", f"--val_file={data}/sft_val.jsonl"]
        extra["sft_small"] += files + [f"--eval_prompts={data}/prompts_eval.jsonl", "--max_iters=10",
                                       "--eval_interval=10", "--eval_max_prompts=16", "--log_interval=5"]
        extra["pairs_small"] += files + ["--max_new_tokens=32", "--samples_per_prompt=2"]
        extra["rm_small"] += ["--max_iters=10", "--eval_interval=10", "--log_interval=5"]
        extra["ppo_small"] += [f"--prompts_file={data}/prompts_train.jsonl", f"--eval_prompts={data}/prompts_eval.jsonl",
                               "--max_iters=3", "--eval_interval=3", "--eval_max_prompts=16", "--batch_size=8",
                               "--minibatch_size=4", "--max_new_tokens=32"]
        extra["dpo_small"] += [f"--train_file={data}/pref_train.jsonl", f"--val_file={data}/pref_val.jsonl",
                               f"--eval_prompts={data}/prompts_eval.jsonl", "--max_iters=4", "--eval_interval=4",
                               "--eval_max_prompts=16", "--batch_size=8", "--max_new_tokens=32", "--log_interval=2"]
    if custom:
        extra["sft_small"] += [f"--init_from={out('lm_small')}"]
        extra["pairs_small"] += [f"--init_from={out('sft_small')}"]
        extra["rm_small"] += [f"--init_from={out('sft_small')}"] + [
            f"--{split}_file={data}/pref_{split}.jsonl,{out('pairs_small')}/pref_{split}.jsonl" for split in ("train", "val")]
        extra["ppo_small"] += [f"--init_from={out('sft_small')}", f"--reward_model={out('rm_small')}"]
        extra["dpo_small"] += [f"--init_from={out('sft_small')}"]
    return [
        ("prepare", prepare, os.path.join(data, "meta.json"), data),
        ("pretrain", [py, "train_lm.py", "config/lm_small.py"] + extra["lm_small"], "loss.png", out("lm_small")),
        ("sft", [py, "train_sft.py", "config/sft_small.py"] + extra["sft_small"], "sft.png", out("sft_small")),
        ("pairs", [py, "collect_pairs.py", "config/pairs_small.py"] + extra["pairs_small"], "meta.json",
         out("pairs_small")),
        ("rm", [py, "train_rm.py", "config/rm_small.py"] + extra["rm_small"], "rm.png", out("rm_small")),
        ("ppo", [py, "train_ppo.py", "config/ppo_small.py"] + extra["ppo_small"], "report.md", out("ppo_small")),
        ("dpo", [py, "train_dpo.py", "config/dpo_small.py"] + extra["dpo_small"], "report.md", out("dpo_small")),
    ]


def run_stages(cfg):
    """Run each stage that has not finished (or that --redo asks for); return {stage: seconds or None}."""
    timings_path = os.path.join(cfg.out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    redo_from = STAGE_NAMES.index(cfg.redo) if cfg.redo in STAGE_NAMES else (0 if cfg.redo == "all" else None)
    for i, (name, cmd, done_file, out_dir) in enumerate(stages(cfg)):
        done_path = done_file if name == "prepare" else os.path.join(out_dir, done_file)
        if os.path.exists(os.path.join(ROOT, done_path)) and (redo_from is None or i < redo_from):
            print(f"[{name}] done already ({done_path}); skipping (--redo={name} runs it again)")
            continue
        shown = " ".join(shlex.quote(c) for c in ["python"] + cmd[1:])
        print(f"\n[{name}] $ {shown}", flush=True)
        t0 = time.time()
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode != 0:
            raise UserError(f"stage '{name}' failed (exit status {result.returncode}); see its output above. "
                            f"Fix it and run `python pipeline.py` again: finished stages are skipped")
        timings[name] = time.time() - t0
        os.makedirs(os.path.join(ROOT, cfg.out), exist_ok=True)
        write_atomic(os.path.join(ROOT, timings_path), lambda f: f.write(json.dumps(timings, indent=1).encode()))
        print(f"[{name}] finished in {format_duration(timings[name])}")
    return timings


# --------------------------------------------------------------------------------------------------------------
# the report

def last_record(path, key):
    rows = [r for r in read_jsonl_records(path) if key in r] if os.path.exists(path) else []
    return rows[-1] if rows else {}


def first_record(path, key):
    rows = [r for r in read_jsonl_records(path) if key in r] if os.path.exists(path) else []
    return rows[0] if rows else {}


def before_after(out_dir):
    """A stage's before/after measures (train_ppo.py and train_dpo.py write them), or empty ones."""
    path = os.path.join(out_dir, "before_after.json")
    return json.load(open(path)) if os.path.exists(path) else {"before": {}, "after": {}}


def machine():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def write_report(cfg, timings):
    by_name = {name: out_dir for name, _, _, out_dir in stages(cfg)}
    fmt = lambda v, spec=".3f": format(v, spec) if isinstance(v, (int, float)) else "–"
    wall = lambda name: format_duration(timings[name]) if name in timings else "–"
    lm = last_record(os.path.join(by_name["pretrain"], "metrics.jsonl"), "val_loss")
    sft_path = os.path.join(by_name["sft"], "metrics.jsonl")
    sft0, sft = first_record(sft_path, "parses"), last_record(sft_path, "parses")
    rm = last_record(os.path.join(by_name["rm"], "metrics.jsonl"), "val_accuracy")
    pairs_meta = os.path.join(by_name["pairs"], "meta.json")
    pairs = json.load(open(pairs_meta)).get("train", {}) if os.path.exists(pairs_meta) else {}
    ppo, dpo = (before_after(by_name[name]) for name in ("ppo", "dpo"))
    b, a = ppo["before"], ppo["after"]

    lines = ["| stage | measure | value | wall time |", "|---|---|---|---|",
             f"| prepare | data | {by_name['prepare']} | {wall('prepare')} |",
             f"| pretrain | val loss (nats/token) | {fmt(lm.get('val_loss'))} | {wall('pretrain')} |",
             f"| SFT | val response loss | {fmt(sft0.get('val_loss'))} → {fmt(sft.get('val_loss'))} | {wall('sft')} |",
             f"| SFT | completions that parse | {fmt(sft0.get('parses'))} → {fmt(sft.get('parses'))} | |",
             f"| pairs | SFT samples the parser accepts | {fmt(pairs.get('good_share'))} | {wall('pairs')} |",
             f"| RM | held-out accuracy, all pairs | {fmt(rm.get('val_accuracy'))} | {wall('rm')} |"]
    for path, acc in sorted(rm.get("val_accuracy_by_file", {}).items()):
        lines.append(f"| RM | held-out accuracy: {path} | {fmt(acc)} | |")
    for kind, acc in sorted(rm.get("val_accuracy_by_kind", {}).items()):
        lines.append(f"| RM | accuracy: {kind} | {fmt(acc)} | |")
    rows = [("RM score mean", "rm_score"), ("gold: parses", "parses"), ("degenerate", "degenerate"),
            ("KL to SFT (nats/response)", "kl")]
    for i, (label, key) in enumerate(rows):
        lines.append(f"| PPO | {label}: SFT → PPO | {fmt(b.get(key))} → {fmt(a.get(key))} | "
                     f"{wall('ppo') if i == 0 else ''} |")
    d = dpo["after"]
    lines += [f"| DPO | held-out implicit accuracy | {fmt(d.get('val_accuracy'))} | {wall('dpo')} |",
              f"| DPO | drift on held-out chosen (nats) | {fmt(d.get('val_drift'))} | |"]
    for kind, acc in sorted(d.get("val_accuracy_by_kind", {}).items()):
        lines.append(f"| DPO | implicit accuracy: {kind} | {fmt(acc)} | |")
    # the same greedy completions of the same held-out prompts, measured the same way (train_ppo.evaluate)
    sft_gold = b or dpo["before"]
    side = ["| measure | SFT | PPO | DPO |", "|---|---|---|---|"]
    for label, key in (("gold: parses", "parses"), ("degenerate", "degenerate"),
                       ("parses and not degenerate", "parses_not_degenerate"), ("KL to SFT (nats/response)", "kl"),
                       ("mean response tokens", "mean_length")):
        side.append(f"| {label} | {fmt(sft_gold.get(key))} | {fmt(a.get(key))} | {fmt(d.get(key))} |")
    total = sum(timings.get(n, 0) for n in STAGE_NAMES)
    table = "\n".join(lines)
    plots = [("pretraining", "pretrain", "loss.png"), ("SFT", "sft", "sft.png"), ("reward model", "rm", "rm.png"),
             ("PPO", "ppo", "ppo.png"), ("DPO", "dpo", "dpo.png")]
    sections = [f"# The RLHF recipe, small scale\n\nRun {time.strftime('%Y-%m-%d %H:%M')} on {machine()}. "
                f"Wall time of the stages: {format_duration(total)}.\n\n## Results\n\n{table}\n\n"
                f"## SFT, PPO and DPO on the held-out prompts\n\nGreedy completions of the same held-out prompts; "
                f"the KL to the SFT model is measured on sampled ones.\n\n" + "\n".join(side) + "\n\n## Curves\n"]
    for title, stage, png in plots:
        rel = os.path.relpath(os.path.join(by_name[stage], png), cfg.out)
        sections.append(f"### {title}\n\n![{title}]({rel})\n")
    for stage, title in (("ppo", "PPO"), ("dpo", "DPO")):
        stage_report = os.path.join(by_name[stage], "report.md")
        if os.path.exists(stage_report):
            text = open(stage_report).read()
            samples = text[text.find("## Samples"):] if "## Samples" in text else ""
            sections.append(f"## Before and after {title}: sample completions" + samples[len("## Samples"):])
    report = "\n".join(sections)
    write_atomic(os.path.join(cfg.out, "report.md"), lambda f: f.write(report.encode("utf-8")))
    return table + "\n\n" + "\n".join(side), total


def main(argv=None):
    cfg = load_config(Config, argv)
    if not cfg.tiny:
        os.chdir(ROOT)
    timings = run_stages(cfg)
    table, total = write_report(cfg, timings)
    print(f"\n{table}\n\nall stages: {format_duration(total)}; report: {os.path.join(cfg.out, 'report.md')}")


if __name__ == "__main__":
    main()
