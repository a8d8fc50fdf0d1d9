"""bench.py at a tiny size: every figure comes with the machine it was measured on, and --what=grpo puts GRPO's
iteration beside PPO's with as many responses. Timings themselves are never asserted: speed is measured, not tested."""
import bench
from common import machine


def test_every_figure_is_printed_with_the_machine_and_grpo_beside_ppo(capsys):
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--vocab_size=257", "--device=cpu",
            "--dtype=float32", "--sample_batch=4", "--prompt_len=4", "--new_tokens=4", "--sample_repeats=1",
            "--ppo_iters=1", "--grpo_group=2"]
    bench.main(tiny + ["--what=grpo"])
    out = capsys.readouterr().out
    assert f"machine: {machine()}" in out.splitlines()[0]
    assert "cores" in machine() and "torch" in machine()  # the CPU's name and features, cores, torch
    assert "PPO (1 layers x 32, vocab 257, batch 4" in out and "GRPO (2 prompts x 2 samples" in out
    assert "GRPO / PPO time per iteration, 4 responses each: " in out
