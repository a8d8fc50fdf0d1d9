"""
Prepare the `imdb` dataset: 100,000 movie reviews from IMDB (Maas et al. 2011, the Stanford "Large Movie Review
Dataset"), for the recipe of Ziegler et al. 2019 and trl's gpt2-sentiment: GPT-2 fine-tuned on reviews, a sentiment
classifier as reward, PPO to write positive reviews.

The archive aclImdb_v1.tar.gz (84 MB) holds aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, 12,500 reviews in
each of the four folders (ratings 7-10 are pos, 1-4 neg), and aclImdb/train/unsup/<id>_0.txt, 50,000 unlabelled
ones. From it we write

    train.bin, val.bin          pretraining: every train review (pos, neg, unsup) / every test review, each followed
                                by end-of-text, as uint16 token ids (nanoGPT's format)
    rm_train.jsonl, rm_val.jsonl    the sentiment reward model: {"user_input": the opening words, "completion": the
                                rest of the review, "score": 1 positive or 0 negative}, for train_rm.py --loss=logistic
    prompts_train.jsonl         PPO: {"prompt": the first 2-8 words of a train review} (reviews over 200 characters,
                                as trl's notebook takes them)
    prompts_eval.jsonl          evaluation: the same of test reviews, never trained on
    meta.json                   tokenizer, counts, options and a hash of the inputs

The review's HTML line breaks (<br />) become newlines. Run from the repo root:

    python data/imdb/prepare.py                                  # downloads the archive (once) into data/imdb/
    python data/imdb/prepare.py --from_file=aclImdb_v1.tar.gz    # a copy you already have
    python data/imdb/prepare.py --from_dir=aclImdb               # ... or the folder it unpacks to
    python data/imdb/prepare.py --tokenizer=byte                 # bytes, into data/imdb/byte (dataset='imdb/byte')
"""
import hashlib
import json
import os
import re
import sys
import tarfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for tokenizer.py and common.py
from common import ArgumentParser, download, make_out_dir, UserError, write_atomic, write_jsonl  # noqa: E402
from tokenizer import get_tokenizer, TOKENIZERS  # noqa: E402

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
REVIEW = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")  # split, label, id, rating


