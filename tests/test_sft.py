"""train_sft.py: the loss is on response tokens only, padding changes nothing, the three data formats, dropped
examples, an end-to-end run from a tiny pretrained model with exact resume, clear errors, and sample.py --chat."""
import io
import os

import pytest
import torch
from torch.nn import functional as F

import sample
import train_lm
import train_sft
from common import UserError, format_prompt, load_checkpoint, read_jsonl_records, read_sft_examples
from conftest import write_jsonl, write_token_dataset
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

TINY_LM = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=128", "--batch_size=8", "--eval_iters=2",
           "--log_interval=10", "--device=cpu", "--sample_at_end=False", "--peak_tflops=1.0", "--warmup_iters=5",
           "--learning_rate=3e-3"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def tiny_function(k):
    """A prompt (def line + docstring) and its body, like data/pycode's examples but tiny."""
    n = k % 8 + 1
    if k % 2:
        return f'def add_{WORDS[n - 1]}(x):\n    """Return x plus {n}."""\n', f"    return x + {n}\n"
    return f'def times_{WORDS[n - 1]}(x):\n    """Return x times {n}."""\n', f"    return x * {n}\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny byte-level LM pretrained on code like the SFT data, and SFT train/val/eval files."""
    root = tmp_path_factory.mktemp("sft")
    text = "".join(p + r + "\n" for p, r in map(tiny_function, range(16))) * 60
    data = write_token_dataset(root / "data", text=text)
    train_lm.main(TINY_LM + [f"--dataset={data}", f"--out_dir={root / 'lm'}", "--max_iters=40",
                             "--eval_interval=40"])
    train = [{"prompt": p, "response": r} for p, r in map(tiny_function, range(48))]
    train.append({"prompt": "def too_long(x):\n" + "    # no room\n" * 10, "response": "    return x\n"})
    files = {
        "lm": str(root / "lm"),
        "train": write_jsonl(root / "train.jsonl", train),
        "val": write_jsonl(root / "val.jsonl", [{"prompt": p, "response": r}
                                                 for p, r in map(tiny_function, range(100, 108))]),
        "eval": write_jsonl(root / "eval.jsonl", [{"prompt": p, "reference": r}
                                                   for p, r in map(tiny_function, range(200, 206))]),
    }
    return root, files


def sft_args(files, out_dir, *extra):
    return ["--device=cpu", f"--init_from={files['lm']}", f"--out_dir={out_dir}", f"--train_file={files['train']}",
            f"--val_file={files['val']}", f"--eval_prompts={files['eval']}", "--batch_size=8", "--log_interval=1",
            "--max_new_tokens=24", "--learning_rate=3e-3", "--warmup_iters=2", *extra]


def train_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in read_jsonl_records(os.path.join(out_dir, "metrics.jsonl"))
            if "train_loss" in r}


# --------------------------------------------------------------------------------------------------------------
# the batch and the loss

EXAMPLES = [([5, 6, 7], [8, 9, 256]), ([1, 2, 3, 4, 5, 6], [7, 256]), ([9], [10, 11, 12, 13, 256])]


def tiny_model():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=257)).eval()


def test_targets_are_minus_one_exactly_on_prompt_and_padding():
    x, y = train_sft.sft_batch(EXAMPLES, pad_id=256)
    assert x.shape == y.shape == (3, 7)  # the longest example has 8 tokens
    for i, (p, r) in enumerate(EXAMPLES):
        seq = p + r
        assert x[i, :len(seq) - 1].tolist() == seq[:-1]
        for t in range(7):  # y[t] is the token at position t + 1 of the example
            is_response = len(p) <= t + 1 < len(seq)
            assert y[i, t].item() == (seq[t + 1] if is_response else -1), (i, t)


