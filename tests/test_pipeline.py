"""pipeline.py: the whole recipe at a tiny size runs every stage, the RL stages (PPO, GRPO, DPO) once per seed (the
first seed to twice the iterations), each leaving a checkpoint, metrics and a plot; the report has every section,
with SFT and the RL stages side by side as mean (min–max) over seeds, and one plot per RL stage with every seed's
curves."""
import math
import os

import pipeline
from common import load_checkpoint, read_jsonl_records


def test_tiny_pipeline_runs_every_stage_over_seeds_and_writes_the_report(tmp_path, capsys):
    out = str(tmp_path / "out")
    pipeline.main(["--tiny=True", f"--out={out}", "--seeds=2", "--compare=True"])
    tokenizer = load_checkpoint(os.path.join(out, "lm_small"))["tokenizer"]
    assert tokenizer["kind"] == "bpe"  # learnt by prepare.py, carried by every checkpoint after it
    for stage, plot in (("lm_small", "loss.png"), ("sft_small", "sft.png"), ("rm_small", "rm.png")):
        for name in ("ckpt.pt", "metrics.jsonl", plot):
            assert os.path.exists(os.path.join(out, stage, name)), (stage, name)
        assert load_checkpoint(os.path.join(out, stage))["tokenizer"] == tokenizer
    for stage, plot in (("ppo_small", "ppo.png"), ("grpo_small", "grpo.png"), ("dpo_small", "dpo.png")):
        for seed in (1, 2):
            run = os.path.join(out, stage, f"seed{seed}")
            for name in ("ckpt.pt", "metrics.jsonl", plot, "report.md"):
                assert os.path.exists(os.path.join(run, name)), (run, name)
            assert load_checkpoint(run)["config"]["seed"] == seed
        # the first seed runs to twice the config's iterations, the others stop there
        evals = [sorted(pipeline.evaluations(os.path.join(out, stage, f"seed{s}"))) for s in (1, 2)]
        assert evals[0][-1] == 2 * evals[1][-1] and evals[1][-1] in evals[0]
        assert os.path.exists(os.path.join(out, f"{stage.split('_')[0]}_seeds.png"))
    for name in ("pref_train.jsonl", "pref_val.jsonl", "meta.json"):  # the SFT model's samples, ranked
        assert os.path.exists(os.path.join(out, "pairs_small", name)), name
    report = open(os.path.join(out, "report.md")).read()
    for section in ("## Results", "pretrain | val loss", "SFT | solved, functions with arguments",
                    "RM | held-out accuracy", "pairs | SFT samples that solve their prompt", "RM | accuracy: sampled",
                    "RM | accuracy: truncated", "## SFT and the RL stages on the held-out prompts",
                    "| method | seeds | solved, with arguments | solved, all | parses | template share |",
                    "| SFT | |", "| PPO | 2 |", "| GRPO | 2 |", "| DPO | 2 |", "| Dr. GRPO | 2 |", "| RLOO | 2 |",
                    "| GRPO on the reward model | 2 |", "| PPO on the judge | 2 |", "| best-of-8, the judge | 2 |",
                    "| best-of-8, the reward model | 2 |",
                    "![PPO](ppo_seeds.png)", "![GRPO](grpo_seeds.png)", "![DPO](dpo_seeds.png)",
                    "## Before and after PPO (seed 1)", "## Before and after GRPO (seed 1)",
                    "## Before and after DPO (seed 1)", "at commit", "wall time", "- PPO: solved on functions",
                    "- best-of-8, the judge: solved on functions"):
        assert section in report, section
    # each method's cell is 'mean (min–max)' over the two seeds, SFT's one number; best-of-8's KL is log 8 - 7/8
    for method in ("PPO", "GRPO", "DPO", "RLOO"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} | 2 |"))
        assert row.split(" | ")[2].count("–") == 1, row
    # each seed's row gives its curve's peak and its last evaluation: the long run's is at twice the iterations
    ppo_seed1 = next(line for line in report.split("### PPO, every seed")[1].splitlines() if line.startswith("| 1 |"))
    last_ppo = sorted(pipeline.evaluations(os.path.join(out, "ppo_small", "seed1")))[-1]
    assert ppo_seed1.endswith(f" ({last_ppo}) |") and ppo_seed1.count("(") == 2, ppo_seed1
    bon = next(line for line in report.splitlines() if line.startswith("| best-of-8, the judge | 2 |"))
    assert f"{math.log(8) - 7 / 8:.3f}" in bon
    printed = capsys.readouterr().out
    assert "[pretrain] $ python train_lm.py config/lm_small.py" in printed
    # the RL runs two at a time, one thread each, each writing its output to its out_dir
    assert "[dpo seed 2] $ python train_dpo.py config/dpo_small.py" in printed and "--seed=2" in printed
    assert os.path.getsize(os.path.join(out, "dpo_small", "seed2", "log.txt")) > 0
    assert "[grpo seed 1] $ python train_grpo.py config/grpo_small.py" in printed
    assert "[pairs] $ python collect_pairs.py config/pairs_small.py" in printed
    # after SFT: the pairs beside GRPO (it needs only the SFT model), PPO only once the reward model has finished
    assert printed.index("[grpo seed 1] $") < printed.index("[pairs] finished") < printed.index("[rm] $")
    assert printed.index("[rm] finished") < printed.index("[ppo seed 1] $")
    # the SFT model is evaluated once per stage, by its first seed; the others' curves start from that evaluation
    for stage in ("ppo_small", "grpo_small", "dpo_small"):
        assert 0 in pipeline.evaluations(os.path.join(out, stage, "seed1"))
        assert 0 not in pipeline.evaluations(os.path.join(out, stage, "seed2"))
    assert "--eval_at_start=False" in printed.split("[dpo seed 2] $")[1].splitlines()[0]
    # a second run skips every finished run: 5 stages and 2 seeds of each RL stage and of each variant
    pipeline.main(["--tiny=True", f"--out={out}", "--seeds=2", "--compare=True"])
    assert capsys.readouterr().out.count("done already") == 5 + 3 * 2 + 6 * 2
    assert read_jsonl_records(os.path.join(out, "ppo_small", "seed1", "metrics.jsonl"))
