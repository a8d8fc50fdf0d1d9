"""
Prepare the `hh_rlhf` dataset: Anthropic's helpfulness and harmlessness preference pairs (Bai et al. 2022,
"Training a Helpful and Harmless Assistant with Reinforcement Learning from Human Feedback").

Each subset folder holds train.jsonl.gz and test.jsonl.gz, one pair a line: two whole dialogues that share every
turn but the last Assistant's, {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}. The default
subsets make the 160,800 + 8,552 pairs of the Hugging Face dataset's default configuration. From them we write

    pref_train.jsonl, pref_val.jsonl    reward model and DPO: {"prompt": the dialogue up to the last "Assistant:",
                                        "chosen", "rejected": the two last answers, "kind": the subset}
    sft_train.jsonl, sft_val.jsonl      SFT on the chosen dialogues: {"prompt", "response": the chosen answer}
    prompts_train.jsonl                 PPO: {"prompt"}, each dialogue of the train split once
    prompts_eval.jsonl                  evaluation: dialogues of the test split, never trained on
    meta.json                           counts, what was dropped and why, options, a hash of the inputs

A pair whose two dialogues do not share a prompt ending in "\\n\\nAssistant:", or whose answers are the same or
empty, is dropped and counted. Run from the repo root:

    python data/hh_rlhf/prepare.py                          # downloads the files (once) into data/hh_rlhf/raw
    python data/hh_rlhf/prepare.py --from_dir=hh-rlhf       # a clone of github.com/anthropics/hh-rlhf (or of the
                                                            # Hugging Face dataset): <subset>/{train,test}.jsonl.gz
    python data/hh_rlhf/prepare.py --subsets=helpful-base   # one subset
"""
import gzip
import hashlib
import json
import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
from common import ArgumentParser, download, make_out_dir, UserError, write_atomic, write_jsonl  # noqa: E402

URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
SUBSETS = "harmless-base,helpful-base,helpful-online,helpful-rejection-sampled"
MARKER = "\n\nAssistant:"


def parse_args(argv=None):
    p = ArgumentParser(description="Build the hh_rlhf dataset from Anthropic's HH-RLHF pairs.", allow_abbrev=False)
    p.add_argument("--from_dir", default=None, help="a folder with <subset>/train.jsonl.gz and test.jsonl.gz "
                                                    "(default: download them into data/hh_rlhf/raw unless there)")
    p.add_argument("--url", default=URL, help="where <subset>/<split>.jsonl.gz are downloaded from")
    p.add_argument("--subsets", default=SUBSETS, help="comma-separated subset folders")
    p.add_argument("--out_dir", default=HERE, help="where to write")
    p.add_argument("--eval_prompts", type=int, default=256, help="held-out dialogues to evaluate policies on")
    args = p.parse_args(argv)
    args.subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    if not args.subsets:
        raise UserError("--subsets names no subset")
    if args.eval_prompts < 1:
        raise UserError(f"--eval_prompts must be at least 1, got {args.eval_prompts}")
    return args


def split_pair(chosen, rejected):
    """(prompt, chosen answer, rejected answer) of two whole dialogues, cut after their last shared
    '\\n\\nAssistant:', or a reason to drop the pair."""
    cut = chosen.rfind(MARKER)
    if cut < 0 or not rejected.startswith(chosen[:cut + len(MARKER)]):
        return "no_shared_prompt"
    prompt = chosen[:cut + len(MARKER)]
    answer_w, answer_l = chosen[len(prompt):], rejected[len(prompt):]
    if not answer_w.strip() or not answer_l.strip():
        return "empty_answer"
    if answer_w.strip() == answer_l.strip():
        return "same_answers"
    return prompt, answer_w, answer_l