def test_the_loss_is_the_mean_negative_log_likelihood_of_response_tokens_only():
    model = tiny_model()
    captured = {}
    model.lm_head.register_forward_hook(lambda m, inp, out: captured.update(logits=out) or out.retain_grad())
    x, y = train_sft.sft_batch(EXAMPLES, pad_id=256)
    _, loss = model(x, y)
    # by hand, from the logits and the examples themselves (not from y)
    logp = F.log_softmax(captured["logits"].detach(), dim=-1)
    nll = [-logp[i, t, (p + r)[t + 1]] for i, (p, r) in enumerate(EXAMPLES) for t in range(len(p) - 1, len(p + r) - 1)]
    assert loss.item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-6)
    # the prompt and the padding get no gradient at the output: they only act as context for the response
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)
    assert torch.equal(grad != 0, y != -1)
    s, n = train_sft.response_loss_sum(model, x, y)
    assert n == sum(len(r) for _, r in EXAMPLES) and (s / n).item() == pytest.approx(loss.item(), abs=1e-6)


def test_padding_never_changes_the_loss_of_other_rows():
    model = tiny_model()
    _, batch_loss = model(*train_sft.sft_batch(EXAMPLES, pad_id=0))
    alone = [model(*train_sft.sft_batch([ex], pad_id=0))[1].item() for ex in EXAMPLES]  # no padding at all
    counts = [len(r) for _, r in EXAMPLES]
    weighted = sum(l * n for l, n in zip(alone, counts)) / sum(counts)
    assert batch_loss.item() == pytest.approx(weighted, abs=1e-5)
    _, other_pad = model(*train_sft.sft_batch(EXAMPLES, pad_id=123))  # the pad id is never seen
    assert other_pad.item() == pytest.approx(batch_loss.item(), abs=1e-6)


def test_changing_the_prompt_changes_the_loss_only_through_the_context():
    model = tiny_model()
    base = [([5, 6, 7], [8, 9, 256])]
    changed = [([5, 6, 42], [8, 9, 256])]  # another last prompt token: the context of the response changes
    same_len = [([77, 6, 7], [8, 9, 256])]
    x, y = train_sft.sft_batch(base, 0)
    for other in (changed, same_len):
        xo, yo = train_sft.sft_batch(other, 0)
        assert torch.equal(y, yo)  # the targets are the same: only the response is predicted
    assert model(x, y)[1].item() != model(*train_sft.sft_batch(changed, 0))[1].item()


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    n, bs = 10, 4
    seen = [i for step in range(5) for i in train_sft.batch_indices(7, step, bs, n)]  # 2 epochs exactly
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
    assert seen[:n] != seen[n:]  # a new order every epoch
    train_sft.epoch_order.cache_clear()
    assert train_sft.batch_indices(7, 3, bs, n) == seen[12:16]
    assert train_sft.batch_indices(8, 0, bs, n) != seen[:4]


# --------------------------------------------------------------------------------------------------------------
# reading data (the readers are in common.py)

def test_every_reader_format_is_accepted_and_the_template_applied(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "def f():\n", "response": "    return 1\n"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
        {"user_input": "What is 2+2?", "completion": "4"},
    ])
    examples = read_sft_examples(path)
    assert examples == [("def f():\n", "    return 1\n"), ("Add the numbers.\n\n2 and 3", "5"), ("Say hi.", "hi"),
                        ("Say bye.", "bye"), ("What is 2+2?", "4")]
    tok = get_tokenizer("byte")
    encoded, dropped = train_sft.encode_examples(tok, examples, "instruction", 256)
    assert dropped == 0
    assert tok.decode(encoded[1][0]) == "### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n"
    assert encoded[1][1] == tok.encode("5") + [tok.eot_token]  # the response ends in end-of-text
    none, _ = train_sft.encode_examples(tok, examples, "none", 256)
    assert tok.decode(none[0][0]) == "def f():\n"
    assert format_prompt("Say hi.", "instruction") == tok.decode(encoded[2][0])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "def f():\\n", "response": ', "not valid JSON"),
    ('{"prompt": "def f():\\n"}', "missing text field 'response'"),
    ('{"instruction": "Do it."}', "missing text field 'output'"),
    ('{"user_input": "hi", "completion": "  "}', "field 'completion' is empty"),
    ('{"prompt": "def f():\\n", "response": ""}', "field 'response' is empty"),
    ('["a list"]', "expected a JSON object"),
])
def test_a_malformed_line_is_rejected_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(UserError, match=rf"bad\.jsonl:2: .*{message}"):
        read_sft_examples(path)


