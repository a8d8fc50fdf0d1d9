"""
The GPT: one decoder-only Transformer with GPT-2's architecture, written out in full.

    token ids -> token embedding + position embedding -> n_layer x Block -> LayerNorm -> hidden states
    Block:  x = x + attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))      (pre-LN, as in GPT-2)
    hidden states -> lm_head (tied to the token embedding) -> next-token logits at every position
    hidden states -> scalar_head (optional) -> one number per position: a PPO value or a reward

Every later stage imports this file: train_lm.py pretrains it, train_sft.py fine-tunes it, train_rm.py reads a
reward from its scalar head, train_ppo.py and train_grpo.py sample from it with `generate` and train it.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=257))
    logits, loss = model(idx, targets)            # logits: (B, T, vocab) for every position
    out = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=40, eot_token=256)
    out, logp = model.generate(idx, 50, num_samples=8, return_logprobs=True)   # 8 samples per prompt, prefilled once
    gpt2 = GPT.from_pretrained('gpt2')            # or a local Hugging Face directory
"""
import json
import math
import os
import struct
import urllib.request
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: the most tokens the model can see at once
    vocab_size: int = 50257  # GPT-2's BPE; 257 for the byte tokenizer
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has; False is a little faster
    scalar_head: bool = False  # add a Linear(n_embd, 1) on the hidden states: a value or reward head


