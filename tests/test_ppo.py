"""train_ppo.py: GAE, the clipped losses, masking after end-of-text, the KL controller, rollout log-probs, and a
small end-to-end run on a toy reward with a known optimum."""
import json
import math
import os

import pytest
import torch

import train_ppo
from common import load_checkpoint, read_jsonl_records, save_checkpoint, UserError
from model import GPT, GPTConfig
from train_ppo import (AdaptiveKLController, gae_advantages, kl_penalized_rewards, masked_mean, masked_whiten,
                       policy_loss, response_logprobs, response_mask, value_loss)


def ragged_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_gae_equals_the_brute_force_sum_of_discounted_td_errors():
    torch.manual_seed(1)
    B, T, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = [7, 5, 1, 3]
    mask = ragged_mask(lengths, T)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for b, L in enumerate(lengths):
        V = lambda t: values[b, t].item() if t < L else 0.0  # the episode ends after the last real token
        deltas = [rewards[b, t].item() + gamma * V(t + 1) - V(t) for t in range(L)]
        for t in range(L):
            expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + V(t), abs=1e-5)
        assert torch.all(advantages[b, L:] == 0) and torch.all(returns[b, L:] == 0)


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.7]]), torch.ones(1, 3)
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(returns, torch.ones(1, 3))  # the Monte-Carlo return from every step is the final reward
    assert torch.allclose(advantages, 1.0 - values)


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = ragged_mask([3, 2], 3)
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))


def test_clipped_policy_loss_takes_the_pessimistic_branch_by_hand():
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.6487 (clipped to 1.2), e^-0.5 = 0.6065 (clipped to 0.8), e^0.1 = 1.105 (inside)
    new = torch.tensor([[0.5, 0.5, -0.5, 0.1]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 2.0]])
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    r = [math.exp(0.5), math.exp(0.5), math.exp(-0.5), math.exp(0.1)]
    # A>0, rho>1+eps: clipped (1.2); A<0, rho>1+eps: unclipped (-rho*A larger); A>0, rho<1-eps: unclipped
    # (min picks rho*A = 0.6065 < 0.8); inside the range: rho*A
    per_token = [-1.2 * 1.0, r[1] * 1.0, -r[2] * 1.0, -r[3] * 2.0]
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(3 / 4)
    expected_kl = sum((x - 1) - math.log(x) for x in r) / 4
    assert approx_kl.item() == pytest.approx(expected_kl, abs=1e-6)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, -1.0]])
    loss = value_loss(new, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 1: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 2: (0.1+1)^2 = 1.21 both ways
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, abs=1e-6)


def test_positions_after_end_of_text_are_left_out_of_every_mean():
    torch.manual_seed(0)
    mask = ragged_mask([4, 2], 6)
    a = {k: torch.randn(2, 6) for k in ("new", "old", "adv", "v", "v_old", "ret", "rew")}
    b = {k: torch.where(mask.bool(), v, torch.randn(2, 6) * 100) for k, v in a.items()}  # garbage after eot
    for x in (a, b):
        x["out"] = (policy_loss(x["new"], x["old"], x["adv"], mask, 0.2),
                    value_loss(x["v"], x["v_old"], x["ret"], mask, 0.2),
                    gae_advantages(x["rew"], x["v"], mask, 1.0, 0.95),
                    masked_whiten(x["adv"], mask), masked_mean(x["adv"], mask))
    pa, pb = a["out"][0], b["out"][0]
    assert all(torch.allclose(x, y) for x, y in zip(pa, pb))
    assert torch.allclose(a["out"][1], b["out"][1])
    assert all(torch.allclose(x, y) for x, y in zip(a["out"][2], b["out"][2]))
    assert torch.allclose(a["out"][3], b["out"][3]) and torch.allclose(a["out"][4], b["out"][4])
    whitened = a["out"][3]
    assert masked_mean(whitened, mask).abs() < 1e-6
    assert masked_mean(whitened ** 2, mask).item() == pytest.approx(1.0, abs=1e-4)


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eot():
    responses = torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    assert response_mask(responses, 9).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_adaptive_kl_controller_moves_beta_the_right_way():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    ctl.update(kl=4.0, n_samples=10)  # too much KL: more penalty
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    high = ctl.beta
    ctl.update(kl=1.0, n_samples=10)  # too little: less penalty
    assert ctl.beta < high
    ctl.beta = 0.1
    ctl.update(kl=2.0, n_samples=10)  # on target: unchanged
    assert ctl.beta == pytest.approx(0.1)