def test_examples_longer_than_the_context_are_dropped_and_counted_never_truncated():
    tok = get_tokenizer("byte")
    examples = [("abc", "def"), ("a" * 15, "b" * 5), ("abcdefghij", "x")]  # 3+4, 15+6, 10+2 tokens
    encoded, dropped = train_sft.encode_examples(tok, examples, "none", 20)
    assert dropped == 1
    assert [(tok.decode(p), tok.decode(r)) for p, r in encoded] == [("abc", "def<|endoftext|>"),
                                                                    ("abcdefghij", "x<|endoftext|>")]


# --------------------------------------------------------------------------------------------------------------
# end to end

def test_training_lowers_the_response_loss_and_writes_checkpoint_metrics_and_plot(tiny, capsys):
    root, files = tiny
    out = root / "run"
    result = train_sft.main(sft_args(files, out, "--max_iters=30", "--eval_interval=15"))
    printed = capsys.readouterr().out
    assert "48 examples, 1 longer than the context (128 tokens) dropped" in printed
    assert "completing 6 prompts greedily" in printed and "---------- completion" in printed
    for name in ("ckpt.pt", "metrics.jsonl", "sft.png"):
        assert (out / name).exists()
    before, after = result["before"], result["after"]
    assert after["val_loss"] < before["val_loss"] - 0.3
    records = read_jsonl_records(str(out / "metrics.jsonl"))
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30]
    assert all(0 <= r["solved"] <= 1 and 0 <= r["parses"] <= 1 and 0 <= r["template"] <= 1 for r in evals)
    assert "pass@8" in evals[-1] and "pass@8" not in evals[0]  # sampled completions at the last evaluation only
    ckpt = load_checkpoint(str(out))
    assert ckpt["stage"] == "sft" and ckpt["iter_num"] == 30 and ckpt["template"] == "none"
    assert ckpt["tokenizer"] == load_checkpoint(files["lm"])["tokenizer"] == "byte"
    assert ckpt["before"]["val_loss"] == pytest.approx(before["val_loss"])
    assert ckpt["config"]["init_from"] == files["lm"]


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tiny):
    root, files = tiny
    common = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", "--eval_max_prompts=2"]  # dropout: RNG
    train_sft.main(sft_args(files, root / "straight", "--max_iters=8", *common))
    train_sft.main(sft_args(files, root / "split", "--max_iters=4", *common))
    result = train_sft.main(sft_args(files, root / "split", "--max_iters=8", "--init_from=resume", *common))
    straight, split = train_losses(root / "straight"), train_losses(root / "split")
    assert sorted(split) == list(range(1, 9))
    assert [split[i] for i in range(1, 9)] == [straight[i] for i in range(1, 9)]
    a, b = load_checkpoint(str(root / "straight")), load_checkpoint(str(root / "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert result["before"] == a["before"] and result["after"] == a["eval"]


def test_resume_with_another_template_is_an_error(tiny):
    root, files = tiny
    train_sft.main(sft_args(files, root / "t", "--max_iters=1", "--eval_max_prompts=1"))
    with pytest.raises(UserError, match="trained with template='none'"):
        train_sft.main(sft_args(files, root / "t", "--max_iters=2", "--init_from=resume", "--template=instruction"))


def test_resuming_a_pretraining_checkpoint_as_sft_is_refused_and_leaves_it_alone(tiny):
    _, files = tiny
    before = open(os.path.join(files["lm"], "ckpt.pt"), "rb").read()
    with pytest.raises(UserError, match=r"ckpt.pt is a 'lm' checkpoint, not a fine-tuning run's; use another out_dir"):
        train_sft.main(sft_args(files, files["lm"], "--max_iters=2", "--init_from=resume"))
    assert open(os.path.join(files["lm"], "ckpt.pt"), "rb").read() == before


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny):
    root, files = tiny
    quick = ["--eval_max_prompts=1", "--eval_samples=0", "--max_new_tokens=4"]
    train_sft.main(sft_args(files, root / "diverge", "--max_iters=2", "--eval_interval=2", *quick))
    good = (root / "diverge" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match=r"nan or inf at step \d; learning_rate=1e\+30 is most likely too high"):
        train_sft.main(sft_args(files, root / "diverge", "--max_iters=6", "--eval_interval=2", "--init_from=resume",
                                "--learning_rate=1e30", *quick))
    assert (root / "diverge" / "ckpt.pt").read_bytes() == good


def test_a_missing_init_checkpoint_names_the_command_that_makes_it(tiny, tmp_path):
    _, files = tiny
    with pytest.raises(UserError, match=r"no checkpoint at .*nowhere.*`python train_lm.py config/lm_small.py`"):
        train_sft.main(sft_args(files, tmp_path / "o", f"--init_from={tmp_path / 'nowhere'}"))
    with pytest.raises(UserError, match="train_lm.py config/lm_small.py"):
        train_sft.main(sft_args(files, tmp_path / "o", "--init_from=scratch"))


def test_the_init_checkpoints_tokenizer_is_recorded_and_reused(tiny, tmp_path):
    _, files = tiny
    data = write_token_dataset(tmp_path / "bpe", tokenizer="gpt2")
    train_lm.main(TINY_LM + [f"--dataset={data}", f"--out_dir={tmp_path / 'lm'}", "--max_iters=1",
                             "--eval_interval=1", "--block_size=64"])
    files = dict(files, lm=str(tmp_path / "lm"))
    train_sft.main(sft_args(files, tmp_path / "sft", "--max_iters=1", "--eval_max_prompts=2",
                            "--max_new_tokens=4", "--eval_batch_size=2"))
    assert load_checkpoint(str(tmp_path / "sft"))["tokenizer"] == "gpt2"


# --------------------------------------------------------------------------------------------------------------
# sample.py --chat

@pytest.fixture(scope="module")
def chat_checkpoint(tiny):
    root, files = tiny
    train_sft.main(sft_args(files, root / "chat", "--max_iters=2", "--template=instruction", "--eval_max_prompts=1"))
    return str(root / "chat")


def chat(monkeypatch, out_dir, typed):
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    return sample.main([f"--out_dir={out_dir}", "--chat=True", "--greedy=True", "--max_new_tokens=12",
                        "--device=cpu"])


def test_chat_wraps_each_line_in_the_checkpoints_template_and_ends_at_eof(monkeypatch, capsys, chat_checkpoint):
    exchanges = chat(monkeypatch, chat_checkpoint, "add two numbers\nmultiply them")  # EOF, no final newline
    out = capsys.readouterr().out
    assert "template 'instruction'" in out
    assert [p for p, _ in exchanges] == [format_prompt("add two numbers", "instruction"),
                                         format_prompt("multiply them", "instruction")]
    assert all(isinstance(r, str) and "<|endoftext|>" not in r for _, r in exchanges)
    assert all(r in out for _, r in exchanges)


def test_chat_ends_at_an_empty_line(monkeypatch, chat_checkpoint):
    assert len(chat(monkeypatch, chat_checkpoint, "first\n\nnever read\n")) == 1


def test_chat_without_a_template_uses_the_line_as_it_is(monkeypatch, capsys, tiny):
    root, files = tiny
    train_sft.main(sft_args(files, root / "plain", "--max_iters=1", "--eval_max_prompts=1"))
    capsys.readouterr()
    exchanges = chat(monkeypatch, root / "plain", 'def add_two(x):\\n    """Return x plus 2."""\\n\n')
    assert "template 'none'" in capsys.readouterr().out
    assert exchanges[0][0] == 'def add_two(x):\n    """Return x plus 2."""\n'
