"""train_rm.py: the reward read at the last real token, the pairwise and mse losses on hand values, the
preference readers, per-kind accuracy, and a tiny run end to end (checkpoint, metrics, plot, exact resume)."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

import train_rm
from common import (UserError, load_checkpoint, model_from_checkpoint, pad_right, read_jsonl_records,
                    read_preference_pairs)
from conftest import write_jsonl
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

def tiny_reward_model():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257, scalar_head=True)).eval()


# ---- the reward

def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    model = tiny_reward_model()
    short, long = [5, 6, 7, 256], [1, 2, 3, 4, 5, 6, 7, 8, 9, 256]
    with torch.no_grad():
        alone = train_rm.reward_at_last_token(model, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
        ids, mask = pad_right([short, long], pad_id=0)
        batched = train_rm.reward_at_last_token(model, ids, mask)
        # by hand: the scalar head at index 3, the short row's last real token (columns 4.. are padding)
        by_hand = model.scalar(model.hidden_states(torch.tensor([short])))[0, 3]
        # padded on the left instead: the mask is needed and the reward is still that of the last token
        left_ids = torch.tensor([[0] * 6 + short, long])
        left_mask = torch.tensor([[0] * 6 + [1] * 4, [1] * 10])
        left = train_rm.reward_at_last_token(model, left_ids, left_mask)
        # another padding value changes nothing
        ids2, mask2 = pad_right([short, long], pad_id=99)
        batched2 = train_rm.reward_at_last_token(model, ids2, mask2)
    assert batched.shape == (2,)
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert batched[0].item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert left[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert torch.allclose(batched2, batched, atol=1e-6)
    assert left[1].item() == pytest.approx(batched[1].item(), abs=1e-5)


def test_rm_scorer_scores_prompt_and_response_rows_as_the_reward_model_reads_them_alone():
    """The scorer the tasks' evaluation takes: each (prompt, response) row scored in a batch of rows of other
    lengths (prompts padded on the left, responses on the right) is its score alone."""
    model = tiny_reward_model()
    rt = SimpleNamespace(device="cpu", autocast=contextlib.nullcontext())
    rows = [([5, 6], [7, 256]), ([1, 2, 3, 4], [5, 6, 7, 8, 9, 256]), ([9], [256])]
    scores = train_rm.rm_scorer(model, SimpleNamespace(eot_token=256), rt)(rows)
    with torch.no_grad():
        alone = [train_rm.reward_at_last_token(model, torch.tensor([p + r]), torch.ones(1, len(p + r), dtype=torch.long))
                 for p, r in rows]
    assert scores.shape == (3,) and not scores.requires_grad
    assert torch.allclose(scores, torch.cat(alone), atol=1e-5)


# ---- the losses

def test_pairwise_loss_is_minus_log_sigmoid_of_the_difference():
    loss = train_rm.pairwise_loss
    assert loss(torch.tensor([1.5]), torch.tensor([1.5])).item() == pytest.approx(math.log(2))
    assert loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert loss(torch.tensor([1.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(1 + math.exp(2)))
    # the mean over pairs
    both = loss(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])).item()
    assert both == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)
    # a margin m: -log sigma(r_w - r_l - m); a difference of exactly m costs log 2
    assert loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=2.0).item() == pytest.approx(math.log(2))
    assert loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # no overflow far out: -log sigma(-100) = 100 (to float precision), -log sigma(100) = e^-100
    assert loss(torch.tensor([0.0]), torch.tensor([100.0])).item() == pytest.approx(100.0)
    assert loss(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-30)


def test_mse_loss_on_hand_values():
    rewards, scores = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 4.0, -1.0])
    assert train_rm.mse_loss(rewards, scores).item() == pytest.approx((1 + 4 + 0) / 3)


def test_accuracy_and_margin_per_kind_on_hand_made_rewards():
    r_w = torch.tensor([2.0, 1.0, 0.0, 5.0, 1.0])
    r_l = torch.tensor([1.0, 3.0, 0.0, 1.0, 0.5])
    kinds = ["a", "a", "b", "b", "c"]
    m = train_rm.pair_metrics_by_kind(r_w, r_l, kinds)
    assert m["a"] == {"n": 2, "accuracy": 0.5, "margin": pytest.approx((1 - 2) / 2)}
    assert m["b"] == {"n": 2, "accuracy": 0.5, "margin": pytest.approx(2.0)}  # a tie counts as wrong
    assert m["c"] == {"n": 1, "accuracy": 1.0, "margin": pytest.approx(0.5)}
    assert m["all"]["n"] == 5 and m["all"]["accuracy"] == pytest.approx(3 / 5)
    assert m["all"]["margin"] == pytest.approx((1 - 2 + 0 + 4 + 0.5) / 5)


# ---- the readers (in common.py)

def test_reader_accepts_ours_and_hh_rlhf(tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [
        {"prompt": "def f():\n", "chosen": "    return 1\n", "rejected": "    return (\n", "kind": "unbalanced"},
        {"prompt": "def g():\n", "chosen": "    pass\n", "rejected": "  pass\n"}])
    pairs = read_preference_pairs(ours)
    assert pairs[0] == {"prompt": "def f():\n", "chosen": "    return 1\n", "rejected": "    return (\n",
                        "kind": "unbalanced"}
    assert pairs[1]["kind"] == "unlabelled"
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name?\n\nAssistant: Claude.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name?\n\nAssistant: Go away."}])
    (pair,) = read_preference_pairs(hh)
    assert pair["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name?\n\nAssistant:"
    assert (pair["chosen"], pair["rejected"], pair["kind"]) == (" Claude.", " Go away.", "unlabelled")


def test_pairs_without_a_kind_are_counted_once_in_the_overall_row(tmp_path):
    rows = [{"chosen": f"\n\nHuman: {i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: {i}?\n\nAssistant: no"}
            for i in range(40)]  # HH-RLHF's format: no kind
    kinds = [p["kind"] for p in read_preference_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))]
    by_kind = train_rm.pair_metrics_by_kind(torch.ones(40), torch.zeros(40), kinds)
    assert by_kind["all"]["n"] == 40 and by_kind["unlabelled"]["n"] == 40


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "def f():\\n", "chosen": "x"', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "def f():\\n", "chosen": "    return 1\\n"}', r"bad\.jsonl:2: missing text field 'rejected'"),
    ('{"prompt": "def f():\\n", "chosen": "   ", "rejected": "x"}', r"bad\.jsonl:2: field 'chosen' is empty"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant:  "}',
     r"bad\.jsonl:2: empty response"),
    ('{"chosen": "no dialogue here", "rejected": "nor here"}', r"bad\.jsonl:2: a full-text pair needs"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"prompt": "def f():\\n", "chosen": "x", "rejected": "y", "kind": "all"}', r"bad\.jsonl:2: kind 'all' names"),
    (b'{"prompt": "def caf\xe9():\\n", "chosen": "x", "rejected": "y"}', r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
])
def test_reader_rejects_bad_lines_naming_file_and_line(tmp_path, line, message):
    good = {"prompt": "def f():\n", "chosen": "    return 1\n", "rejected": "    return (\n"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(UserError, match=message):
        read_preference_pairs(path)


# ---- batches

def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    lengths = tuple(range(10, 110))  # 100 examples: 25 batches of 4 per epoch
    epoch0 = [train_rm.batch_indices(7, n, 4, lengths) for n in range(25)]
    train_rm.epoch_batches.cache_clear()
    assert [train_rm.batch_indices(7, n, 4, lengths) for n in range(25)] == epoch0  # nothing but (seed, step)
    assert sorted(i for b in epoch0 for i in b) == list(range(100))  # each example once an epoch
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0]
    assert sum(spread) / len(spread) < 25  # similar lengths together (4 random ones would span about 60)
    epoch1 = [train_rm.batch_indices(7, n, 4, lengths) for n in range(25, 50)]
    assert {frozenset(b) for b in epoch1} != {frozenset(b) for b in epoch0}  # mixed afresh each epoch
    assert train_rm.batch_indices(8, 0, 4, lengths) != epoch0[0]
    assert train_rm.batch_indices(7, 0, 500, lengths) == train_rm.batch_indices(7, 0, 100, lengths)


# ---- end to end

def easy_pairs(n, seed):
    """A synthetic task a tiny model learns in a few steps, but only by reading the prompt: 'def up_...' asks for
    'return 1', 'def down_...' for 'return 0'. A reward that ignores the prompt is right on half the pairs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        name = "".join(chr(97 + c) for c in torch.randint(26, (3,), generator=g).tolist())
        kind = ["up", "down"][i % 2]
        good, bad = ("1", "0") if kind == "up" else ("0", "1")
        rows.append({"prompt": f"def {kind}_{name}():\n", "chosen": f"    return {good}\n",
                     "rejected": f"    return {bad}\n", "kind": kind})
    return rows


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    train = easy_pairs(96, 0) + [{"prompt": "def f():\n" + "#" * 80, "chosen": "    x\n", "rejected": "  x\n"}]
    return write_jsonl(d / "train.jsonl", train), write_jsonl(d / "val.jsonl", easy_pairs(40, 1))