def test_stored_rollout_logprobs_and_values_equal_a_fresh_forward_pass():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32, scalar_head=True)).eval()
    prompts = torch.randint(0, 49, (4, 6))
    attn = torch.ones_like(prompts)
    attn[1, :3] = 0  # a left-padded row
    gen = torch.Generator().manual_seed(0)
    seqs, sampled_logprobs, sampled_values = model.generate(prompts, 12, attention_mask=attn, temperature=0.7,
                                                            eot_token=49, generator=gen, return_logprobs=True,
                                                            return_values=True)
    mask = response_mask(seqs[:, 6:], 49)
    full_attn = torch.cat([attn, mask.long()], dim=1)
    with torch.no_grad():
        fresh, fresh_values, _ = response_logprobs(model, seqs, full_attn, 6, temperature=0.7, with_values=True)
    assert torch.allclose(fresh * mask, sampled_logprobs * mask, atol=1e-5)
    assert torch.allclose(fresh_values * mask, sampled_values * mask, atol=1e-5)
    # PPO keeps the rollout's log-probs as log pi_old: its first ratio pi / pi_old is 1 up to float rounding,
    # so the first minibatch clips nothing
    _, clipfrac, approx_kl = policy_loss(fresh, sampled_logprobs, torch.randn_like(fresh), mask, clip_range=1e-3)
    assert clipfrac.item() == 0.0 and abs(approx_kl.item()) < 1e-8


def make_policy_checkpoint(directory, vocab=257):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(os.path.join(directory, "ckpt.pt"), {
        "stage": "sft", "model_args": vars(model.config), "model": model.state_dict(), "tokenizer": "byte"})
    return str(directory)


def toy_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"def f{i}(x):\n    \"\"\"Return x.\"\"\"\n"}) + "\n")
    return str(path)


def test_end_to_end_ppo_raises_a_toy_reward_with_a_known_optimum(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 20)

    def even_token_share(texts, responses, mask):  # optimum 1.0: every response token an even id
        return (((responses % 2 == 0).float() * mask).sum(1) / mask.sum(1))

    held_out = tmp_path / "held_out.jsonl"  # three functions without arguments first, then three with
    held_out.write_text("".join(json.dumps({"prompt": f"def g{i}({'self' if i < 3 else 'x'}):\n    \"\"\"G.\"\"\"\n"})
                                + "\n" for i in range(6)))
    out = tmp_path / "ppo"
    args = [f"--init_from={sft}", f"--out_dir={out}", f"--prompts_file={prompts}", f"--eval_prompts={held_out}",
            "--max_iters=30", "--eval_interval=30", "--batch_size=32", "--minibatch_size=16", "--max_new_tokens=8",
            "--learning_rate=3e-3", "--kl_coef=0.0", "--missing_eot_penalty=0.0", "--device=cpu", "--log_interval=10"]
    train_ppo.main(args, score_fn=even_token_share)
    rows = [r for r in read_jsonl_records(out / "metrics.jsonl") if "score" in r]
    first, last = sum(r["score"] for r in rows[:5]) / 5, sum(r["score"] for r in rows[-5:]) / 5
    assert 0.35 < first < 0.65  # about half of 257 random token ids are even
    assert last > first + 0.2
    for name in ("ckpt.pt", "metrics.jsonl", "ppo.png", "report.md", "before_after.json"):
        assert (out / name).exists()
    report = (out / "report.md").read_text()
    assert "SFT (before)" in report and "PPO (after)" in report and "solved, functions with arguments" in report
    samples = report.split("## Samples")[1]  # the functions that take arguments are the ones shown
    assert all(f"def g{i}(x)" in samples for i in (3, 4, 5)) and "def g0(self)" not in samples


