"""data/imdb, data/hh_rlhf and data/alpaca: each prepare.py offline on small files written here in exactly the
upstream formats (the aclImdb_v1.tar.gz archive, HH-RLHF's <subset>/<split>.jsonl.gz, alpaca_data.json); clear
errors offline and on bad files; their task modules; SFT on Alpaca measured by its loss alone; and the GPT-2 IMDB
recipe (config/*_imdb_gpt2.py) end to end on the CPU, from a tiny GPT-2 in Hugging Face's layout."""
import gzip
import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

import tasks
import train_dpo
import train_lm
import train_ppo
import train_rm
import train_sft
from common import load_checkpoint, read_jsonl_records, read_preference_pairs, read_scored_examples, \
    read_sft_examples, save_checkpoint, UserError
from conftest import ROOT
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

OFFLINE = "http://127.0.0.1:9/nothing-listens-here"  # a refused connection: what a machine without internet gets


def load_prepare(name):
    spec = importlib.util.spec_from_file_location(f"{name}_prepare", os.path.join(ROOT, "data", name, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# --------------------------------------------------------------------------------------------------------------
# IMDB: aclImdb_v1.tar.gz

GOOD = ["a great film, wonderful acting and a story I loved", "wonderful, moving, great music; I loved every minute"]
BAD = ["an awful film, boring acting and a story I hated", "boring, awful, dull music; I hated every minute of it"]


def review(words, k):
    """A review longer than 200 characters (prompts come from those), with the archive's HTML line breaks."""
    return f"Review {k}: " + f"{words[k % 2]}.<br /><br />" + " ".join([words[(k + 1) % 2]] * 4)


def write_imdb_archive(path, n=6):
    """aclImdb_v1.tar.gz's layout: aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, train/unsup/<id>_0.txt, and
    the files beside them (imdb.vocab, README, urls_pos.txt) that are not reviews."""
    files = {"aclImdb/README": "Large Movie Review Dataset v1.0", "aclImdb/imdb.vocab": "the\nand\n",
             "aclImdb/train/urls_pos.txt": "http://www.imdb.com/title/tt0000001/usercomments\n"}
    for split in ("train", "test"):
        for k in range(n):
            files[f"aclImdb/{split}/pos/{k}_{7 + k % 4}.txt"] = review(GOOD, k)
            files[f"aclImdb/{split}/neg/{k}_{1 + k % 4}.txt"] = review(BAD, k)
    for k in range(3):
        files[f"aclImdb/train/unsup/{k}_0.txt"] = f"An unlabelled review {k}, neither here nor there."
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def imdb_archive(tmp_path_factory):
    return write_imdb_archive(tmp_path_factory.mktemp("imdb_src") / "aclImdb_v1.tar.gz")


def test_imdb_prepare_writes_pretraining_text_labelled_reviews_and_prompts_from_the_archive(imdb_archive, tmp_path):
    out = tmp_path / "imdb"
    meta = load_prepare("imdb").main([f"--from_file={imdb_archive}", f"--out_dir={out}", "--tokenizer=byte",
                                      "--eval_prompts=4", "--rm_val=4"])
    assert meta["reviews"] == {"test/neg": 6, "test/pos": 6, "train/neg": 6, "train/pos": 6, "train/unsup": 3}
    tok = get_tokenizer("byte")
    train_text = tok.decode(np.fromfile(out / "train.bin", dtype=np.uint16).tolist())
    assert train_text.count("<|endoftext|>") == 15 and "<br />" not in train_text and "\n\n" in train_text
    assert "An unlabelled review 1" in train_text and "Review 0: a great film" in train_text
    val_text = tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist())
    assert val_text.count("<|endoftext|>") == 12 and "unlabelled" not in val_text
    rm_train = read_scored_examples(str(out / "rm_train.jsonl"))
    assert len(rm_train) == 12 and sorted({s for _, _, s in rm_train}) == [0.0, 1.0]
    for prompt, rest, score in rm_train:  # the opening words and the rest add up to the whole (cleaned) review
        assert 2 <= len(prompt.split()) <= 8 and (prompt + rest) in train_text
        assert ("great" in prompt + rest and "loved" in (prompt + rest).split(".")[0]) == (score == 1.0)
    rm_val = lines(out / "rm_val.jsonl")
    assert sorted(r["score"] for r in rm_val) == [0.0, 0.0, 1.0, 1.0]  # balanced, from the test split
    prompts, held_out = lines(out / "prompts_train.jsonl"), lines(out / "prompts_eval.jsonl")
    assert len(prompts) == 12 and len(held_out) == 4
    assert all(2 <= len(p["prompt"].split()) <= 8 and p["prompt"].startswith("Review") for p in prompts + held_out)
    assert json.load(open(out / "meta.json"))["tokenizer"] == "byte"


def test_imdb_prepare_reads_the_unpacked_folder_alike_and_says_what_to_do_offline(imdb_archive, tmp_path,
                                                                                   monkeypatch):
    with tarfile.open(imdb_archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    prepare = load_prepare("imdb")
    prepare.main([f"--from_file={imdb_archive}", f"--out_dir={tmp_path / 'a'}", "--tokenizer=byte"])
    prepare.main([f"--from_dir={tmp_path / 'unpacked'}", f"--out_dir={tmp_path / 'b'}", "--tokenizer=byte"])
    for name in ("train.bin", "val.bin", "rm_train.jsonl", "rm_val.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    monkeypatch.setattr(prepare, "HERE", str(tmp_path / "no_copy_here"))  # where the download would go
    with pytest.raises(UserError, match=r"cannot download .*; with no internet, fetch aclImdb_v1.tar.gz elsewhere and "
                                        r"run `python data/imdb/prepare.py --from_file=<it>`"):
        prepare.main([f"--url={OFFLINE}", f"--out_dir={tmp_path / 'c'}"])
    (tmp_path / "broken.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(UserError, match="is not a readable tar archive"):
        prepare.main([f"--from_file={tmp_path / 'broken.tar.gz'}", f"--out_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"no reviews .* in"):
        prepare.main([f"--from_dir={tmp_path}", f"--out_dir={tmp_path / 'e'}"])


# --------------------------------------------------------------------------------------------------------------
# HH-RLHF: <subset>/{train,test}.jsonl.gz

def dialogue(question, answer, earlier=""):
    return f"{earlier}\n\nHuman: {question}\n\nAssistant: {answer}"


def write_hh(root, subset, split, pairs):
    path = root / subset / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for chosen, rejected in pairs:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")


@pytest.fixture(scope="module")
def hh_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hh")
    earlier = dialogue("Hi there", "Hello! How can I help?")
    for subset in ("helpful-base", "harmless-base"):
        for split, n in (("train", 4), ("test", 2)):
            pairs = [(dialogue(f"{subset} question {k}?", "Here is a careful answer.", earlier if k % 2 else ""),
                      dialogue(f"{subset} question {k}?", "No.", earlier if k % 2 else "")) for k in range(n)]
            pairs.append((dialogue("Same?", " Yes."), dialogue("Same?", "Yes.")))  # the same answer: dropped
            pairs.append((dialogue("One", "A"), dialogue("Other", "B")))  # no shared prompt: dropped
            write_hh(root, subset, split, pairs)
    return root


def test_hh_rlhf_prepare_splits_each_pair_at_its_last_assistant_turn(hh_dir, tmp_path):
    out = tmp_path / "hh"
    meta = load_prepare("hh_rlhf").main([f"--from_dir={hh_dir}", f"--out_dir={out}",
                                         "--subsets=helpful-base,harmless-base", "--eval_prompts=3"])
    assert meta["dropped"] == {"train": {"same_answers": 2, "no_shared_prompt": 2},
                               "test": {"same_answers": 2, "no_shared_prompt": 2}}
    pairs = read_preference_pairs(str(out / "pref_train.jsonl"))
    assert len(pairs) == 8 and {p["kind"] for p in pairs} == {"helpful-base", "harmless-base"}
    second = [p for p in pairs if p["prompt"].startswith("\n\nHuman: Hi there")][0]  # a dialogue of two turns
    assert second["prompt"].endswith("?\n\nAssistant:") and "Hello! How can I help?" in second["prompt"]
    assert (second["chosen"], second["rejected"]) == (" Here is a careful answer.", " No.")
    assert len(lines(out / "pref_val.jsonl")) == 4
    sft = read_sft_examples(str(out / "sft_train.jsonl"))
    assert len(sft) == 8 and all(r == " Here is a careful answer." for _, r in sft)
    assert len(lines(out / "prompts_train.jsonl")) == 8 and len(lines(out / "prompts_eval.jsonl")) == 3
    # the upstream files as they are are read by the stages too (common.read_preference_pairs)
    with gzip.open(hh_dir / "helpful-base" / "train.jsonl.gz", "rt") as f:
        upstream = [json.loads(line) for line in f][:4]
    (tmp_path / "upstream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in upstream))
    assert [p["chosen"] for p in read_preference_pairs(str(tmp_path / "upstream.jsonl"))] == [" Here is a careful " \
                                                                                             "answer."] * 4


def test_hh_rlhf_prepare_errors_name_the_missing_file_and_what_to_do_offline(hh_dir, tmp_path, monkeypatch):
    prepare = load_prepare("hh_rlhf")
    with pytest.raises(UserError, match=r"helpful-online/train.jsonl.gz not found: --from_dir must hold"):
        prepare.main([f"--from_dir={hh_dir}", f"--out_dir={tmp_path / 'a'}", "--subsets=helpful-online"])
    monkeypatch.setattr(prepare, "HERE", str(tmp_path / "raw_here"))
    with pytest.raises(UserError, match=r"cannot download .*helpful-base/train.jsonl.gz .*--from_dir="):
        prepare.main([f"--url={OFFLINE}", f"--out_dir={tmp_path / 'b'}", "--subsets=helpful-base"])
    bad = tmp_path / "bad"
    write_hh(bad, "helpful-base", "train", [])
    (bad / "helpful-base" / "test.jsonl.gz").write_bytes(gzip.compress(b'{"chosen": "x"}\n'))
    with pytest.raises(UserError, match=r"test.jsonl.gz:1: not a .*line of HH-RLHF"):
        prepare.main([f"--from_dir={bad}", f"--out_dir={tmp_path / 'c'}", "--subsets=helpful-base"])


# --------------------------------------------------------------------------------------------------------------
# Alpaca: alpaca_data.json

@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    examples = [{"instruction": f"Add {k} and {k + 1}.", "input": "", "output": f"{2 * k + 1}"} for k in range(40)]
    examples += [{"instruction": "Name the colour.", "input": "The sky on a clear day", "output": "Blue."},
                 {"instruction": "Say nothing.", "input": "", "output": ""},  # empty: dropped
                 {"instruction": "Add 0 and 1.", "input": "", "output": "1"}]  # a duplicate: dropped
    path = tmp_path_factory.mktemp("alpaca_src") / "alpaca_data.json"
    path.write_text(json.dumps(examples, indent=4))
    return str(path)


def test_alpaca_prepare_splits_by_hash_and_writes_the_prompts_as_sft_builds_them(alpaca_file, tmp_path):
    out = tmp_path / "alpaca"
    meta = load_prepare("alpaca").main([f"--from_file={alpaca_file}", f"--out_dir={out}", "--val_every=4"])
    assert meta["dropped"] == {"empty": 1, "duplicate": 1}
    train, val = read_sft_examples(str(out / "sft_train.jsonl")), read_sft_examples(str(out / "sft_val.jsonl"))
    assert len(train) + len(val) == 41 and 3 <= len(val) <= 20
    assert ("Name the colour.\n\nThe sky on a clear day", "Blue.") in train + val
    assert [p["prompt"] for p in lines(out / "prompts_eval.jsonl")] == [p for p, _ in val]
    again = tmp_path / "again"  # the same split on every run
    load_prepare("alpaca").main([f"--from_file={alpaca_file}", f"--out_dir={again}", "--val_every=4"])
    assert (again / "sft_val.jsonl").read_bytes() == (out / "sft_val.jsonl").read_bytes()


def test_alpaca_prepare_errors(tmp_path, monkeypatch):
    prepare = load_prepare("alpaca")
    monkeypatch.setattr(prepare, "HERE", str(tmp_path / "none_here"))
    with pytest.raises(UserError, match=r"cannot download .*run `python data/alpaca/prepare.py --from_file=<it>`"):
        prepare.main([f"--url={OFFLINE}", f"--out_dir={tmp_path / 'a'}"])
    (tmp_path / "dict.json").write_text('{"instruction": "x"}')
    with pytest.raises(UserError, match="holds a dict, not Alpaca's list of examples"):
        prepare.main([f"--from_file={tmp_path / 'dict.json'}", f"--out_dir={tmp_path / 'b'}"])


# --------------------------------------------------------------------------------------------------------------
# the tasks

def test_every_task_module_has_the_interface_the_stages_call_and_an_unknown_task_is_a_one_line_error():
    assert tasks.names() == ["alpaca", "hh_rlhf", "imdb", "pycode"]
    for name in tasks.names():
        task = tasks.load(name)
        for attr in ("read_eval_set", "evaluate_policy", "describe", "MEASURES", "CURVES"):
            assert hasattr(task, attr), (name, attr)
    assert hasattr(tasks.load("pycode"), "reward") and not hasattr(tasks.load("imdb"), "reward")
    with pytest.raises(UserError, match="unknown task 'pycod'; the tasks are alpaca, hh_rlhf, imdb, pycode"):
        tasks.load("pycod")


def tiny_policy(directory, block_size=128):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=257))
    save_checkpoint(os.path.join(directory, "ckpt.pt"), {"stage": "lm", "model_args": vars(model.config),
                                                         "model": model.state_dict(), "tokenizer": "byte"})
    return str(directory), model


def test_hh_rlhf_measures_the_policy_against_the_sft_model_with_the_reward_model(hh_dir, tmp_path):
    out = tmp_path / "hh"
    load_prepare("hh_rlhf").main([f"--from_dir={hh_dir}", f"--out_dir={out}", "--subsets=helpful-base"])
    task, tok = tasks.load("hh_rlhf"), get_tokenizer("byte")
    _, model = tiny_policy(tmp_path / "p")
    eval_set = task.read_eval_set(str(out / "prompts_eval.jsonl"), tok, "none", 100)
    by_length = lambda rows: torch.tensor([float(len(r)) for _, r in rows])  # a reward model that likes length
    same, _ = task.evaluate_policy(model, tok, eval_set, 6, ref_model=model, scorer=by_length, samples=2)
    assert same["win_rate"] == 0.5 and same["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the SFT model
    alone, _ = task.evaluate_policy(model, tok, eval_set, 6)
    assert "win_rate" not in alone and "no reward model" in task.describe(alone)


def test_dpo_on_hh_rlhf_pairs_is_measured_by_the_reward_models_win_rate_over_sft(hh_dir, tmp_path):
    data = tmp_path / "hh"
    load_prepare("hh_rlhf").main([f"--from_dir={hh_dir}", f"--out_dir={data}", "--subsets=helpful-base"])
    init, _ = tiny_policy(tmp_path / "sft", block_size=160)
    torch.manual_seed(1)
    rm = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=160, vocab_size=257, scalar_head=True))
    save_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), {"stage": "rm", "model_args": vars(rm.config),
                                                       "model": rm.state_dict(), "tokenizer": "byte"})
    result = train_dpo.main(["--device=cpu", f"--init_from={init}", f"--out_dir={tmp_path / 'dpo'}", "--task=hh_rlhf",
                             f"--reward_model={tmp_path / 'rm'}", f"--train_file={data / 'pref_train.jsonl'}",
                             f"--val_file={data / 'pref_val.jsonl'}", f"--eval_prompts={data / 'prompts_eval.jsonl'}",
                             "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--max_new_tokens=6",
                             "--eval_samples=0", "--learning_rate=1e-2"])
    assert result["before"]["win_rate"] == 0.5  # the SFT model against itself
    assert 0.0 <= result["after"]["win_rate"] <= 1.0 and "rm_score_sft" in result["after"]
    assert "win rate over SFT (reward model)" in (tmp_path / "dpo" / "report.md").read_text()


def test_imdb_measures_the_sentiment_reward_of_sampled_continuations(imdb_archive, tmp_path):
    out = tmp_path / "imdb"
    load_prepare("imdb").main([f"--from_file={imdb_archive}", f"--out_dir={out}", "--tokenizer=byte"])
    task, tok = tasks.load("imdb"), get_tokenizer("byte")
    _, model = tiny_policy(tmp_path / "p")
    eval_set = task.read_eval_set(str(out / "prompts_eval.jsonl"), tok, "none", 100)
    positive_if_even = lambda rows: torch.tensor([1.0 if len(r) % 2 == 0 else -1.0 for _, r in rows])
    m, completions = task.evaluate_policy(model, tok, eval_set, 5, samples=3, scorer=positive_if_even)
    assert m["samples"] == 3 and len(completions) == len(eval_set.inputs) == 12
    assert m["positive"] == pytest.approx((m["rm_score"] + 1) / 2)
    assert "sentiment reward" in task.describe(m)


def test_sft_on_alpaca_is_measured_by_its_loss_and_says_so(alpaca_file, tmp_path, capsys):
    data = tmp_path / "alpaca"
    load_prepare("alpaca").main([f"--from_file={alpaca_file}", f"--out_dir={data}", "--val_every=4"])
    init, _ = tiny_policy(tmp_path / "init")
    common = ["--device=cpu", f"--init_from={init}", f"--train_file={data / 'sft_train.jsonl'}",
              f"--val_file={data / 'sft_val.jsonl'}", "--template=instruction", "--batch_size=4", "--max_iters=2",
              "--eval_interval=2", "--max_new_tokens=8", "--eval_samples=0"]
    with_prompts = train_sft.main(common + ["--task=alpaca", f"--eval_prompts={data / 'prompts_eval.jsonl'}",
                                            f"--out_dir={tmp_path / 'a'}"])
    assert "no judge for instruction following: measured by the held-out loss" in capsys.readouterr().out
    assert set(with_prompts["after"]) == {"val_loss", "mean_length", "no_eot_share", "n_prompts"}
    loss_only = train_sft.main(common + ["--eval_prompts=none", f"--out_dir={tmp_path / 'b'}"])
    assert "eval_prompts='none': no held-out prompts" in capsys.readouterr().out
    assert set(loss_only["after"]) == {"val_loss"}
    assert loss_only["after"]["val_loss"] == pytest.approx(with_prompts["after"]["val_loss"])


# --------------------------------------------------------------------------------------------------------------
# the GPT-2 IMDB recipe, tiny, on the CPU: its three config files with a tiny GPT-2 and the fixture's reviews

def test_gpt2_imdb_recipe_runs_end_to_end_from_a_local_hugging_face_gpt2(imdb_archive, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "tiny-gpt2"
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=96, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf)  # config.json + model.safetensors, as on the Hub
    data = tmp_path / "imdb"
    load_prepare("imdb").main([f"--from_file={imdb_archive}", f"--out_dir={data}"])  # GPT-2's BPE
    tiny = ["--device=cpu", "--dtype=float32", "--compile=False"]
    lm, rm, ppo = tmp_path / "lm", tmp_path / "rm", tmp_path / "ppo"
    train_lm.main([os.path.join(ROOT, "config", "lm_imdb_gpt2.py"), *tiny, f"--init_from={hf}", f"--dataset={data}",
                   f"--out_dir={lm}", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=1",
                   "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--warmup_iters=1", "--peak_tflops=1.0",
                   "--sample_at_end=False"])
    rm_result = train_rm.main([os.path.join(ROOT, "config", "rm_imdb_gpt2.py"), *tiny, f"--init_from={lm}",
                               f"--train_file={data / 'rm_train.jsonl'}", f"--val_file={data / 'rm_val.jsonl'}",
                               f"--out_dir={rm}", "--batch_size=4", "--max_iters=6", "--eval_interval=6",
                               "--warmup_iters=1", "--learning_rate=1e-3"])
    assert "val_accuracy" in rm_result  # a classifier of the labels
    result = train_ppo.main([os.path.join(ROOT, "config", "ppo_imdb_gpt2.py"), *tiny, f"--init_from={lm}",
                             f"--reward_model={rm}", f"--prompts_file={data / 'prompts_train.jsonl'}",
                             f"--eval_prompts={data / 'prompts_eval.jsonl'}", f"--out_dir={ppo}", "--batch_size=4",
                             "--minibatch_size=4", "--max_new_tokens=6", "--max_iters=2", "--eval_interval=2",
                             "--eval_samples=2"])
    for when in ("before", "after"):
        assert {"rm_score", "positive", "kl", "mean_length"} <= set(result[when])
    report = (ppo / "report.md").read_text()
    assert "sentiment reward (RM score), sampled" in report and "positive (RM score > 0)" in report
    records = read_jsonl_records(ppo / "metrics.jsonl")
    assert [r["iter"] for r in records if "score" in r] == [1, 2]
    assert load_checkpoint(str(ppo))["config"]["task"] == "imdb"
