"""train_grpo.py: each advantage estimator against a hand computation, the KL estimators' values and expected
gradients, the clipped loss and its normalisers, best-of-n's KL, and small end-to-end runs on a toy reward with a
known optimum (and an exact resume)."""
import contextlib
import math

import pytest
import torch

import train_grpo
from common import read_jsonl_records, Runtime, UserError
from model import GPT, GPTConfig
from tasks import pycode as task
from tokenizer import get_tokenizer
from train_grpo import (advantages_of, aggregate, best_of_n_kl, clipped_token_loss, dr_grpo_advantages,
                        grpo_advantages, kl_k1, kl_k2, kl_k3, no_signal_share, per_token_rewards,
                        reinforce_advantages, reinforce_pp_advantages, returns_to_go, rloo_advantages)
from test_ppo import make_policy_checkpoint, ragged_mask, toy_prompts


# ---- advantages

def test_reinforce_is_the_return_to_go_less_the_batch_mean_by_hand():
    rewards = torch.tensor([[0.0, -0.5, 1.0], [2.0, 1.0, 9.0]])  # 9.0 lies after the second response's end
    mask = ragged_mask([3, 2], 3)
    # gamma 0.5: row 1: G_2 = 1, G_1 = -0.5 + 0.5 = 0, G_0 = 0 + 0 = 0; row 2: G_1 = 1, G_0 = 2 + 0.5 = 2.5
    assert torch.allclose(returns_to_go(rewards, mask, 0.5), torch.tensor([[0.0, 0.0, 1.0], [2.5, 1.0, 0.0]]))
    plain = reinforce_advantages(rewards, mask, 0.5, baseline=False)
    assert torch.allclose(plain, torch.tensor([[0.0, 0.0, 1.0], [2.5, 1.0, 0.0]]))
    mean = (0 + 0 + 1 + 2.5 + 1) / 5  # over the five real tokens
    with_baseline = reinforce_advantages(rewards, mask, 0.5, baseline=True)
    assert torch.allclose(with_baseline, torch.tensor([[-mean, -mean, 1 - mean], [2.5 - mean, 1 - mean, 0.0]]))


def test_rloo_is_each_reward_against_the_others_mean_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])  # two groups of 4, the second all equal
    expected = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(rloo_advantages(rewards, 4), torch.tensor(expected))
    assert torch.equal(rloo_advantages(torch.tensor([5.0, -2.0]), 1), torch.zeros(2))  # groups of one: no other


def test_rloo_equals_g_over_g_minus_1_times_the_reward_less_the_group_mean():
    G = 5
    rewards = torch.randn(4 * G)
    R = rewards.view(-1, G)
    assert torch.allclose(rloo_advantages(rewards, G), (G / (G - 1) * (R - R.mean(1, keepdim=True))).view(-1),
                          atol=1e-6)


def test_grpo_standardises_within_the_group_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal, std 0
    eps = 1e-4
    expected = [0.75 / (0.5 + eps)] + [-0.25 / (0.5 + eps)] * 3 + [0.0] * 4
    assert torch.allclose(grpo_advantages(rewards, 4, eps), torch.tensor(expected))
    assert torch.equal(grpo_advantages(torch.tensor([0.3, 7.0]), 1), torch.zeros(2))  # a group of one


