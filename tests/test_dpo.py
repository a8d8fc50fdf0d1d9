"""train_dpo.py: the DPO loss on hand values, log 2 when the policy is the reference, the sequence log-prob over
response tokens only, the reference log-probs computed once per pair, the reader's errors, and a tiny run end to
end (the loss falls; checkpoint, metrics, plot and report; exact resume)."""
import json
import math

import pytest
import torch
from torch.nn import functional as F

import train_dpo
from common import UserError, load_checkpoint, read_jsonl_records, save_checkpoint, setup_runtime
from model import GPT, GPTConfig
from train_dpo import dpo_loss, implicit_reward, pair_stats, sequence_logprob
from train_sft import sft_batch
from conftest import write_jsonl
from test_rm import easy_pairs  # the same synthetic pairs train_rm.py's tests learn


def tiny_model():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=257)).eval()


# --------------------------------------------------------------------------------------------------------------
# the loss

def test_dpo_loss_equals_the_formula_by_hand():
    # pair 1: log-ratios chosen -3 - (-4) = 1, rejected -5 - (-4) = -1: beta * (1 - (-1)) = 0.5 * 2 = 1
    # pair 2: chosen -2 - (-1) = -1, rejected -1 - (-3) = 2: beta * (-1 - 2) = -1.5 (ranked the wrong way)
    loss = dpo_loss(torch.tensor([-3.0, -2.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -1.0]),
                    torch.tensor([-4.0, -3.0]), beta=0.5)
    by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2  # -log sigma(z) = log(1 + e^-z)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert implicit_reward(torch.tensor(-3.0), torch.tensor(-4.0), 0.5).item() == pytest.approx(0.5)


def test_dpo_positive_charges_only_a_chosen_response_that_lost_likelihood():
    # chosen -5 against the reference's -4 (lost 1 nat), rejected -6 against -4: 0.5 * (-1 - (-2)) - 3 * 0.5 * 1 = -1
    loss = dpo_loss(torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.5,
                    dpop_lambda=3.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1.0)), abs=1e-6)
    # a chosen response at least as likely as under the reference costs nothing extra: plain DPO
    args = [torch.tensor(v) for v in ([-3.0, -4.0], [-6.0, -5.0], [-4.0, -4.0], [-4.0, -4.0])]
    assert dpo_loss(*args, beta=0.5, dpop_lambda=3.0).item() == dpo_loss(*args, beta=0.5).item()


def test_policy_equal_to_the_reference_gives_log_2_and_a_defined_accuracy():
    logp = torch.tensor([[-12.5, -30.25], [-7.0, -7.0], [-40.0, -3.5]])
    for beta in (0.1, 1.0, 5.0):
        assert dpo_loss(logp[:, 0], logp[:, 1], logp[:, 0], logp[:, 1], beta).item() == pytest.approx(math.log(2))
    stats = pair_stats(logp, logp.clone(), 0.1, ["a", "b", "a"], dpop_lambda=50.0)
    assert stats["loss"] == pytest.approx(math.log(2)) and stats["dpo_loss"] == pytest.approx(math.log(2))
    # every implicit reward is 0: ties, counted as wrong (not as 0.5), so the accuracy starts at 0, and never NaN
    assert stats["accuracy"] == 0.0 and stats["by_kind"]["a"]["accuracy"] == 0.0
    assert stats["margin"] == 0.0 and stats["drift"] == 0.0 and stats["drift_rejected"] == 0.0
    assert not any(math.isnan(v) for k, v in stats.items() if k != "by_kind")


def test_pair_stats_count_accuracy_margin_and_drift():
    logp = torch.tensor([[-1.0, -5.0], [-4.0, -2.0]])
    ref = torch.tensor([[-2.0, -3.0], [-3.0, -3.0]])
    stats = pair_stats(logp, ref, 0.5, ["a", "b"])
    # rewards: pair 1 (0.5, -1.0): right; pair 2 (-0.5, 0.5): wrong
    assert stats["accuracy"] == 0.5 and stats["by_kind"]["a"]["accuracy"] == 1.0
    assert stats["margin"] == pytest.approx((1.5 - 1.0) / 2)
    assert stats["drift"] == pytest.approx((1.0 - 1.0) / 2) and stats["drift_rejected"] == pytest.approx((-2 + 1) / 2)
    assert stats["loss"] == stats["dpo_loss"] == pytest.approx(dpo_loss(*logp.T, *ref.T, 0.5).item())
    # with DPO-Positive the loss trained on charges pair 2's chosen response (1 nat below the reference); dpo_loss not
    penalised = pair_stats(logp, ref, 0.5, ["a", "b"], dpop_lambda=2.0)
    assert penalised["dpo_loss"] == stats["dpo_loss"] and penalised["loss"] > stats["loss"]