def run_rm(tiny_lm, pref_files, out_dir, *extra):
    train, val = pref_files
    return train_rm.main([f"--init_from={tiny_lm}", f"--out_dir={out_dir}", f"--train_file={train}",
                          f"--val_file={val}", "--device=cpu", "--batch_size=8", "--log_interval=1",
                          "--warmup_iters=2", *extra])


def test_training_learns_an_easy_task_and_writes_checkpoint_metrics_and_plot(tiny_lm, pref_files, tmp_path, capsys):
    out = tmp_path / "rm"
    result = run_rm(tiny_lm, pref_files, out, "--max_iters=24", "--eval_interval=12", "--learning_rate=1e-3",
                    "--head_lr_mult=10")
    printed = capsys.readouterr().out
    assert "dropped 1 longer than the context (64 tokens)" in printed  # the long pair is dropped, not cut
    for name in ("ckpt.pt", "metrics.jsonl", "rm.png"):
        assert (out / name).exists()
    records = read_jsonl_records(out / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["iter"] for r in evals] == [0, 12, 24]
    assert set(evals[0]["val_accuracy_by_kind"]) == {"up", "down"}
    assert result["val_accuracy"] >= 0.8 and result["val_accuracy"] > evals[0]["val_accuracy"]
    assert result["val_loss"] < evals[0]["val_loss"]
    ckpt = load_checkpoint(str(out))
    assert ckpt["stage"] == "rm" and ckpt["iter_num"] == 24 and ckpt["tokenizer"] == "byte"
    assert ckpt["model_args"]["scalar_head"] and "scalar_head.weight" in ckpt["model"]
    assert ckpt["reward_mean"] == pytest.approx(result["reward_mean"]) and ckpt["reward_std"] > 0
    assert ckpt["by_kind"]["all"]["n"] == 40
    # the saved statistics are those of the saved model's rewards on the held-out responses
    model = model_from_checkpoint(ckpt, str(out)).eval()
    val = train_rm.encode_pairs(read_preference_pairs(pref_files[1]), get_tokenizer("byte"), "none", 64)[0]
    rewards = train_rm.score_rows(model, val["chosen"] + val["rejected"], 256, 16, "cpu", contextlib.nullcontext())
    assert rewards.mean().item() == pytest.approx(ckpt["reward_mean"], abs=1e-5)
    assert rewards.std().item() == pytest.approx(ckpt["reward_std"], abs=1e-5)
    assert "all" in printed.split("done:")[1] and "down" in printed.split("done:")[1]  # the summary table


