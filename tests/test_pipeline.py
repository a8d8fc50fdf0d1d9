"""pipeline.py: the whole recipe at a tiny size runs every stage, which each leave a checkpoint, metrics and a
plot, and the report has every section, with SFT, PPO and DPO side by side."""
import os

import pipeline
from common import load_checkpoint


def test_tiny_pipeline_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = str(tmp_path / "out")
    pipeline.main(["--tiny=True", f"--out={out}"])
    for stage, plot in (("lm_small", "loss.png"), ("sft_small", "sft.png"), ("rm_small", "rm.png"),
                        ("ppo_small", "ppo.png"), ("dpo_small", "dpo.png")):
        for name in ("ckpt.pt", "metrics.jsonl", plot):
            assert os.path.exists(os.path.join(out, stage, name)), (stage, name)
        assert load_checkpoint(os.path.join(out, stage))["tokenizer"] == "byte"
    for name in ("pref_train.jsonl", "pref_val.jsonl", "meta.json"):  # the SFT model's samples, ranked
        assert os.path.exists(os.path.join(out, "pairs_small", name)), name
    report = open(os.path.join(out, "report.md")).read()
    for section in ("## Results", "pretrain | val loss", "SFT | completions that parse", "RM | held-out accuracy", "pairs | SFT samples the parser accepts",
                    "RM | accuracy: sampled", "RM | held-out accuracy: " + os.path.join(out, "pairs_small"),
                    "RM | accuracy: truncated", "PPO | gold: parses", "KL to SFT", "## Curves", "![PPO](ppo_small/ppo.png)",
                    "## Before and after PPO", "wall time", "DPO | held-out implicit accuracy",
                    "DPO | implicit accuracy: truncated", "## SFT, PPO and DPO on the held-out prompts",
                    "| measure | SFT | PPO | DPO |", "| gold: parses |", "![DPO](dpo_small/dpo.png)",
                    "## Before and after DPO"):
        assert section in report, section
    printed = capsys.readouterr().out
    assert "[pretrain] $ python train_lm.py config/lm_small.py" in printed
    assert "[dpo] $ python train_dpo.py config/dpo_small.py" in printed
    assert "[pairs] $ python collect_pairs.py config/pairs_small.py" in printed
    # the side-by-side table has a number in every column: the DPO stage wrote its before/after measures
    row = next(line for line in report.splitlines() if line.startswith("| gold: parses |"))
    assert "–" not in row and load_checkpoint(os.path.join(out, "dpo_small"))["stage"] == "dpo"
    # a second run skips every finished stage
    pipeline.main(["--tiny=True", f"--out={out}"])
    assert capsys.readouterr().out.count("done already") == 7