def parse_args(argv=None):
    p = ArgumentParser(description="Build the imdb dataset from the Stanford IMDB review archive.", allow_abbrev=False)
    p.add_argument("--from_file", default=None, help="a copy of aclImdb_v1.tar.gz (default: download it into "
                                                     "data/imdb/ unless it is there)")
    p.add_argument("--from_dir", default=None, help="the aclImdb folder the archive unpacks to (or its parent)")
    p.add_argument("--url", default=URL, help="where the archive is downloaded from")
    p.add_argument("--tokenizer", default="gpt2", help=f"one of {sorted(TOKENIZERS)}: GPT-2's BPE for GPT-2 weights")
    p.add_argument("--out_dir", default=None, help="where to write (default: data/imdb, or data/imdb/byte with "
                                                   "--tokenizer=byte)")
    p.add_argument("--min_prompt_words", type=int, default=2, help="a prompt is the first 2..8 words of a review")
    p.add_argument("--max_prompt_words", type=int, default=8)
    p.add_argument("--min_review_chars", type=int, default=200, help="prompts come from reviews longer than this")
    p.add_argument("--eval_prompts", type=int, default=256, help="held-out prompts, from the test split")
    p.add_argument("--rm_val", type=int, default=2000, help="held-out labelled reviews for the reward model, half "
                                                            "positive, from the test split")
    args = p.parse_args(argv)
    if args.tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {args.tokenizer!r}; choose one of {sorted(TOKENIZERS)}")
    if args.from_file and args.from_dir:
        raise UserError("give --from_file or --from_dir, not both")
    if not 1 <= args.min_prompt_words <= args.max_prompt_words:
        raise UserError("need 1 <= --min_prompt_words <= --max_prompt_words")
    for name in ("eval_prompts", "rm_val"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.out_dir is None:
        args.out_dir = HERE if args.tokenizer == "gpt2" else os.path.join(HERE, args.tokenizer)
    return args


# -----------------------------------------------------------------------------
# reading the reviews

def clean(text):
    """The review as plain text: its HTML line breaks as newlines, no space at either end."""
    return re.sub(r"<br\s*/?>", "\n", text).strip()


def reviews_in_archive(path):
    """(split, label, id, rating, text) of every review in aclImdb_v1.tar.gz, read without unpacking it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                m = REVIEW.search(member.name)
                if m and member.isfile():
                    text = tar.extractfile(member).read().decode("utf-8")
                    yield m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), text
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable tar archive ({e}); download it again") from None


def reviews_in_dir(path):
    """The same from the folder the archive unpacks to (aclImdb, or a folder holding it)."""
    if os.path.isdir(os.path.join(path, "aclImdb")):
        path = os.path.join(path, "aclImdb")
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder")
    for split in ("train", "test"):
        for label in ("pos", "neg", "unsup"):
            folder = os.path.join(path, split, label)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                m = REVIEW.search(f"aclImdb/{split}/{label}/{name}")
                if m:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        yield split, label, int(m.group(3)), int(m.group(4)), f.read()


def stable_hash(*parts):
    """A number from the review's identity, the same on every machine: it picks prompt lengths and held-out sets."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def split_prefix(text, n_words):
    """(the first n_words words, the rest), cut so that the two add up to the text exactly."""
    words = list(re.finditer(r"\S+", text))
    end = words[min(n_words, len(words)) - 1].end()
    return text[:end], text[end:]


# -----------------------------------------------------------------------------

def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    make_out_dir(args.out_dir)
    if args.from_dir:
        source, reviews = os.path.abspath(args.from_dir), reviews_in_dir(args.from_dir)
    else:
        source = args.from_file or os.path.join(HERE, "aclImdb_v1.tar.gz")
        if not args.from_file and not os.path.exists(source):
            download(args.url, source, "with no internet, fetch aclImdb_v1.tar.gz elsewhere and run `python "
                                       "data/imdb/prepare.py --from_file=<it>` (or --from_dir=<the unpacked aclImdb>)")
        reviews = reviews_in_archive(source)
    tok = get_tokenizer(args.tokenizer)
    assert tok.n_vocab <= 2 ** 16, "token ids must fit in uint16"

    # every review, in an order that does not depend on the file system or the archive
    rows = sorted(reviews, key=lambda r: (r[0], r[1], r[2]))
    if not rows:
        raise UserError(f"no reviews (aclImdb/<train|test>/<pos|neg|unsup>/<id>_<rating>.txt) in {source}")
    inputs_hash = hashlib.sha256()
    counts = {}
    text_ids = {"train": [], "val": []}
    labelled = {"train": [], "test": []}
    prompts = {"train": [], "test": []}
    for split, label, review_id, rating, raw in rows:
        inputs_hash.update(f"{split}/{label}/{review_id}_{rating}".encode() + hashlib.sha256(raw.encode()).digest())
        counts[f"{split}/{label}"] = counts.get(f"{split}/{label}", 0) + 1
        text = clean(raw)
        if not text:
            continue
        text_ids["train" if split == "train" else "val"].append(np.array(tok.encode(text) + [tok.eot_token],
                                                                         dtype=np.uint16))
        if label == "unsup":
            continue
        h = stable_hash(split, label, review_id)
        n_words = args.min_prompt_words + h % (args.max_prompt_words - args.min_prompt_words + 1)
        prefix, rest = split_prefix(text, n_words)
        if rest.strip():
            labelled[split].append((h, {"user_input": prefix, "completion": rest, "score": float(label == "pos")}))
        if len(text) > args.min_review_chars:
            prompts[split].append((h, {"prompt": prefix}))

    # held-out sets: the test reviews first by hash (a fixed, shuffled-looking choice), the labelled ones balanced
    by_hash = lambda items: [row for _, row in sorted(items, key=lambda x: x[0])]
    test_pos = by_hash([x for x in labelled["test"] if x[1]["score"] == 1.0])
    test_neg = by_hash([x for x in labelled["test"] if x[1]["score"] == 0.0])
    rm_val = test_pos[:args.rm_val // 2] + test_neg[:args.rm_val - args.rm_val // 2]
    files = {"train.bin": text_ids["train"], "val.bin": text_ids["val"],
             "rm_train.jsonl": [row for _, row in labelled["train"]], "rm_val.jsonl": rm_val,
             "prompts_train.jsonl": [row for _, row in prompts["train"]],
             "prompts_eval.jsonl": by_hash(prompts["test"])[:args.eval_prompts]}
    empty = [name for name, content in files.items() if len(content) == 0]
    if empty:
        raise UserError(f"{source} gives nothing for {', '.join(empty)} ({len(rows)} reviews read: "
                        f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); nothing was written")

    out = lambda name: os.path.join(args.out_dir, name)
    if os.path.exists(out("meta.json")):  # a dataset with a meta.json is complete: it is written last
        os.remove(out("meta.json"))
    written = {}
    for name, content in files.items():
        if name.endswith(".bin"):
            ids = np.concatenate(content)
            write_atomic(out(name), ids.tofile)
            written[name] = len(ids)
        else:
            write_jsonl(out(name), content)
            written[name] = len(content)
    meta = {"tokenizer": tok.spec, "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "dtype": "uint16",
            "source": source, "reviews": counts, "examples": written, "options": vars(args),
            "inputs_sha256": inputs_hash.hexdigest()}
    write_atomic(out("meta.json"), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    print(f"read {len(rows):,} reviews from {source}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    print(f"wrote to {os.path.abspath(args.out_dir)}:")
    for name, n in written.items():
        print(f"  {name:<20} {n:>12,} {'tokens' if name.endswith('.bin') else 'rows'}")
    print(f"  meta.json  ({time.time() - t0:.1f}s)")
    return meta


if __name__ == "__main__":
    main()