def test_dr_grpo_drops_the_std_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    assert torch.allclose(dr_grpo_advantages(rewards, 4), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert torch.equal(dr_grpo_advantages(torch.tensor([0.3, 7.0]), 1), torch.zeros(2))


def test_reinforce_pp_puts_the_kl_in_every_tokens_reward_and_whitens_over_the_batch_by_hand():
    scores = torch.tensor([1.0, 0.0])
    penalty = torch.tensor([[0.1, 0.2], [-0.1, -0.3]])  # beta * k1 at each token
    rewards = per_token_rewards(scores, torch.ones(2, 2), penalty)
    assert torch.allclose(rewards, torch.tensor([[-0.1, 0.8], [0.1, 0.3]]))
    # returns-to-go [[0.7, 0.8], [0.4, 0.3]]: mean 0.55, variance (2 * 0.15^2 + 2 * 0.25^2) / 4 = 0.0425
    expected = (torch.tensor([[0.7, 0.8], [0.4, 0.3]]) - 0.55) / math.sqrt(0.0425)
    assert torch.allclose(reinforce_pp_advantages(rewards, torch.ones(2, 2)), expected, atol=1e-5)
    assert torch.allclose(advantages_of("reinforce_pp", rewards, torch.ones(2, 2), G=2), expected, atol=1e-5)


def test_a_group_estimator_scores_the_sequence_reward_and_gives_it_to_every_token():
    mask = ragged_mask([3, 1, 2, 2], 3)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    penalty = 0.1 * torch.ones(4, 3)  # k1 in the reward: a longer response pays more
    rewards = per_token_rewards(scores, mask, penalty)
    sequence = torch.tensor([1 - 0.3, -0.1, -0.2, -0.2])  # the score plus the penalties of its own tokens
    assert torch.allclose(torch.where(mask.bool(), rewards, 0.0).sum(1), sequence)
    for name, estimator in (("grpo", grpo_advantages), ("rloo", rloo_advantages), ("dr_grpo", dr_grpo_advantages)):
        got = advantages_of(name, rewards, mask, G=2)
        assert torch.allclose(got, estimator(sequence, 2)[:, None] * mask), name


def test_no_signal_share_counts_the_groups_of_equal_scores():
    assert no_signal_share(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == pytest.approx(2 / 3)


# ---- KL estimators

def test_kl_estimators_values_by_hand():
    delta = torch.tensor([0.5, -0.5, 0.0])  # log pi_ref - log pi
    assert torch.allclose(kl_k1(delta), torch.tensor([-0.5, 0.5, 0.0]))
    assert torch.allclose(kl_k2(delta), torch.tensor([0.125, 0.125, 0.0]))
    assert torch.allclose(kl_k3(delta), torch.tensor([math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, 0.0]))


def test_kl_estimators_expected_gradients_are_zero_the_reverse_kl_and_the_forward_kl():
    # a distribution small enough to enumerate: E_{y~pi}[k(y)] is a weighted sum, the weights pi with no
    # gradient (the samples are given), as in a loss on sampled tokens
    torch.manual_seed(3)
    theta, ref_logits = torch.randn(6, requires_grad=True), torch.randn(6)
    log_ref = torch.log_softmax(ref_logits, 0)

    def expected_gradient(estimator):
        log_pi = torch.log_softmax(theta, 0)
        loss = (log_pi.exp().detach() * estimator(log_ref - log_pi)).sum()
        return torch.autograd.grad(loss, theta)[0]

    def analytic_gradient(kl):
        log_pi = torch.log_softmax(theta, 0)
        return torch.autograd.grad(kl(log_pi), theta)[0]

    reverse = lambda log_pi: (log_pi.exp() * (log_pi - log_ref)).sum()  # KL(pi || pi_ref)
    forward = lambda log_pi: (log_ref.exp() * (log_ref - log_pi)).sum()  # KL(pi_ref || pi)
    assert torch.allclose(expected_gradient(kl_k1), torch.zeros(6), atol=1e-6)  # log pi's expected score is 0
    assert torch.allclose(expected_gradient(kl_k2), analytic_gradient(reverse), atol=1e-6)
    assert torch.allclose(expected_gradient(kl_k3), analytic_gradient(forward), atol=1e-6)
    assert not torch.allclose(analytic_gradient(reverse), analytic_gradient(forward), atol=1e-3)  # they do differ
    # as estimates of the value, k1 and k3 are unbiased for the reverse KL
    with torch.no_grad():
        log_pi = torch.log_softmax(theta, 0)
        for estimator in (kl_k1, kl_k3):
            assert (log_pi.exp() * estimator(log_ref - log_pi)).sum().item() == pytest.approx(reverse(log_pi).item(),
                                                                                             abs=1e-6)


def test_k3_is_non_negative_and_accurate_at_tiny_differences_in_float32():
    small = torch.tensor([1e-4, -1e-4], dtype=torch.float32)
    exact = small.double() ** 2 / 2
    assert torch.allclose(kl_k3(small).double(), exact, rtol=0.01)
    naive = torch.exp(small) - 1 - small  # e^delta - 1 rounds away the delta^2/2 it should leave
    assert not torch.allclose(naive.double(), exact, rtol=0.01)
    delta = torch.cat([torch.logspace(-12, 1, 200), -torch.logspace(-12, 1, 200)]).float()
    assert (kl_k3(delta) >= 0).all()


# ---- the loss

def test_clipped_token_loss_with_separate_low_and_high_clips_by_hand():
    old = torch.zeros(1, 5)
    new = torch.tensor([[0.3, 0.3, -0.3, -0.3, 0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    loss, low, high = clipped_token_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    up, down, mid = math.exp(0.3), math.exp(-0.3), math.exp(0.1)  # 1.350, 0.741, 1.105
    # A > 0 above 1.28: clipped; A < 0 above: unclipped (the pessimistic branch); A > 0 below 0.8: unclipped;
    # A < 0 below 0.8: clipped; inside: rho * A
    assert torch.allclose(loss, torch.tensor([[-1.28, up, -down, 0.8, -2 * mid]]), atol=1e-6)
    assert low.tolist() == [[False, False, False, True, False]]
    assert high.tolist() == [[True, False, False, False, False]]
    loss.sum().backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0  # where the clip is active the gradient is zero
    assert new.grad[0, 1] != 0 and new.grad[0, 2] != 0


def test_loss_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])  # 50, 60 after the second response's end
    mask = ragged_mask([3, 1], 3)
    assert aggregate(values, mask, "sequence", 5).item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # GRPO
    assert aggregate(values, mask, "token", 5).item() == pytest.approx(10 / 4)  # DAPO
    assert aggregate(values, mask, "constant", 5).item() == pytest.approx(10 / (2 * 5))  # Dr. GRPO


# ---- best-of-n

def test_best_of_n_kl_is_the_closed_form_and_matches_an_enumerated_distribution():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)
    # K equally likely responses with distinct rewards: the best of n is the i-th best with probability
    # (i/K)^n - ((i-1)/K)^n; its KL to the uniform distribution tends to log n - (n-1)/n
    K = 100_000
    i = torch.arange(1, K + 1, dtype=torch.float64)
    for n in (2, 4, 8):
        p = (i / K) ** n - ((i - 1) / K) ** n
        kl = (p * torch.log(p * K)).sum().item()
        assert kl == pytest.approx(best_of_n_kl(n), abs=1e-3)


# ---- end to end

def even_token_share(texts, responses, mask):  # optimum 1.0: every response token an even id
    return ((responses % 2 == 0).float() * mask).sum(1) / mask.sum(1)


def test_end_to_end_grpo_raises_a_toy_reward_with_a_known_optimum(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 20)
    out = tmp_path / "grpo"
    args = [f"--init_from={sft}", f"--out_dir={out}", f"--prompts_file={prompts}", f"--eval_prompts={prompts}",
            "--max_iters=40", "--eval_interval=40", "--batch_size=4", "--group_size=8", "--max_new_tokens=8",
            "--learning_rate=3e-3", "--missing_eot_penalty=0.0", "--device=cpu", "--log_interval=5",
            "--eval_samples=2", "--eval_max_prompts=8"]
    train_grpo.main(args, score_fn=even_token_share)
    rows = [r for r in read_jsonl_records(out / "metrics.jsonl") if "score" in r]
    first, last = sum(r["score"] for r in rows[:5]) / 5, sum(r["score"] for r in rows[-5:]) / 5
    assert 0.35 < first < 0.65  # about half of 257 random token ids are even
    assert last > first + 0.2
    assert all("kl" not in r for r in rows)  # kl='none': no reference in training
    assert all(r["clip_low"] == 0 and r["clip_high"] == 0 for r in rows)  # one update per rollout: rho = 1
    for name in ("ckpt.pt", "metrics.jsonl", "grpo.png", "report.md", "before_after.json"):
        assert (out / name).exists()
    report = (out / "report.md").read_text()
    assert "SFT (before)" in report and "GRPO (after)" in report and "KL to SFT" in report
    evals = [r for r in read_jsonl_records(out / "metrics.jsonl") if "eval_solved" in r]
    assert [r["iter"] for r in evals] == [0, 40] and evals[-1]["eval_kl"] > 0  # evaluate() loads the reference


def test_without_the_evaluation_at_start_the_first_is_after_updates_and_measures_its_kl(tmp_path):
    """eval_at_start=False (the pipeline's later seeds): no evaluation at iteration 0; the first one, after updates,
    estimates the KL against the reference (a start-of-run evaluation would take the policy as its own reference)
    and the report's SFT column is empty rather than filled with a trained model's measures."""
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 8)
    out = tmp_path / "grpo"
    result = train_grpo.main([f"--init_from={sft}", f"--out_dir={out}", f"--prompts_file={prompts}",
                              f"--eval_prompts={prompts}", "--max_iters=2", "--eval_interval=1", "--batch_size=2",
                              "--group_size=4", "--max_new_tokens=6", "--learning_rate=3e-3", "--device=cpu",
                              "--eval_samples=2", "--eval_at_start=False"], score_fn=even_token_share)
    evals = [r for r in read_jsonl_records(out / "metrics.jsonl") if "eval_solved" in r]
    assert [r["iter"] for r in evals] == [1, 2] and evals[0]["eval_kl"] != 0.0
    assert result["before"] == {} and result["after"]["kl"] == evals[-1]["eval_kl"]
    report = (out / "report.md").read_text()
    assert "GRPO (after):" in report and "SFT (before):" not in report
    assert all(line.split()[-2] == "-" for line in report.split("```")[1].strip().splitlines()[1:])


def test_grpo_resume_is_exact_with_a_kl_loss_and_several_updates_per_rollout(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 10)
    score = lambda texts, responses, mask: ((responses % 3 == 0).float() * mask).sum(1) / mask.sum(1)
    common = [f"--prompts_file={prompts}", f"--eval_prompts={prompts}", "--eval_interval=2", "--batch_size=3",
              "--group_size=4", "--max_new_tokens=6", "--device=cpu", "--advantage=dr_grpo", "--kl=k3",
              "--kl_coef=0.1", "--update_epochs=2", "--minibatch_size=6", "--learning_rate=3e-3", "--clip_high=0.28",
              "--eval_samples=2", "--eval_max_prompts=4"]
    train_grpo.main(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'a'}", "--max_iters=4"], score_fn=score)
    train_grpo.main(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'b'}", "--max_iters=2"], score_fn=score)
    train_grpo.main(common + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=4"], score_fn=score)
    a = [r for r in read_jsonl_records(tmp_path / "a" / "metrics.jsonl") if "score" in r]
    b = [r for r in read_jsonl_records(tmp_path / "b" / "metrics.jsonl") if "score" in r]
    keys = ("score", "kl", "loss", "kl_loss", "clip_low", "clip_high")
    assert len(a) == 4 and [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert any(r["clip_low"] + r["clip_high"] > 0 for r in a)  # later minibatches are off-policy: the clip acts

    with pytest.raises(UserError, match="group_size must be at least 2"):
        train_grpo.main(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'c'}", "--group_size=1"])
    with pytest.raises(UserError, match="is a 'sft' checkpoint, not a GRPO run's"):
        train_grpo.main(common + ["--init_from=resume", f"--out_dir={tmp_path / 'sft'}"], score_fn=score)


def test_best_of_n_keeps_the_best_scored_sample_and_reports_its_kl(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 6)
    out = tmp_path / "bon"
    result = train_grpo.main([f"--init_from={sft}", f"--out_dir={out}", f"--prompts_file={prompts}",
                              f"--eval_prompts={prompts}", "--best_of_n=8", "--batch_size=3", "--max_new_tokens=8",
                              "--device=cpu", "--eval_samples=2"], score_fn=even_token_share)
    assert sorted(result["best_of"]) == [1, 2, 4, 8]
    assert result["after"]["kl"] == pytest.approx(best_of_n_kl(8))
    records = read_jsonl_records(out / "metrics.jsonl")
    assert [r["best_of"] for r in records] == [1, 2, 4, 8]
    for name in ("report.md", "before_after.json", "best_of_n.png"):
        assert (out / name).exists()
    assert "best-of-8 (after)" in (out / "report.md").read_text()


def test_best_of_n_keeps_the_sample_the_score_ranks_first_the_earliest_of_ties(tmp_path):
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()
    eval_set = task.read_eval_set(toy_prompts(tmp_path / "prompts.jsonl", 5), tok, "none", 40)
    seen = []

    def score(texts, seqs, attn, P):  # the number of 'a' bytes, so that ties are common
        responses = seqs[:, P:] * attn[:, P:]
        seen.append([tok.decode([t for t in row if t != tok.eot_token and t]) for row in responses.tolist()])
        return (responses == ord("a")).float().sum(1) + (responses == ord("b")).float().sum(1)

    cfg = train_grpo.Config(best_of_n=4, batch_size=2, max_new_tokens=12, temperature=1.0)
    rt = Runtime("cpu", "cpu", "float32", contextlib.nullcontext())
    results = train_grpo.best_of_n(model, tok, eval_set, score, None, cfg, rt)
    samples = [text for chunk in seen for text in chunk]  # 4 samples per prompt, prompt by prompt
    assert len(samples) == 5 * 4
    for k in (1, 2, 4):
        _, kept = results[k]
        for i, text in enumerate(kept):
            group = samples[i * 4:i * 4 + k]
            counts = [t.count("a") + t.count("b") for t in group]
            assert text == group[counts.index(max(counts))], (k, i)
    assert results[1][0]["kl"] == 0.0 and results[4][0]["kl"] == pytest.approx(math.log(4) - 3 / 4)
