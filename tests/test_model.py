"""model.py: the GPT forward pass, the KV cache, padding, sampling filters, beam search, GPT-2 weights."""
import itertools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model import (GPT, GPTConfig, KVCache, Linear, TokenLogprobs, read_safetensors, sample_next_token, top_k_filter,
                   top_p_filter)


def tiny(vocab=37, block=32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def test_logits_for_every_position_and_loss_ignores_minus_one():
    model = tiny()
    idx = torch.randint(0, 37, (3, 10))
    targets = torch.randint(0, 37, (3, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 37)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1)))
    masked = targets.clone()
    masked[:, :5] = -1
    _, loss_masked = model(idx, masked)
    assert torch.allclose(loss_masked, F.cross_entropy(logits[:, 5:].reshape(-1, 37), targets[:, 5:].reshape(-1)))


def test_causality_future_tokens_never_change_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 37, (2, 12))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 37
    logits2, _ = model(changed)
    assert torch.equal(logits[:, :7], logits2[:, :7])
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])


def test_weight_tying_and_no_scalar_head_by_default():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.scalar_head is None
    with pytest.raises(ValueError, match="no scalar head"):
        model.scalar(torch.zeros(1, 2, 16))
    with_head = tiny(scalar_head=True)
    assert with_head.get_num_params() == model.get_num_params() + 16 + 1
    assert with_head.scalar(with_head.hidden_states(torch.zeros(2, 5, dtype=torch.long))).shape == (2, 5)


def test_residual_projections_use_scaled_init():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=8, n_head=4, n_embd=256))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_left_padded_batch_gives_the_same_logits_as_unpadded_rows():
    model = tiny()
    a, b = torch.randint(0, 37, (1, 9)), torch.randint(0, 37, (1, 5))
    pad = 4
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    logits, _ = model(batch, attention_mask=mask)
    assert torch.allclose(logits[0], model(a)[0][0], atol=1e-5)
    assert torch.allclose(logits[1, pad:], model(b)[0][0], atol=1e-5)
    assert not torch.isnan(logits).any()