def test_resume_gives_exactly_the_run_without_interruption(tiny_lm, pref_files, tmp_path):
    common = ["--eval_interval=3", "--lr_decay_iters=8", "--dropout=0.1", "--mismatched=True"]  # dropout: RNG matters
    run_rm(tiny_lm, pref_files, tmp_path / "straight", "--max_iters=8", *common)
    run_rm(tiny_lm, pref_files, tmp_path / "split", "--max_iters=5", *common)
    run_rm(tiny_lm, pref_files, tmp_path / "split", "--max_iters=8", "--init_from=resume", *common)
    losses = [{r["iter"]: r["train_loss"] for r in read_jsonl_records(d / "metrics.jsonl") if "train_loss" in r}
              for d in (tmp_path / "straight", tmp_path / "split")]
    assert sorted(losses[1]) == list(range(1, 9)) and losses[0] == losses[1]
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["reward_mean"] == b["reward_mean"] and a["val_accuracy"] == b["val_accuracy"]


def test_head_only_and_frozen_layers_leave_those_weights_unchanged(tiny_lm, pref_files, tmp_path):
    before = load_checkpoint(tiny_lm)["model"]
    run_rm(tiny_lm, pref_files, tmp_path / "probe", "--max_iters=2", "--eval_interval=2", "--train_backbone=False")
    after = load_checkpoint(str(tmp_path / "probe"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "scalar_head.weight" in after
    run_rm(tiny_lm, pref_files, tmp_path / "top", "--max_iters=2", "--eval_interval=2", "--frozen_layers=1")
    after = load_checkpoint(str(tmp_path / "top"))["model"]
    for k in before:
        frozen = k.startswith(("transformer.wte", "transformer.wpe", "lm_head", "transformer.h.0."))
        if frozen or before[k].dim() == 2:  # (a bias before the head adds the same to all rewards: no gradient)
            assert torch.equal(before[k], after[k]) == frozen, k


def test_mismatched_rows_pair_each_prompt_with_the_next_pairs_response():
    data = {"chosen": [[1, 2, 10], [3, 11, 12], [4, 5, 6, 13], [7, 13]], "prompt_len": [2, 1, 3, 1]}
    rows = train_rm.mismatched_rows(data, [0, 1, 2, 3], block_size=4)
    # pair 0's prompt [1, 2] + pair 1's response [11, 12]; pair 1's prompt [3] + [13]; pair 2's prompt [4, 5, 6]
    # + [13] is [4, 5, 6, 13], its own text, so left out; pair 3's prompt [7] + pair 0's response [10]
    assert rows == [(0, [1, 2, 11, 12]), (1, [3, 13]), (3, [7, 10])]
    assert train_rm.mismatched_rows(data, [0, 1, 2, 3], block_size=3) == [(1, [3, 13]), (3, [7, 10])]  # too long


def test_mse_on_scored_examples(tiny_lm, tmp_path):
    rows = [{"user_input": f"def f{i}():\n", "completion": "    return 1\n" if i % 2 else "    return (\n",
             "score": float(i % 2)} for i in range(16)]
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    result = train_rm.main([f"--init_from={tiny_lm}", f"--out_dir={tmp_path / 'mse'}", f"--train_file={path}",
                            f"--val_file={path}", "--device=cpu", "--loss=mse", "--batch_size=8", "--max_iters=2",
                            "--eval_interval=2"])
    assert math.isfinite(result["val_loss"]) and "val_correlation" in result
    assert (tmp_path / "mse" / "rm.png").exists()


def test_a_missing_init_checkpoint_names_the_command_that_makes_it(tmp_path, pref_files):
    with pytest.raises(UserError, match=r"no checkpoint at .*sft_small.*python train_sft.py config/sft_small.py"):
        train_rm.main([f"--init_from={tmp_path / 'sft_small'}", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])
    with pytest.raises(UserError, match=r"init_from='resume' continues a run"):
        train_rm.main(["--init_from=resume", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])


def test_logistic_loss_is_the_binary_cross_entropy_of_labels_by_hand_and_other_scores_are_refused(tmp_path):
    rewards, labels = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    by_hand = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(2)) / 3  # -log sigma(+-r)
    assert train_rm.logistic_loss(rewards, labels).item() == pytest.approx(by_hand, abs=1e-6)
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"user_input": "x", "completion": " y", "score": 0.5}])
    cfg = train_rm.Config(loss="logistic")
    with pytest.raises(UserError, match=r"loss='logistic' learns labels 1 and 0, but the scores include \[0.5\]"):
        train_rm.load_data(scored, cfg, get_tokenizer("byte"), 64, "train")


def test_a_batch_that_does_not_split_into_the_micro_batches_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"batch_size=6 must be divisible by the number of processes \(1\) times "
                                        r"gradient_accumulation_steps \(4\)"):
        train_rm.main(["--batch_size=6", "--gradient_accumulation_steps=4", f"--out_dir={tmp_path / 'o'}",
                       "--device=cpu"])