class Linear(nn.Linear):
    """nn.Linear, except for a float32 product with only a few rows of input on a CPU (one token per sequence while
    generating): that runs as (W x^T)^T. Same numbers; MKL computes x W^T with few rows 2-3x slower than the
    transposed product, and that was most of the time of every generation step. The result is a transposed view,
    which the next layer's (W x^T) reads as it is. In bfloat16 the direct product is as fast (the 50k-wide output
    layer faster, and its logits come out row-major, as the sampler reads them), so it runs as it is."""

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > 32 or autocast_dtype("cpu", default=self.weight.dtype) != torch.float32:
            return super().forward(x)
        y = (self.weight @ x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def autocast_dtype(device_type, default=None):
    """The dtype autocast runs matrix products in on this device right now (bf16 under a bf16 autocast), or
    default when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def attention_dtype(device_type, input_dtype):
    """The dtype attention runs in: autocast's (bf16) on a GPU, as autocast would pick; float32 on a CPU, even under
    autocast, because the CPU's attention kernels run bf16 slower than float32: measured on an AVX512-BF16 EPYC,
    one new token against a 40-160 position cache 3.6-5.9x slower, training (forward and backward) 1.2-1.3x."""
    if device_type == "cpu":
        return torch.float32
    return autocast_dtype(device_type, default=input_dtype)


def rows_contiguous(x, block=8192):
    """x (B, N) made row-major. Linear's few-row product returns it transposed, and a (B, 50k) copy from that
    layout in one go runs 2-5x slower than in column blocks that stay in the cache."""
    if x.is_contiguous():
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for start in range(0, x.size(1), block):
        out[:, start:start + block].copy_(x[:, start:start + block])
    return out


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).contiguous().split(C, dim=2)  # few rows in float32: a transposed view
        # (B, T, C) -> (B, n_head, T, head_size): every head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        out_dtype, work = q.dtype, attention_dtype(x.device.type, q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        if kv_cache is not None:
            # generation: the keys and values of earlier positions were stored when they were computed,
            # so each new token costs one position's worth of work instead of re-running the whole prefix
            k, v = kv_cache.append(layer, k, v)  # stored in the dtype attention reads: never cast whole per step
        # attn_mask None means plain causal attention: is_causal for a full sequence, nothing for one new token
        with torch.autocast(x.device.type, enabled=False):  # the dtype is chosen above
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(out_dtype)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's own GELU ('gelu_new'), needed to match its weights
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        # pre-LN: normalise the input of each sub-layer, keep the residual stream itself un-normalised,
        # so gradients flow straight through the additions from the loss to the embeddings
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of every layer for the positions processed so far, preallocated to a maximum length."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None  # (n_layer, B, n_head, max_len, head_size), allocated on first use
        self.len = 0  # positions stored so far

    def append(self, layer, k, v):
        B, H, T, D = k.shape
        if self.k is None:
            # uninitialised: attention reads only the positions stored so far
            self.k = k.new_empty(self.n_layer, B, H, self.max_len, D)
            self.v = v.new_empty(self.n_layer, B, H, self.max_len, D)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {T} to {self.len}")
        self.k[layer, :, :, self.len:self.len + T] = k
        self.v[layer, :, :, self.len:self.len + T] = v
        end = self.len + T
        if layer == self.n_layer - 1:
            self.len = end  # the last layer has stored this step: the next call starts after it
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index):
        """Beam search: beam i continues from beam index[i], so its past must move with it."""
        self.k, self.v = self.k[:, index], self.v[:, index]

    def repeat(self, n):
        """Each row n times in a row (row b -> rows b*n .. b*n+n-1): n samples continue from one prefilled prompt."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the same matrix maps token -> vector at the input and vector -> token scores at the
        # output; it saves vocab_size x n_embd parameters and works as well or better (Press & Wolf, 2017)
        self.transformer.wte.weight = self.lm_head.weight
        self.scalar_head = nn.Linear(config.n_embd, 1) if config.scalar_head else None

        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection starts smaller, std 0.02/sqrt(2*n_layer), because
        # 2*n_layer branches add into the residual stream and their variances add up
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters; position embeddings excluded by default (token embeddings count: they are the lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------------------
    # forward passes

    def hidden_states(self, idx, attention_mask=None, kv_cache=None):
        """Final-LayerNorm hidden states, (B, T, n_embd).

        attention_mask: (B, past + T), 1 for real tokens and 0 for padding (left padding, as batched generation
        uses). Position ids count real tokens only, so a left-padded prompt gets the same positions as unpadded.
        kv_cache: a KVCache holding `past` earlier positions; idx are the T positions that follow them.
        """
        B, T = idx.shape
        past = kv_cache.len if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.config.block_size})")
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=idx.device).unsqueeze(0)
            attn_mask = None if past == 0 or T == 1 else _causal_mask(attention_mask, T, past, idx.device)
        else:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            attn_mask = _causal_mask(attention_mask, T, past, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, i)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None):
        """Logits for every position, (B, T, vocab); and the mean cross-entropy where targets != -1."""
        logits = self.lm_head(self.hidden_states(idx, attention_mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def token_logprobs(self, hidden, targets):
        """log softmax(lm_head(hidden))[target] for each position: hidden (..., n_embd), targets (...) -> (...).

        The same numbers as F.log_softmax(self.lm_head(hidden), -1).gather(-1, targets), without ever holding the
        (positions, vocab) log-softmax: see TokenLogprobs. PPO needs log pi(a|s) of one token per position, and at
        a 50k vocabulary the full log-softmax and its gradient cost as much as the rest of the step."""
        out = TokenLogprobs.apply(hidden.reshape(-1, hidden.size(-1)), self.lm_head.weight, targets.reshape(-1))
        return out.view(targets.shape)

    def scalar(self, hidden):
        """The scalar head: one number per position, (B, T). A value V(s_t) in PPO, a reward in train_rm.py."""
        if self.scalar_head is None:
            raise ValueError("this model has no scalar head; build it with GPTConfig(scalar_head=True)")
        return self.scalar_head(hidden).squeeze(-1)

    # ------------------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
                 greedy=False, num_beams=1, eot_token=None, crop_prompt=False, use_cache=True, generator=None,
                 return_logprobs=False, return_values=False, num_samples=1):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        Rows may be left-padded: attention_mask (B, T) marks real tokens with 1. A row stops at eot_token and
        is filled with eot_token afterwards; the loop ends when every row has stopped, after max_new_tokens, or
        when the context (block_size) is full. Returns (B, T + n) token ids; with return_logprobs also (B, n)
        log-probabilities of the chosen tokens under the distribution they were drawn from (after temperature,
        top-k and top-p; 0 after a row stopped), which PPO stores as log pi_old; with return_values also (B, n)
        the scalar head's value of the state each token was chosen in (0 after a row stopped), PPO's V(s_t).

        num_samples = G > 1 continues each prompt G times: the outputs have B * G rows, prompt b's samples in rows
        b*G .. b*G+G-1, exactly as if idx.repeat_interleave(G, 0) had been passed (same tokens for the same
        generator). The prompts are run once and their KV cache copied G times (GRPO's group of samples).
        """
        if num_samples > 1 and (not use_cache or num_beams > 1):  # no cache to share: repeat the prompts
            idx = idx.repeat_interleave(num_samples, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
            num_samples = 1
        G = num_samples
        B, T = idx.shape
        greedy = greedy or temperature == 0  # the limit of T -> 0: all the probability on the largest logit
        block_size = self.config.block_size
        if T >= block_size:
            if not crop_prompt:
                raise ValueError(f"prompt has {T} tokens but the model's context is {block_size} tokens and must "
                                 f"leave room for new ones; shorten it or pass crop_prompt=True")
            keep = max(1, block_size - max_new_tokens)  # the most recent tokens, leaving room to generate
            idx = idx[:, -keep:]
            attention_mask = attention_mask[:, -keep:] if attention_mask is not None else None
            T = keep
        max_new_tokens = min(max_new_tokens, block_size - T)  # never run past the context
        if num_beams > 1:
            if return_logprobs or return_values:
                raise ValueError("return_logprobs and return_values are not available with beam search")
            return self._beam_search(idx, max_new_tokens, num_beams, attention_mask, eot_token)

        cache = KVCache(self.config.n_layer, T + max_new_tokens) if use_cache else None
        mask = attention_mask
        new_tokens = idx.new_full((B * G, max_new_tokens), eot_token if eot_token is not None else 0)
        logprobs = torch.zeros(B * G, max_new_tokens, device=idx.device)
        values = torch.zeros(B * G, max_new_tokens, device=idx.device)
        rows = torch.arange(B * G, device=idx.device)  # the rows still being computed
        done = torch.zeros(B * G, dtype=torch.bool, device=idx.device)
        next_input, n = idx, 0
        for n in range(1, max_new_tokens + 1):
            if use_cache:
                h = self.hidden_states(next_input, mask, cache)[:, -1]  # first call: the prompt; then one token
                if n == 1 and G > 1:  # the prompts' keys, values and last state, once per sample from here on
                    h = h.repeat_interleave(G, dim=0)
                    mask = mask.repeat_interleave(G, dim=0) if mask is not None else None
                    cache.repeat(G)
            else:
                h = self.hidden_states(torch.cat([idx, new_tokens[:, :n - 1]], dim=1), mask)[:, -1]  # whole prefix
            # the temperature: lm_head(h) / T = lm_head(h / T), and h is 130x smaller than GPT-2's logits
            scaled = h / temperature if not greedy and temperature != 1 else h
            logits = rows_contiguous(self.lm_head(scaled).float())  # one row per sequence, as the sampler reads it
            token, logprob = sample_next_token(logits, top_k, top_p, greedy, generator)
            if eot_token is not None:
                token = torch.where(done, eot_token, token)
                logprob = torch.where(done, 0.0, logprob)
            new_tokens[rows, n - 1] = token
            logprobs[rows, n - 1] = logprob
            if return_values:
                values[rows, n - 1] = torch.where(done, 0.0, self.scalar(h).float())
            if eot_token is not None:
                done = done | (token == eot_token)
                if done.all():
                    break
                if use_cache and done.sum() * 4 >= len(done):
                    # a quarter of the rows have ended: stop computing them (their outputs stay end-of-text)
                    keep = (~done).nonzero().squeeze(1)
                    rows, done, token = rows[keep], done[keep], token[keep]
                    mask = mask[keep] if mask is not None else None
                    cache.reorder(keep)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            next_input = token[:, None]
        tokens = torch.cat([idx.repeat_interleave(G, dim=0), new_tokens[:, :n]], dim=1)
        extras = []
        if return_logprobs:
            extras.append(logprobs[:, :n])
        if return_values:
            extras.append(values[:, :n])
        return (tokens, *extras) if extras else tokens

    def _beam_search(self, idx, max_new_tokens, num_beams, attention_mask, eot_token):
        """Keep the num_beams highest-scoring continuations (score = sum of token log-probs); return the best."""
        B, T = idx.shape
        K = num_beams
        if K > self.config.vocab_size:
            raise ValueError(f"num_beams={K} is larger than the vocabulary ({self.config.vocab_size})")
        seqs = idx.repeat_interleave(K, dim=0)  # (B*K, T): beam k of row b is row b*K + k
        mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None
        scores = torch.full((B, K), float("-inf"), device=idx.device)
        scores[:, 0] = 0.0  # all beams start equal: let only the first one expand, so no duplicates are kept
        done = torch.zeros(B * K, dtype=torch.bool, device=idx.device)
        cache = KVCache(self.config.n_layer, T + max_new_tokens)
        next_input = seqs
        for _ in range(max_new_tokens):
            logp = F.log_softmax(self.lm_head(self.hidden_states(next_input, mask, cache)[:, -1]).float(), dim=-1)
            if eot_token is not None:  # a finished beam can only continue with eot, at no cost
                logp[done] = float("-inf")
                logp[done, eot_token] = 0.0
            V = logp.size(-1)
            candidates = (scores.view(B * K, 1) + logp).view(B, K * V)
            scores, flat = candidates.topk(K, dim=-1)  # (B, K)
            parent = flat // V + torch.arange(B, device=idx.device)[:, None] * K  # row in the (B*K) layout
            token = (flat % V).view(-1)
            parent = parent.view(-1)
            cache.reorder(parent)
            seqs = torch.cat([seqs[parent], token[:, None]], dim=1)
            done = done[parent]
            if eot_token is not None:
                done = done | (token == eot_token)
            if mask is not None:
                mask = torch.cat([mask[parent], mask.new_ones(B * K, 1)], dim=1)
            if done.all():
                break
            next_input = token[:, None]
        best = scores.argmax(dim=-1) + torch.arange(B, device=idx.device) * K
        return seqs[best]

    # ------------------------------------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (Linear weights, embeddings) but not the biases, LayerNorm gains or the scalar head
        # bias: shrinking a gain or an offset towards 0 has no regularising meaning
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: the whole update in one pass over the parameters instead of a loop of small ops (6x faster on a CPU)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cpu", "cuda"))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, forward + backward (PaLM paper, appendix B): 6N + 12 * L * H * Q * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the hardware's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    def crop_block_size(self, block_size):
        """Use a shorter context than the weights were trained for (e.g. GPT-2's 1024 -> 256): keep the first
        block_size position embeddings."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    # ------------------------------------------------------------------------------------------------------
    # GPT-2 weights

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0, scalar_head=False):
        """GPT-2 weights from a local Hugging Face directory (config.json + model.safetensors or
        pytorch_model.bin) or, online, by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        directory = name_or_dir if os.path.isdir(name_or_dir) else download_gpt2(name_or_dir)
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{directory}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True,
                           scalar_head=scalar_head)
        model = cls(config)
        theirs = load_hf_state_dict(directory)
        ours = model.state_dict()
        # Hugging Face's GPT-2 uses Conv1D layers, whose weights are stored transposed relative to nn.Linear
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key in ours:
            if key.startswith("scalar_head") or key == "lm_head.weight":
                continue  # the head is tied to wte; a scalar head starts fresh
            if key not in theirs:
                raise ValueError(f"{directory}: weights have no {key!r}; is this a GPT-2 checkpoint?")
            w = theirs[key].t() if key.endswith(transposed) else theirs[key]
            if w.shape != ours[key].shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(w.shape)}, expected {tuple(ours[key].shape)}")
            with torch.no_grad():
                ours[key].copy_(w)
        return model


class TokenLogprobs(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) with logits = hidden @ weight^T, one slice of the
    vocabulary at a time. Each slice keeps e^(logit - m), m its row maximum, so the logsumexp of the whole row is
    log(sum over slices of e^m * sum(e^(logit - m))), and the backward turns the same numbers into the gradient
    d log p / d logit = onehot - softmax, softmax = e^(logit - m) * e^(m - logsumexp).
    The products run in autocast's dtype where autocast is on (bfloat16: the precision generation sampled the
    tokens with, 2-3x float32's speed on a CPU that computes it natively), in float32 otherwise; the exponentials,
    sums and gradients are float32 either way. A slice (positions x columns) stays under ~24 MB, which the
    allocator reuses step after step."""

    slice_elements = 6 << 20  # floats in one slice of logits: 24 MB

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        product_dtype = autocast_dtype(device, default=torch.float32)
        with torch.autocast(device, enabled=False):  # the products' dtype is chosen here, not per operation
            return TokenLogprobs._forward(ctx, hidden, weight, targets, product_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, product_dtype):
        h, w = hidden.to(product_dtype), weight.to(product_dtype)
        cols = max(1, TokenLogprobs.slice_elements // max(1, h.size(0)))
        exps, maxima, sums = [], [], []
        for start in range(0, w.size(0), cols):
            logits = (h @ w[start:start + cols].t()).float()  # float32 already: the same tensor, no copy
            m = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(m).exp_()  # in place: the slice's logits are not needed again
            exps.append(exp)
            maxima.append(m)
            sums.append(exp.sum(dim=-1, keepdim=True))
        maxima, sums = torch.cat(maxima, dim=1), torch.cat(sums, dim=1)  # (positions, slices)
        top = maxima.amax(dim=1, keepdim=True)
        logsumexp = top + (sums * (maxima - top).exp()).sum(dim=1, keepdim=True).log()
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(h, w, targets)
            ctx.cols, ctx.exps, ctx.dtypes = cols, exps, (hidden.dtype, weight.dtype)
            ctx.slice_scale = (maxima - logsumexp).exp()  # e^(m - logsumexp) per position and slice
        # the logit of the target: a dot product with its row
        return (h.float() * w[targets].float()).sum(-1) - logsumexp.squeeze(1)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, targets = ctx.saved_tensors
        g = grad_out.float()
        low = h.dtype != torch.float32  # bf16 products: each slice's softmax is rounded to it first
        # the logit[target] term: d/dh = weight[target], d/dweight[target] = h
        grad_h = g[:, None] * w[targets].float()
        grad_w = torch.empty(w.shape, dtype=torch.float32, device=w.device)  # every row is written below
        # the -logsumexp term: d/dlogits = -softmax, slice by slice (the stored slices are overwritten in place)
        for i, (exp, start) in enumerate(zip(ctx.exps, range(0, w.size(0), ctx.cols))):
            minus_softmax = exp.mul_(ctx.slice_scale[:, i:i + 1] * -g[:, None])
            rows = w[start:start + ctx.cols]
            if low:
                minus_softmax = minus_softmax.to(h.dtype)
                grad_h += minus_softmax @ rows
                grad_w[start:start + ctx.cols] = minus_softmax.t() @ h
            else:
                grad_h.addmm_(minus_softmax, rows)
                torch.mm(minus_softmax.t(), h, out=grad_w[start:start + ctx.cols])
        ctx.exps = None
        grad_w.index_add_(0, targets, g[:, None] * h.float())
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None


def _causal_mask(attention_mask, T, past, device):
    """Boolean (B or 1, 1, T, past + T) mask: query t may attend to key s if s <= past + t and s is not padding."""
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None, :]
    allowed = (k <= q)[None, None]
    if attention_mask is not None:
        # a padding query would see no key at all and SDPA would return NaN; let it see itself (its output
        # is never used, and a real token never attends to padding)
        allowed = allowed & (attention_mask.bool()[:, None, None, :] | (k == q)[None, None])
    return allowed


# ----------------------------------------------------------------------------------------------------------
# sampling: each step turns the last position's logits into one token per row

def top_k_filter(logits, k):
    """Keep the k highest logits of each row, set the rest to -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probabilities
    sum to at least p. A token is kept if the tokens more likely than it sum to less than p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits, top_k=None, top_p=None, greedy=False, generator=None):
    """One token per row of logits (B, V), already divided by the temperature, and its log-probability under the
    distribution it was drawn from."""
    if greedy:
        logp = F.log_softmax(logits, dim=-1)
        token = logp.argmax(dim=-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    # inverse-transform sampling: one uniform number per row, located in the cumulative distribution. It is exact,
    # and at a 50k vocabulary much cheaper on a CPU than torch.multinomial or one random number per token.
    # The distribution is left unnormalised (exp(logit - max)); its total is the normaliser of the log-prob.
    top = logits.amax(dim=-1, keepdim=True)
    cdf = (logits - top).exp_().cumsum_(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(logits.size(0), 1, device=logits.device, generator=generator) * total
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.size(-1) - 1)
    logprob = logits.gather(-1, token) - top - total.log()  # log softmax(logits)[token]
    return token.squeeze(-1), logprob.squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# GPT-2 weights in the Hugging Face layout

HF_URL = "https://huggingface.co/{name}/resolve/main/{file}"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def download_gpt2(name, cache_dir=None):
    """Download config.json and model.safetensors of a GPT-2 model once; return the local directory."""
    if name not in GPT2_NAMES:
        raise ValueError(f"{name!r} is neither a directory nor a GPT-2 model name ({', '.join(GPT2_NAMES)})")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-weights")
    directory = os.path.join(cache_dir, name)
    os.makedirs(directory, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        path = os.path.join(directory, file)
        if os.path.exists(path):
            continue
        url = HF_URL.format(name=name, file=file)
        print(f"downloading {url}")
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:
            raise RuntimeError(f"could not download {url} ({e}); without internet, pass a local directory "
                               f"holding config.json and model.safetensors or pytorch_model.bin") from None
        os.replace(path + ".part", path)  # a half-finished download never looks complete
    return directory


def load_hf_state_dict(directory):
    """A Hugging Face GPT-2 state dict with keys as ours ('transformer.h.0.attn.c_attn.weight', ...)."""
    st, pt = os.path.join(directory, "model.safetensors"), os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st):
        sd = read_safetensors(st)
    elif os.path.exists(pt):
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
    # GPT2LMHeadModel prefixes 'transformer.', a bare GPT2Model does not
    return {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The safetensors format is an 8-byte header length, a JSON header naming each tensor's dtype, shape and
    byte range, then the raw bytes. Reading it needs no code execution, so it is safe for untrusted files."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def config_from_dict(d):
    """GPTConfig from a checkpoint's model_args, rejecting keys this version does not know."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"checkpoint model_args has unknown keys {sorted(unknown)}")
    return GPTConfig(**d)