def test_kv_cache_generation_equals_uncached_greedy_token_for_token():
    model = tiny()
    idx = torch.randint(0, 37, (3, 6))
    cached = model.generate(idx, 20, greedy=True)
    uncached = model.generate(idx, 20, greedy=True, use_cache=False)
    assert cached.shape == (3, 26)
    assert torch.equal(cached, uncached)
    # and the uncached path is plain argmax over a full forward pass at every step
    seq = idx
    for _ in range(20):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_kv_cache_with_left_padding_equals_unpadded_generation():
    model = tiny()
    a, b = torch.randint(0, 37, (1, 8)), torch.randint(0, 37, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model.generate(batch, 10, attention_mask=mask, greedy=True)
    assert torch.equal(out[0], model.generate(a, 10, greedy=True)[0])
    assert torch.equal(out[1, 5:], model.generate(b, 10, greedy=True)[0])


def test_attention_on_a_cpu_runs_in_float32_under_bfloat16_autocast_and_its_cache_holds_float32(monkeypatch):
    model = tiny()
    prompts = torch.randint(0, 37, (3, 6))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    sdpa, seen, stored = F.scaled_dot_product_attention, [], []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, torch.is_autocast_enabled("cpu")))
                        or sdpa(q, k, v, **kw))
    append = KVCache.append
    monkeypatch.setattr(KVCache, "append", lambda self, layer, k, v: stored.append(k.dtype) or append(self, layer, k, v))
    x = torch.randint(0, 37, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
        logits.float().sum().backward()  # training runs it too, and the gradients flow back through the casts
        with torch.no_grad():
            tokens = model.generate(prompts, 12, attention_mask=mask, generator=torch.Generator().manual_seed(1))
    assert logits.dtype == torch.bfloat16  # the products around attention still run in autocast's dtype
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(seen) == {(torch.float32, torch.float32, False)} and set(stored) == {torch.float32}
    assert tokens.shape == (3, 18)
    # the float32 path is untouched: attention's output equals the plain float32 computation
    attn, h = model.transformer.h[0].attn, torch.randn(2, 5, model.config.n_embd)
    q, k, v = attn.c_attn(h).contiguous().split(model.config.n_embd, dim=2)
    q, k, v = (t.view(2, 5, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
    expected = attn.c_proj(sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 5, -1))
    assert torch.equal(attn(h), expected)


def test_generation_stops_per_row_at_end_of_text_and_fills_after_it():
    model = tiny()
    eot = 5
    idx = torch.randint(0, 37, (4, 3))
    free = model.generate(idx, 25, greedy=True)
    out = model.generate(idx, 25, greedy=True, eot_token=eot)
    for row_free, row in zip(free, out):
        new_free, new = row_free[3:].tolist(), row[3:].tolist()
        if eot in new_free[:len(new)]:
            stop = new_free.index(eot)
            assert new[:stop + 1] == new_free[:stop + 1]
            assert all(t == eot for t in new[stop:])
        else:
            assert new == new_free[:len(new)]


def test_generation_never_runs_past_the_context_and_long_prompts_are_an_error_or_cropped():
    model = tiny(block=16)
    out = model.generate(torch.randint(0, 37, (2, 10)), 50, greedy=True)
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match="prompt has 16 tokens but the model's context is 16"):
        model.generate(torch.randint(0, 37, (1, 16)), 4)
    cropped = model.generate(torch.randint(0, 37, (1, 40)), 4, crop_prompt=True, greedy=True)
    assert cropped.shape == (1, 16)


def test_returned_logprobs_are_those_of_the_sampling_distribution():
    model = tiny()
    idx = torch.randint(0, 37, (4, 5))
    g = torch.Generator().manual_seed(1)
    out, logprobs = model.generate(idx, 8, temperature=0.7, top_k=10, generator=g, return_logprobs=True)
    logits, _ = model(out)
    for t in range(8):
        step_logits = top_k_filter(logits[:, 4 + t] / 0.7, 10)
        expected = F.log_softmax(step_logits, -1).gather(-1, out[:, 5 + t, None]).squeeze(-1)
        assert torch.allclose(logprobs[:, t], expected, atol=1e-5)


def test_returned_values_are_the_scalar_head_on_a_fresh_forward_pass_and_zero_after_end_of_text():
    model = tiny(scalar_head=True)
    idx = torch.randint(0, 36, (16, 5))
    g = torch.Generator().manual_seed(3)
    out, logprobs, values = model.generate(idx, 20, temperature=1.5, eot_token=36, generator=g,
                                           return_logprobs=True, return_values=True)
    n = out.size(1) - 5
    assert logprobs.shape == values.shape == (16, n)
    with torch.no_grad():
        fresh = model.scalar(model.hidden_states(out))[:, 4:4 + n]  # the state before each new token
    stopped_before = (out[:, 5:] == 36).long().cumsum(1) - (out[:, 5:] == 36).long() > 0
    assert stopped_before.any(), "the test needs a row that stops early"
    assert torch.allclose(values[~stopped_before], fresh[~stopped_before], atol=1e-5)
    assert torch.all(values[stopped_before] == 0)


@pytest.mark.parametrize("scale", [1.0, 400.0])  # 400: logits over 100, where a plain exp overflows float32
def test_token_logprobs_equal_log_softmax_in_value_and_gradient(monkeypatch, scale):
    monkeypatch.setattr(TokenLogprobs, "slice_elements", 40)  # 20 rows -> slices of 2 columns: many, one partial
    model = tiny()
    x = torch.randint(0, 37, (2, 10))
    hidden = model.hidden_states(x) * scale
    targets = torch.randint(0, 37, (2, 10))
    weights = torch.randn(2, 10)  # an arbitrary upstream gradient

    ours = model.token_logprobs(hidden, targets)
    ours_grads = torch.autograd.grad((ours * weights).sum(), model.parameters(), retain_graph=True)
    reference = F.log_softmax(model.lm_head(hidden), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    reference_grads = torch.autograd.grad((reference * weights).sum(), model.parameters())

    assert torch.allclose(ours, reference, atol=1e-5)
    for a, b in zip(ours_grads, reference_grads):  # includes the tied embedding, which gets both paths' gradients
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_token_logprobs_under_bfloat16_autocast_take_bfloat16_products_and_float32_sums():
    model = tiny()
    x, targets = torch.randint(0, 37, (2, 10)), torch.randint(0, 37, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(x)  # bf16 activations, as in a PPO update with dtype bfloat16
        ours = model.token_logprobs(hidden, targets)
    assert ours.dtype == torch.float32
    # by hand: the logits as bf16 products (what generation samples from), logsumexp and target logit in float32
    h, w = hidden.detach().reshape(-1, hidden.size(-1)).bfloat16(), model.lm_head.weight.detach().bfloat16()
    logits = (h @ w.t()).float()
    by_hand = (h.float() * w.float()[targets.reshape(-1)]).sum(-1) - logits.logsumexp(-1)
    assert torch.allclose(ours.detach().reshape(-1), by_hand, atol=1e-5)
    float32_products = F.log_softmax(model.lm_head(hidden.detach().float()), -1).gather(-1, targets[..., None])
    assert (float32_products.reshape(-1) - by_hand).abs().max() > 1e-4  # the two are told apart above

    weights = torch.randn(2, 10)
    grads = torch.autograd.grad((ours * weights).sum(), model.parameters(), retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(x)
    reference = F.log_softmax(model.lm_head(hidden.float()), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    reference_grads = torch.autograd.grad((reference * weights).sum(), model.parameters())
    for a, b in zip(grads, reference_grads):  # the same gradients, to bf16's precision
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 2e-2 * b.abs().max() + 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gives_the_same_result_for_few_and_many_rows(bias):
    torch.manual_seed(0)
    layer = Linear(16, 40, bias=bias)
    for shape in [(3, 16), (2, 1, 16), (8, 12, 16)]:  # few rows take the transposed product, many the plain one
        x = torch.randn(shape)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_linear_takes_the_transposed_product_for_few_rows_in_float32_only():
    torch.manual_seed(0)
    layer, x = Linear(16, 40), torch.randn(4, 1, 16)
    assert not layer(x).is_contiguous()  # float32: (W x^T)^T, a transposed view
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), F.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 and y.is_contiguous()  # bf16: the plain product, row-major logits
    assert torch.equal(y, expected)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], torch.tensor([5.0, 4.0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    logits = probs.log()
    # sorted: 0.5, 0.25, 0.2, 0.05 -> cumulative 0.5, 0.75, 0.95, 1.0
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).tolist() == [[True, True, True, True]]


def test_sampler_draws_from_the_filtered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    tokens, _ = sample_next_token(logits, top_k=3, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    expected = F.softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    assert freq[3] == 0
    assert torch.allclose(freq[:3], expected, atol=0.015)


def test_beam_search_with_one_beam_equals_greedy():
    model = tiny()
    idx = torch.randint(0, 37, (3, 4))
    assert torch.equal(model.generate(idx, 12, num_beams=1, greedy=True),
                       model._beam_search(idx, 12, 1, None, None))


def test_beam_search_as_wide_as_the_vocabulary_finds_the_best_two_token_continuation():
    vocab = 7
    model = tiny(vocab=vocab)
    with torch.no_grad():  # sharpen the model so that greedy and the best pair differ
        model.lm_head.weight.mul_(40)
    idx = torch.randint(0, vocab, (2, 3))
    out = model.generate(idx, 2, num_beams=vocab)
    for row in range(2):
        best, best_score = None, -float("inf")
        for a, b in itertools.product(range(vocab), repeat=2):
            seq = torch.cat([idx[row], torch.tensor([a, b])])[None]
            logp = F.log_softmax(model(seq)[0][0], -1)
            score = logp[2, a] + logp[3, b]
            if score > best_score:
                best, best_score = (a, b), score
        assert tuple(out[row, 3:].tolist()) == best


def test_matches_transformers_gpt2_logits_on_the_same_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=101, n_positions=64, bos_token_id=100,
                                  eos_token_id=100,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm parameters and biases, so that every weight is checked
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    idx = torch.randint(0, 101, (2, 20))
    for weights_file in ("model.safetensors", "pytorch_model.bin"):
        d = tmp_path / weights_file
        hf.save_pretrained(d)  # writes config.json and model.safetensors
        if weights_file == "pytorch_model.bin":  # the older layout: a pickled state dict
            os.remove(d / "model.safetensors")
            torch.save(hf.state_dict(), d / weights_file)
        ours = GPT.from_pretrained(str(d)).eval()
        with torch.no_grad():
            expected = hf(idx).logits
        assert torch.allclose(ours(idx)[0], expected, atol=1e-5, rtol=1e-5)
    # padded batches agree with HF's attention_mask handling too
    mask = torch.ones_like(idx)
    mask[1, :6] = 0
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = hf(idx, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(ours(idx, attention_mask=mask)[0][1, 6:], expected[1, 6:], atol=1e-5, rtol=1e-5)


def test_from_pretrained_rejects_a_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 8, "vocab_size": 10, "n_layer": 1,
                                                      "n_head": 1, "n_embd": 4}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="neither a directory nor a GPT-2 model name"):
        GPT.from_pretrained("not-a-model")


def test_download_by_name_fetches_once_into_the_cache(tmp_path, monkeypatch):
    import model as model_module
    transformers = pytest.importorskip("transformers")
    hub = tmp_path / "hub" / "gpt2"
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=16, bos_token_id=10,
                                  eos_token_id=10)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hub)
    monkeypatch.setattr(model_module, "HF_URL", (tmp_path / "hub").as_uri() + "/{name}/{file}")
    directory = model_module.download_gpt2("gpt2", cache_dir=str(tmp_path / "cache"))
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    model = GPT.from_pretrained(directory)
    assert model.config.n_embd == 8
    sd = read_safetensors(os.path.join(directory, "model.safetensors"))
    assert torch.equal(sd["transformer.wte.weight"], model.transformer.wte.weight)


def test_mfu_uses_nanogpt_flops_formula():
    model = tiny()
    n = model.get_num_params()
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 16 * 32
    assert model.estimate_mfu(1000.0, 1e9, 32) == pytest.approx(model.flops_per_token(32) * 1000 / 1e9)


def test_temperature_zero_is_greedy_decoding():
    model = tiny()
    idx = torch.randint(0, 37, (3, 4))
    out, logprobs = model.generate(idx, 6, temperature=0, return_logprobs=True)
    with torch.no_grad():
        logits, _ = model(out)
    assert torch.equal(out[:, 4:], logits[:, 3:-1].argmax(-1))  # each new token is the most likely one
    assert torch.equal(out, model.generate(idx, 6, greedy=True))
    assert torch.isfinite(logprobs).all()


def test_a_shared_prompt_cache_samples_what_the_prompt_repeated_g_times_does(monkeypatch):
    model = tiny(scalar_head=True)
    idx = torch.randint(0, 36, (3, 6))
    mask = torch.ones_like(idx)
    mask[1, :2] = 0  # a left-padded prompt
    G = 5
    kw = dict(attention_mask=mask, temperature=1.3, eot_token=36, return_logprobs=True, return_values=True)
    inputs, forward = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda x, *a, **k: inputs.append(tuple(x.shape)) or forward(x, *a, **k))
    shared = model.generate(idx, 12, num_samples=G, generator=torch.Generator().manual_seed(7), **kw)
    assert inputs[0] == (3, 6) and inputs[1] == (3 * G, 1)  # the prompts run once, then G rows of one token each
    monkeypatch.undo()
    repeated = model.generate(idx.repeat_interleave(G, 0), 12, generator=torch.Generator().manual_seed(7),
                              **{**kw, "attention_mask": mask.repeat_interleave(G, 0)})
    tokens, logprobs, values = shared
    assert tokens.shape[0] == 3 * G and torch.equal(tokens, repeated[0])  # prompt b's samples: rows b*G .. b*G+G-1
    assert torch.equal(tokens[:, :6], idx.repeat_interleave(G, 0))
    assert torch.allclose(logprobs, repeated[1], atol=1e-5) and torch.allclose(values, repeated[2], atol=1e-5)
    ended_early = (tokens[:, 6:-1] == 36).any(dim=1)
    assert ended_early.any() and not ended_early.all(), "the test needs rows that stop while others go on"
    assert len({tuple(r) for r in tokens[:G, 6:].tolist()}) > 1  # the samples of one prompt differ
    # without a cache there is nothing to share: the prompts are repeated, with the same result
    uncached = model.generate(idx, 12, num_samples=G, generator=torch.Generator().manual_seed(7), use_cache=False,
                              **kw)
    assert torch.equal(uncached[0], tokens) and torch.allclose(uncached[1], logprobs, atol=1e-5)