# --------------------------------------------------------------------------------------------------------------
# the sequence log-prob: response tokens only

EXAMPLES = [([5, 6, 7], [8, 9, 256]), ([1, 2, 3, 4, 5, 6], [7, 256]), ([9], [10, 11, 12, 13, 256])]


def test_sequence_logprob_is_the_sum_over_response_tokens_by_hand():
    model = tiny_model()
    x, y = sft_batch(EXAMPLES, pad_id=256)
    logp = sequence_logprob(model, x, y)
    logits, _ = model(x)
    lp = F.log_softmax(logits, dim=-1)
    for i, (p, r) in enumerate(EXAMPLES):
        seq = p + r
        by_hand = sum(lp[i, t, seq[t + 1]] for t in range(len(p) - 1, len(seq) - 1))  # response tokens only
        assert logp[i].item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_prompt_and_padding_enter_only_as_context():
    model = tiny_model()
    captured = {}
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: captured.update(logits=out) or out.retain_grad())
    x, y = sft_batch(EXAMPLES, pad_id=256)
    sequence_logprob(model, x, y).sum().backward()
    hook.remove()
    # no gradient reaches the output at prompt or padding positions: their probabilities are not in the sum
    assert torch.equal(captured["logits"].grad.abs().sum(-1) != 0, y != -1)
    with torch.no_grad():
        batched = sequence_logprob(model, x, y)
        alone = torch.cat([sequence_logprob(model, *sft_batch([ex], 0)) for ex in EXAMPLES])  # no padding at all
        other_pad = sequence_logprob(model, *sft_batch(EXAMPLES, pad_id=123))
        # another prompt token changes the value only through the context the response is read in
        changed = sequence_logprob(model, *sft_batch([([5, 6, 42], [8, 9, 256])], 0))
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, other_pad, atol=1e-6)
    assert torch.equal(sft_batch([([5, 6, 42], [8, 9, 256])], 0)[1], sft_batch([EXAMPLES[0]], 0)[1])  # same targets
    assert changed.item() != pytest.approx(alone[0].item(), abs=1e-6)


def test_reference_logprobs_are_computed_once_for_the_pairs_read_and_match_a_fresh_pass():
    model = tiny_model()
    data = {"chosen": [p + r for p, r in EXAMPLES], "rejected": [p + r[::-1] for p, r in EXAMPLES],
            "prompt_len": [len(p) for p, _ in EXAMPLES], "kinds": ["a", "b", "c"]}
    rt = setup_runtime(train_dpo.Config(device="cpu"))
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].size(0)))
    known = train_dpo.logprobs_of_pairs(model, data, [[2, 0], [0, 2]], 256, rt)
    assert calls == [4]  # pairs 2 and 0 once, chosen and rejected in one pass; the second batch needs nothing new
    assert known[1].isnan().all() and not known[[0, 2]].isnan().any()  # pair 1 is never read
    train_dpo.logprobs_of_pairs(model, data, [[1, 2]], 256, rt, known=known)
    assert calls == [4, 2]
    with torch.no_grad():
        fresh = train_dpo.pair_logprobs(model, data, [0, 1, 2], 256, rt)
    assert torch.allclose(known, fresh, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# end to end, from a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An 'SFT' checkpoint (a tiny random GPT: DPO needs no particular start) and pair and prompt files."""
    root = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=257))
    save_checkpoint(str(root / "sft" / "ckpt.pt"), {"stage": "sft", "model_args": vars(model.config),
                                                    "model": model.state_dict(), "tokenizer": "byte",
                                                    "template": "none"})
    prompts = [{"prompt": row["prompt"]} for row in easy_pairs(6, 2)]
    return {"sft": str(root / "sft"), "train": write_jsonl(root / "train.jsonl", easy_pairs(64, 0)),
            "val": write_jsonl(root / "val.jsonl", easy_pairs(24, 1)),
            "eval": write_jsonl(root / "eval.jsonl", prompts)}


def run_dpo(tiny, out_dir, *extra):
    return train_dpo.main([f"--init_from={tiny['sft']}", f"--out_dir={out_dir}", f"--train_file={tiny['train']}",
                           f"--val_file={tiny['val']}", f"--eval_prompts={tiny['eval']}", "--device=cpu",
                           "--batch_size=8", "--log_interval=1", "--max_new_tokens=8", "--warmup_iters=2", *extra])


