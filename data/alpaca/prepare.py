"""
Prepare the `alpaca` dataset: Stanford Alpaca's 52,002 instructions with answers (Taori et al. 2023), for supervised
fine-tuning in the instruction template (train_sft.py --template=instruction).

alpaca_data.json is one JSON array of {"instruction", "input", "output"}; "input" is the optional context of the
instruction (empty for most). We split it by a hash of each instruction and input (1 in --val_every to val, the same
everywhere) and write

    sft_train.jsonl, sft_val.jsonl    one {"instruction", "input", "output"} a line, as train_sft.py reads them
    prompts_eval.jsonl                {"prompt": the instruction and its input}, held-out, to complete and read
    meta.json                         counts, what was dropped and why, options, a hash of the input

An example with an empty instruction or output, or one seen before, is dropped and counted. Alpaca has no judge
(tasks/alpaca.py): SFT on it is measured by the held-out loss. Run from the repo root:

    python data/alpaca/prepare.py                                 # downloads alpaca_data.json (once) into data/alpaca
    python data/alpaca/prepare.py --from_file=alpaca_data.json    # a copy you already have
"""
import hashlib
import json
import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
from common import ArgumentParser, download, make_out_dir, UserError, write_atomic, write_jsonl  # noqa: E402

URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def parse_args(argv=None):
    p = ArgumentParser(description="Build the alpaca dataset from Stanford Alpaca's alpaca_data.json.",
                       allow_abbrev=False)
    p.add_argument("--from_file", default=None, help="a copy of alpaca_data.json (default: download it into "
                                                     "data/alpaca unless it is there)")
    p.add_argument("--url", default=URL, help="where alpaca_data.json is downloaded from")
    p.add_argument("--out_dir", default=HERE, help="where to write")
    p.add_argument("--val_every", type=int, default=50, help="an example goes to val if its hash %% val_every == 0")
    p.add_argument("--eval_prompts", type=int, default=64, help="held-out instructions completed at each evaluation")
    args = p.parse_args(argv)
    for name, low in (("val_every", 2), ("eval_prompts", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    return args


def read_examples(path):
    """The examples of alpaca_data.json and the raw bytes; anything but a list of such objects is an error."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        examples = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not JSON ({e}); download it again") from None
    if not isinstance(examples, list):
        raise UserError(f"{path} holds a {type(examples).__name__}, not Alpaca's list of examples")
    for i, ex in enumerate(examples):
        fields = ("instruction", "input", "output")
        if not isinstance(ex, dict) or not all(isinstance(ex.get(k, ""), str) for k in fields):
            raise UserError(f"{path}: example {i} is not an {{\"instruction\", \"input\", \"output\"}} object of text")
    return examples, raw


def prompt_of(example):
    """The prompt as train_sft.py builds it (common.read_sft_examples): the instruction, then its input if any."""
    extra = example.get("input", "")
    return f"{example['instruction']}\n\n{extra}" if extra.strip() else example["instruction"]


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    make_out_dir(args.out_dir)
    source = args.from_file or os.path.join(HERE, "alpaca_data.json")
    if not args.from_file and not os.path.exists(source):
        download(args.url, source, "with no internet, fetch alpaca_data.json elsewhere and run `python "
                                   "data/alpaca/prepare.py --from_file=<it>`")
    examples, raw = read_examples(source)

    splits, dropped, seen = {"train": [], "val": []}, Counter(), set()
    for ex in examples:
        row = {"instruction": ex["instruction"], "input": ex.get("input", ""), "output": ex.get("output", "")}
        if not row["instruction"].strip() or not row["output"].strip():
            dropped["empty"] += 1
            continue
        key = (row["instruction"], row["input"])
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        h = int(hashlib.sha256(json.dumps(key).encode()).hexdigest(), 16)
        splits["val" if h % args.val_every == 0 else "train"].append(row)
    files = {"sft_train.jsonl": splits["train"], "sft_val.jsonl": splits["val"],
             "prompts_eval.jsonl": [{"prompt": prompt_of(ex)} for ex in splits["val"][:args.eval_prompts]]}
    empty = [name for name, rows in files.items() if not rows]
    if empty:
        raise UserError(f"{source} gives nothing for {', '.join(empty)} ({len(examples)} examples read); nothing "
                        f"was written")

    out = lambda name: os.path.join(args.out_dir, name)
    if os.path.exists(out("meta.json")):  # a dataset with a meta.json is complete: it is written last
        os.remove(out("meta.json"))
    for name, rows in files.items():
        write_jsonl(out(name), rows)
    meta = {"source": os.path.abspath(source), "examples_read": len(examples), "dropped": dict(dropped),
            "examples": {name: len(rows) for name, rows in files.items()}, "options": vars(args),
            "input_sha256": hashlib.sha256(raw).hexdigest()}
    write_atomic(out("meta.json"), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    print(f"read {len(examples):,} examples from {source}; dropped {dict(dropped) or 'none'}")
    print(f"wrote to {os.path.abspath(args.out_dir)}:")
    for name, rows in files.items():
        print(f"  {name:<20} {len(rows):>10,} rows")
    print(f"  meta.json  ({time.time() - t0:.1f}s)")
    return meta


if __name__ == "__main__":
    main()
