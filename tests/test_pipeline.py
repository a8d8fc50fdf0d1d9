"""pipeline.py: the whole recipe at a tiny size runs every stage, which each leave a checkpoint, metrics and a
plot, and the report has every section."""
import os

import pipeline
from common import load_checkpoint


def test_tiny_pipeline_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = str(tmp_path / "out")
    pipeline.main(["--tiny=True", f"--out={out}"])
    for stage, plot in (("lm_small", "loss.png"), ("sft_small", "sft.png"), ("rm_small", "rm.png"),
                        ("ppo_small", "ppo.png")):
        for name in ("ckpt.pt", "metrics.jsonl", plot):
            assert os.path.exists(os.path.join(out, stage, name)), (stage, name)
        assert load_checkpoint(os.path.join(out, stage))["tokenizer"] == "byte"
    report = open(os.path.join(out, "report.md")).read()
    for section in ("## Results", "pretrain | val loss", "SFT | completions that parse", "RM | held-out accuracy",
                    "RM | accuracy: truncated", "PPO | gold: parses", "KL to SFT", "## Curves", "![PPO](ppo_small/ppo.png)",
                    "## Before and after PPO", "wall time"):
        assert section in report, section
    printed = capsys.readouterr().out
    assert "[pretrain] $ python train_lm.py config/lm_small.py" in printed
    # a second run skips every finished stage
    pipeline.main(["--tiny=True", f"--out={out}"])
    assert capsys.readouterr().out.count("done already") == 5