def test_ppo_resumes_exactly_from_any_checkpoint_the_last_one_included_any_number_of_times(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 10)
    score = lambda texts, responses, mask: ((responses % 3 == 0).float() * mask).sum(1) / mask.sum(1)
    common = [f"--prompts_file={prompts}", f"--eval_prompts={prompts}", "--eval_interval=2", "--batch_size=8",
              "--minibatch_size=4", "--max_new_tokens=6", "--device=cpu", "--adaptive_kl=True", "--target_kl=0.01",
              "--eval_samples=2", "--eval_max_prompts=4"]
    straight = train_ppo.main(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'a'}", "--max_iters=4"],
                              score_fn=score)
    first = train_ppo.main(common + [f"--init_from={sft}", f"--out_dir={tmp_path / 'b'}", "--max_iters=2"],
                           score_fn=score)
    # resumed at its last checkpoint there is nothing left to do: the same result and report, from the checkpoint
    again = train_ppo.main(common + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=2"],
                           score_fn=score)
    assert again == first and "PPO (after)" in (tmp_path / "b" / "report.md").read_text()
    for max_iters in (3, 4):  # resumed twice: a resumed run's checkpoint resumes too
        resumed = train_ppo.main(common + ["--init_from=resume", f"--out_dir={tmp_path / 'b'}",
                                           f"--max_iters={max_iters}"], score_fn=score)
    a = [r for r in read_jsonl_records(tmp_path / "a" / "metrics.jsonl") if "score" in r]
    b = [r for r in read_jsonl_records(tmp_path / "b" / "metrics.jsonl") if "score" in r]
    keys = ("score", "kl", "beta", "policy_loss", "value_loss")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert resumed == straight
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and b["sft_source"] == sft

    # an out_dir holding another stage's checkpoint cannot be resumed as PPO
    with pytest.raises(UserError, match="is a 'sft' checkpoint, not a PPO run's"):
        train_ppo.main(common + ["--init_from=resume", f"--out_dir={tmp_path / 'sft'}", "--max_iters=4"],
                       score_fn=score)


def test_a_reward_model_without_a_scalar_head_is_a_one_line_error(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    with pytest.raises(UserError, match=r"sft holds a 'sft' model without a scalar head, not a reward model; make one"):
        train_ppo.main([f"--init_from={sft}", f"--reward_model={sft}", f"--out_dir={tmp_path / 'ppo'}", "--device=cpu"])


def test_a_separate_critic_starts_from_the_reward_model_and_learns_alongside(tmp_path):
    sft = make_policy_checkpoint(tmp_path / "sft")
    torch.manual_seed(1)
    rm = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=2, n_head=2, n_embd=32, scalar_head=True))
    save_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), {"stage": "rm", "model_args": vars(rm.config),
                                                      "model": rm.state_dict(), "tokenizer": "byte"})
    seqs, attn = torch.randint(0, 256, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    by_head = train_ppo.response_values(rm, seqs, attn, 4)
    assert torch.allclose(by_head, train_ppo.response_logprobs(rm, seqs, attn, 4, 1.0, with_values=True)[1])
    prompts = toy_prompts(tmp_path / "prompts.jsonl", 8)
    score = lambda texts, responses, mask: (responses[:, 0] % 2 == 0).float()
    train_ppo.main([f"--init_from={sft}", f"--reward_model={tmp_path / 'rm'}", "--critic=separate",
                    f"--out_dir={tmp_path / 'ppo'}", f"--prompts_file={prompts}", f"--eval_prompts={prompts}",
                    "--max_iters=2", "--eval_interval=2", "--batch_size=4", "--minibatch_size=4",
                    "--max_new_tokens=6", "--device=cpu"], score_fn=score)
    critic = load_checkpoint(str(tmp_path / "ppo"))["critic"]
    assert set(critic) == set(rm.state_dict())  # the critic is a model of the reward model's shape...
    assert not torch.equal(critic["scalar_head.weight"], rm.state_dict()["scalar_head.weight"])  # ...that learnt


def test_the_task_reward_remembers_the_last_responses_so_templates_across_rollouts_score_zero():
    from tokenizer import get_tokenizer
    tok = get_tokenizer("byte")
    prompts = [f'def f{i}(v{i}):\n    """Doc {i}."""\n' for i in range(4)]
    recent = []
    score = train_ppo.task_scorer(tok, recent, window=3)

    def rollout(indices, body):
        responses = [list(body.replace("V", f"v{i}").encode()) + [tok.eot_token] for i in indices]
        ids = torch.tensor([r + [tok.eot_token] * (12 - len(r)) for r in responses])
        return score([prompts[i] for i in indices], ids, train_ppo.response_mask(ids, tok.eot_token)).tolist()

    assert rollout([0], "    return V\n") == [1.0]
    assert rollout([1], "    return V\n") == [1.0]  # two prompts share the body: not yet a template
    assert rollout([2], "    return V\n") == [0.0]  # the third, in another rollout: a template
    assert len(recent) == 3 and recent[-1] == [prompts[2], "    return v2\n"]
    rollout([3], "    return V + 1\n")
    assert [p for p, _ in recent] == prompts[1:]  # the window keeps the last 3 responses