def test_training_lowers_the_loss_and_writes_checkpoint_metrics_plot_and_report(tiny, tmp_path, capsys):
    out = tmp_path / "dpo"
    result = run_dpo(tiny, out, "--max_iters=24", "--eval_interval=12", "--learning_rate=3e-3", "--beta=0.5")
    printed = capsys.readouterr().out
    for name in ("ckpt.pt", "metrics.jsonl", "dpo.png", "report.md", "before_after.json"):
        assert (out / name).exists(), name
    before, after = result["before"], result["after"]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert before["val_accuracy"] == 0.0 and before["kl"] == pytest.approx(0.0, abs=1e-5)
    assert after["val_loss"] < 0.5 and after["val_accuracy"] >= 0.8
    records = read_jsonl_records(out / "metrics.jsonl")
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 12, 24]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(train) == 24 and sum(train[-4:]) / 4 < sum(train[:4]) / 4
    assert set(records[0]["val_accuracy_by_kind"]) == {"up", "down"}
    assert all(0 <= r["solved"] <= 1 and 0 <= r["template"] <= 1 for r in records if "solved" in r)
    ckpt = load_checkpoint(str(out))
    assert ckpt["stage"] == "dpo" and ckpt["iter_num"] == 24 and ckpt["tokenizer"] == "byte"
    assert ckpt["config"]["init_from"] == tiny["sft"]
    assert int((~ckpt["ref_train"][:, 0].isnan()).sum()) == 64  # 3 epochs of 64 pairs: each computed once
    report = (out / "report.md").read_text()
    assert "SFT (before)" in report and "DPO (after)" in report and "val implicit accuracy" in report
    assert "solved" in printed and "reference log-probs of 64 training and 24 held-out pairs" in printed
    assert json.loads((out / "before_after.json").read_text())["after"]["val_loss"] == pytest.approx(after["val_loss"])


def test_resume_from_any_checkpoint_any_number_of_times_gives_exactly_the_run_without_interruption(tiny, tmp_path):
    # dropout: the RNG state matters
    common = ["--eval_interval=3", "--lr_decay_iters=8", "--dropout=0.1", "--learning_rate=1e-3", "--eval_samples=2"]
    run_dpo(tiny, tmp_path / "straight", "--max_iters=8", *common)
    first = run_dpo(tiny, tmp_path / "split", "--max_iters=5", *common)
    assert run_dpo(tiny, tmp_path / "split", "--max_iters=5", "--init_from=resume", *common) == first  # at its end
    run_dpo(tiny, tmp_path / "split", "--max_iters=6", "--init_from=resume", *common)
    result = run_dpo(tiny, tmp_path / "split", "--max_iters=8", "--init_from=resume", *common)  # resumed twice
    losses = [{r["iter"]: r["train_loss"] for r in read_jsonl_records(d / "metrics.jsonl") if "train_loss" in r}
              for d in (tmp_path / "straight", tmp_path / "split")]
    assert sorted(losses[1]) == list(range(1, 9)) and losses[0] == losses[1]
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["ref_train"].nan_to_num(7.0), b["ref_train"].nan_to_num(7.0))
    assert result["after"] == a["eval"] and result["before"] == a["before"]["metrics"]


def test_a_malformed_pair_is_rejected_with_file_and_line(tiny, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", easy_pairs(2, 0) + ['{"prompt": "def f():\\n", "chosen": "    x\\n"}'])
    with pytest.raises(UserError, match=r"bad\.jsonl:3: missing text field 'rejected'"):
        run_dpo(tiny, tmp_path / "o", f"--train_file={bad}")


def test_clear_errors_for_a_missing_or_wrong_start(tiny, tmp_path):
    with pytest.raises(UserError, match="DPO fine-tunes an SFT model"):
        run_dpo(tiny, tmp_path / "o", "--init_from=scratch")
    with pytest.raises(UserError, match=r"no checkpoint at .*nowhere.*python train_sft.py config/sft_small.py"):
        run_dpo(tiny, tmp_path / "o", f"--init_from={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="not a DPO run's"):
        run_dpo(tiny, tiny["sft"], "--init_from=resume")
    # the saved reference log-probs belong to the pairs the run started with: another file cannot resume it
    run_dpo(tiny, tmp_path / "run", "--max_iters=1", "--eval_interval=1", "--eval_max_prompts=1")
    other = write_jsonl(tmp_path / "other.jsonl", easy_pairs(64, 5))
    with pytest.raises(UserError, match=r"other\.jsonl no longer holds the pairs"):
        run_dpo(tiny, tmp_path / "run", "--max_iters=2", "--init_from=resume", f"--train_file={other}")