def read_pairs(path, subset, dropped, inputs_hash):
    """The pairs of one <subset>/<split>.jsonl.gz file, in our format; a malformed line is an error naming it."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable gzip file ({e}); download it again") from None
    inputs_hash.update(f"{subset}/{os.path.basename(path)}".encode() + hashlib.sha256(raw).digest())
    pairs = []
    for n, line in enumerate(raw.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            chosen, rejected = obj["chosen"], obj["rejected"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a {{\"chosen\", \"rejected\"}} line of HH-RLHF") from None
        parts = split_pair(chosen, rejected)
        if isinstance(parts, str):
            dropped[parts] += 1
            continue
        prompt, answer_w, answer_l = parts
        pairs.append({"prompt": prompt, "chosen": answer_w, "rejected": answer_l, "kind": subset})
    return pairs


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    make_out_dir(args.out_dir)
    root = args.from_dir or os.path.join(HERE, "raw")
    if args.from_dir and not os.path.isdir(args.from_dir):
        raise UserError(f"--from_dir {args.from_dir} is not a folder")
    inputs_hash = hashlib.sha256()
    pairs = {"train": [], "test": []}
    dropped = {"train": Counter(), "test": Counter()}
    for subset in args.subsets:
        for split in ("train", "test"):
            path = os.path.join(root, subset, f"{split}.jsonl.gz")
            if not os.path.exists(path):
                if args.from_dir:
                    raise UserError(f"{path} not found: --from_dir must hold <subset>/{split}.jsonl.gz for each of "
                                    f"{', '.join(args.subsets)}")
                download(f"{args.url}/{subset}/{split}.jsonl.gz", path,
                         "with no internet, fetch the files elsewhere (github.com/anthropics/hh-rlhf) and run `python "
                         "data/hh_rlhf/prepare.py --from_dir=<the folder holding the subset folders>`")
            pairs[split] += read_pairs(path, subset, dropped[split], inputs_hash)

    sft = {split: list({(p["prompt"], p["chosen"]): None for p in pairs[split]}) for split in pairs}
    train_prompts = list(dict.fromkeys(p["prompt"] for p in pairs["train"]))
    key = lambda prompt: hashlib.sha256(prompt.encode()).hexdigest()  # a fixed, shuffled-looking order
    held_out = sorted(dict.fromkeys(p["prompt"] for p in pairs["test"]), key=key)[:args.eval_prompts]
    files = {"pref_train.jsonl": pairs["train"], "pref_val.jsonl": pairs["test"],
             "sft_train.jsonl": [{"prompt": p, "response": r} for p, r in sft["train"]],
             "sft_val.jsonl": [{"prompt": p, "response": r} for p, r in sft["test"]],
             "prompts_train.jsonl": [{"prompt": p} for p in train_prompts],
             "prompts_eval.jsonl": [{"prompt": p} for p in held_out]}
    empty = [name for name, rows in files.items() if not rows]
    if empty:
        raise UserError(f"{root} gives nothing for {', '.join(empty)}; nothing was written")

    out = lambda name: os.path.join(args.out_dir, name)
    if os.path.exists(out("meta.json")):  # a dataset with a meta.json is complete: it is written last
        os.remove(out("meta.json"))
    for name, rows in files.items():
        write_jsonl(out(name), rows)
    meta = {"source": os.path.abspath(root), "subsets": args.subsets,
            "pairs_by_subset": {split: dict(Counter(p["kind"] for p in pairs[split])) for split in pairs},
            "dropped": {split: dict(dropped[split]) for split in dropped},
            "examples": {name: len(rows) for name, rows in files.items()}, "options": vars(args),
            "inputs_sha256": inputs_hash.hexdigest()}
    write_atomic(out("meta.json"), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    print(f"read {', '.join(args.subsets)} from {root}: {len(pairs['train']):,} train and {len(pairs['test']):,} test "
          f"pairs kept; dropped " + ", ".join(f"{split} {dict(d) or 'none'}" for split, d in dropped.items()))
    print(f"wrote to {os.path.abspath(args.out_dir)}:")
    for name, rows in files.items():
        print(f"  {name:<20} {len(rows):>10,} rows")
    print(f"  meta.json  ({time.time() - t0:.1f}s)")
    return meta


if __name__ == "__main__":
    main()
