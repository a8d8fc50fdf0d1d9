"""
Prepare the `pycode` dataset: Python source code, with nothing to download.

The corpus is the standard library of the Python running this script: its .py files, without test
directories and site-packages (734 files, 12.1 MB on CPython 3.11). Every machine that can run this repo already
has it, and it is real, well-documented code. From it we write what each training stage needs:

    train.bin, val.bin       pretraining: uint16 token ids, each file's text followed by end-of-text
    sft_{train,val}.jsonl    fine-tuning: {"prompt": def line(s) + docstring, "response": the body}
    sft_train_renamed.jsonl  fine-tuning: training functions with their arguments renamed (prompt and body alike)
    pref_{train,val}.jsonl   reward model / DPO: {"prompt", "chosen", "rejected", "kind"}
    prompts_train.jsonl      PPO: {"prompt"}, from the train split
    prompts_eval.jsonl       evaluation: {"prompt", "reference"}, from the val split only
    meta.json                tokenizer, options, counts, and a hash of the inputs

Files are split into train/val BY FILE, by a hash of their relative path: the split is the same on every
run and every machine, and val functions never sit next to their train neighbours. Val prompts that also
appear in train are dropped, so the evaluation prompts are truly held out.

Run from the repo root:

    python data/pycode/prepare.py                      # a BPE of 2,048 tokens learnt from the train split
    python data/pycode/prepare.py --tokenizer=byte     # bytes, into data/pycode/byte (dataset='pycode/byte')
    python data/pycode/prepare.py --tokenizer=gpt2     # GPT-2's BPE, into data/pycode/gpt2 (dataset='pycode/gpt2')
    python data/pycode/prepare.py --max_body_lines=20  # GPU scale: a bigger model can learn longer bodies
"""
import ast
import builtins
import functools
import hashlib
import json
import keyword
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for tokenizer.py and common.py
from common import ArgumentParser, make_out_dir, UserError, write_atomic, write_jsonl  # noqa: E402
from tasks.pycode import argument_names, is_trivial_statement as is_trivial, reads_any  # noqa: E402
from tokenizer import BPETokenizer, TOKENIZERS, get_tokenizer, train_bpe  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
SPLITS = ("train", "val")

# -----------------------------------------------------------------------------
# options

def parse_args(argv=None):
    p = ArgumentParser(description="Build the pycode dataset from the Python standard library.", allow_abbrev=False)
    p.add_argument("--tokenizer", default="bpe", help=f"one of {['bpe'] + sorted(TOKENIZERS)}; bpe is learnt here, "
                                                     f"from the train split")
    p.add_argument("--vocab_size", type=int, default=2048, help="with --tokenizer=bpe: the vocabulary size, "
                                                                 "end-of-text included")
    p.add_argument("--src_dir", default=STDLIB, help="where to look for .py files (default: this Python's stdlib)")
    p.add_argument("--out_dir", default=None,
                   help="where to write (default: next to this script; data/pycode/byte or data/pycode/gpt2 with "
                        "--tokenizer=byte or gpt2, so that tokenizations live side by side)")
    # 1 file in 5, not 1 in 10: 1 in 10 gives only ~116 evaluation prompts on CPython 3.11, too few to measure with
    p.add_argument("--val_every", type=int, default=5, help="a file goes to val if sha256(path) %% val_every == 0")
    p.add_argument("--max_body_lines", type=int, default=2,
                   help="keep functions whose body has at most this many non-blank lines. 2 is the CPU scale: "
                        "a model trained for minutes writes short bodies far better than long ones; "
                        "a GPU scale would use e.g. 20")
    p.add_argument("--max_tokens", type=int, default=240,
                   help="prompt+response at most this many tokens, so that with end-of-text they fit a 256 context")
    p.add_argument("--train_pairs_per_function", type=int, default=3,
                   help="preference pairs per training function, each of a different kind where that many apply: "
                        "more pairs for the reward model at no cost in functions (val keeps one per function)")
    p.add_argument("--renamed_copies", type=int, default=1,
                   help="copies of each training function whose body reads its arguments, with the arguments renamed "
                        "(sft_train_renamed.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="for the preference pairs' corruptions and the renaming")
    p.add_argument("--max_files", type=int, default=0, help="use only the first N files, 0 = all (quick tests)")
    args = p.parse_args(argv)
    if args.tokenizer not in TOKENIZERS and args.tokenizer != "bpe":
        raise UserError(f"unknown tokenizer {args.tokenizer!r}; choose one of {sorted(TOKENIZERS) + ['bpe']}")
    if not 258 <= args.vocab_size <= 2 ** 16:
        raise UserError(f"--vocab_size must be between 258 and 65536, got {args.vocab_size}")
    if args.out_dir is None:
        args.out_dir = HERE if args.tokenizer == "bpe" else os.path.join(HERE, args.tokenizer)
    for name, low in (("val_every", 2), ("max_body_lines", 1), ("max_tokens", 1), ("max_files", 0),
                      ("train_pairs_per_function", 1), ("renamed_copies", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    return args

# -----------------------------------------------------------------------------
# the corpus and its split


def is_skipped_dir(name):
    # test suites are huge, repetitive and full of deliberately odd code; site-packages is not the stdlib
    return name in ("site-packages", "test", "tests", "__pycache__") or name.endswith("_test")


def find_source_files(src_dir, max_files=0):
    """Sorted '/'-separated paths, relative to src_dir, of its .py files outside skipped directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src_dir):
        dirnames[:] = [d for d in dirnames if not is_skipped_dir(d)]
        rel = os.path.relpath(dirpath, src_dir).replace(os.sep, "/")
        found += [name if rel == "." else f"{rel}/{name}" for name in filenames if name.endswith(".py")]
    found.sort()  # os.walk's order depends on the file system; sorting makes every run identical
    return found[:max_files] if max_files else found


def split_of(relpath, val_every=5):
    """'val' for about 1 in val_every files, chosen by a hash of the path: stable across runs and machines."""
    return "val" if int(hashlib.sha256(relpath.encode("utf-8")).hexdigest(), 16) % val_every == 0 else "train"

# -----------------------------------------------------------------------------
# functions with docstrings -> (prompt, response) pairs


def parse(source):
    """The module's ast, or None if it does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. invalid escape sequences: noise, not errors
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError):  # ValueError: null bytes
            return None


def parses(source):
    return parse(source) is not None


def split_lines(text):
    """Lines, each keeping its '\\n'. (str.splitlines also splits at form feeds; Python's parser does not.)"""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def dedent(lines, indent):
    """Remove `indent` from every line, or None if some non-blank line does not start with it."""
    if any(line.strip() and not line.startswith(indent) for line in lines):
        return None
    text = "".join(line[len(indent):] if line.strip() else "\n" for line in lines)
    return text if text.endswith("\n") else text + "\n"


def function_pair(node, lines, tok, max_body_lines, max_tokens):
    """((prompt, response), None) for one documented function, or (None, why it was dropped)."""
    doc, body = node.body[0], node.body[1:]
    if not body:
        return None, "docstring_only"
    if body[0].lineno == doc.end_lineno:  # `"""doc"""; x = 1`: no line boundary between prompt and response
        return None, "code_on_docstring_line"
    if all(is_trivial(s) for s in body):
        return None, "trivial_body"
    # col_offset counts UTF-8 bytes; the text before the def must be its indentation
    indent = lines[node.lineno - 1].encode("utf-8")[:node.col_offset].decode("utf-8", errors="replace")
    # slicing whole lines (not ast.unparse) keeps the real source: comments, quotes, layout
    prompt = dedent(lines[node.lineno - 1:doc.end_lineno], indent) if not indent.strip() else None
    response = dedent(lines[doc.end_lineno:body[-1].end_lineno], indent)
    if prompt is None or response is None:
        return None, "dedent_failed"
    if sum(1 for line in response.split("\n") if line.strip()) > max_body_lines:
        return None, "body_too_long"
    if len(tok.encode(prompt + response)) > max_tokens:
        return None, "too_many_tokens"
    if not parses(prompt + response):
        return None, "does_not_parse"
    return (prompt, response), None


def extract_functions(text, tok, max_body_lines, max_tokens, dropped):
    """(prompt, response) pairs from one file's documented functions, methods and nested functions included,
    in source order. Counts why functions were dropped into the Counter `dropped`."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    tree = parse(text)
    if tree is None:
        dropped["file_does_not_parse"] += 1
        return []
    lines = split_lines(text)
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    pairs = []
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        if ast.get_docstring(node, clean=False) is None:
            continue  # no docstring: nothing to prompt with, so not a candidate at all
        pair, why = function_pair(node, lines, tok, max_body_lines, max_tokens)
        if pair:
            pairs.append(pair)
        else:
            dropped[why] += 1
    return pairs


def dedupe(pairs, dropped):
    out = list(dict.fromkeys(pairs))  # keeps the first of each, in order
    dropped["duplicate"] += len(pairs) - len(out)
    return out

# -----------------------------------------------------------------------------
# corruptions: a body -> a worse body of a named kind, or None where the kind does not apply

MAX_TRIES = 20


def _in_function(text, body):
    """`text` in place of `body` after a stand-in prompt: `pass` where the docstring was, indented like body's
    statements. Parses exactly when the real prompt + text does, so corruptions can check themselves."""
    first = next((l for l in split_lines(body) if l.strip() and not l.lstrip().startswith("#")), "    ")
    return "def _():\n" + first[:len(first) - len(first.lstrip())] + "pass\n" + text


def _statements(body):
    """The body's top-level statements as (first, last) 0-based line indices into split_lines(body)."""
    tree = parse(_in_function(body, body))
    return [(s.lineno - 3, s.end_lineno - 3) for s in tree.body[0].body[1:]] if tree else []


def truncated(body, rng):
    """Cut off inside the last statement, as if generation stopped too early; must no longer parse."""
    stmts, lines = _statements(body), split_lines(body)
    if not stmts:
        return None
    first, last = stmts[-1]
    start = sum(map(len, lines[:first])) + len(lines[first]) - len(lines[first].lstrip())
    end = sum(map(len, lines[:last + 1])) - 1  # before the final newline
    cuts = list(range(start + 1, end))
    rng.shuffle(cuts)
    for cut in cuts[:MAX_TRIES]:
        # ends with a newline like every real body, so a reward model cannot judge by the last character alone
        rejected = body[:cut].rstrip("\n") + "\n"
        if not parses(_in_function(rejected, body)):
            return rejected
    return None


def unbalanced(body, rng):
    """One bracket removed; must no longer parse (a bracket inside a string or comment would still parse)."""
    spots = [i for i, c in enumerate(body) if c in "()[]{}"]
    rng.shuffle(spots)
    for i in spots[:MAX_TRIES]:
        rejected = body[:i] + body[i + 1:]
        if not parses(_in_function(rejected, body)):
            return rejected
    return None


def bad_indent(body, rng):
    """One line dedented to column 0 or given an odd extra indent; must no longer parse."""
    lines = split_lines(body)
    options = [(i, how) for i, line in enumerate(lines) if line.strip() for how in ("dedent", "indent")]
    rng.shuffle(options)
    for i, how in options[:MAX_TRIES]:
        new = lines[i].lstrip(" \t") if how == "dedent" else " " * rng.choice((1, 3)) + lines[i]
        rejected = "".join(lines[:i] + [new] + lines[i + 1:])
        if rejected != body and not parses(_in_function(rejected, body)):
            return rejected
    return None


TERMINAL = ("return", "raise", "break", "continue")


def shuffled(body, rng):
    """Statements in another order such that the final `return`/`raise` no longer comes last: the statements after
    it can never run. (A swap of two independent statements would be as good as the original, not worse.)"""
    lines, stmts = split_lines(body), _statements(body)
    if len(stmts) < 2:
        return None
    starts = [first for first, _ in stmts]
    starts[0] = 0  # leading blank or comment lines travel with the first piece
    pieces = [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]
    if not pieces[-1][0].lstrip().startswith(TERMINAL):
        return None
    for _ in range(MAX_TRIES):
        order = pieces[:]
        rng.shuffle(order)
        if order[-1] is not pieces[-1]:
            return "".join(line for piece in order for line in piece)
    return None


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COMMON_NAMES = set(keyword.kwlist) | {"self", "cls", "None", "True", "False"}


def names(text):
    return set(IDENTIFIER.findall(text)) - COMMON_NAMES


def other_function(body, rng, pool, prompt):
    """The body of another function of the same split, one that uses none of the names the prompt mentions
    (arguments, words of the docstring) while the real body uses one of the arguments: valid code that ignores
    what it was given, so plainly not an answer to this prompt."""
    wanted = names(prompt)
    if not names(body) & set(argument_names(prompt)):
        # the real body does not visibly use its arguments either (e.g. `self._unsupported("fileno")` for
        # `def fileno(self)`): telling it from another function's body would be guesswork, so the kind is ambiguous
        return None
    for _ in range(MAX_TRIES):
        rejected = rng.choice(pool)
        if rejected != body and not names(rejected) & wanted:
            return rejected
    return None


def argument_pool(pairs):
    """Every argument name of these functions but Python's builtins (`type`, `id`...), sorted: the names renamed
    arguments are drawn from."""
    return sorted({name for prompt, _ in pairs for name in argument_names(prompt)} - set(dir(builtins)))


def does_nothing(body, rng):
    """A body that parses and does nothing: empty, pass, ..., a bare return. A policy rewarded for code that
    parses finds these first, so the reward model has to have seen them lose."""
    first = split_lines(body)[0]
    indent = first[:len(first) - len(first.lstrip())]
    return rng.choice(["", indent + "pass\n", indent + "...\n", indent + "return\n", indent + "return None\n"])


def _rename_spans(prompt, body, renames, in_prompt=True):
    """prompt + body with the argument names in `renames` ({old: new}) replaced where Python reads them as those
    arguments: the parameters of the def line, the names in the body (not attributes such as `self.name`, not
    keywords of a call such as `f(name=1)`), and the words of the docstring. (prompt, body) or None."""
    text = prompt + body
    tree = parse(text)
    if tree is None or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    fn = tree.body[0]
    prompt_lines = prompt.count("\n")
    spots = []  # (line index, byte column, old name)
    for node in ast.walk(fn):
        name = node.arg if isinstance(node, ast.arg) else node.id if isinstance(node, ast.Name) else None
        if name in renames and (in_prompt or node.lineno > prompt_lines):
            spots.append((node.lineno - 1, node.col_offset, name))
    lines = [line.encode("utf-8") for line in split_lines(text)]
    for i, col, name in sorted(spots, reverse=True):  # right to left, so earlier columns stay valid
        lines[i] = lines[i][:col] + renames[name].encode("utf-8") + lines[i][col + len(name.encode("utf-8")):]
    lines = [line.decode("utf-8") for line in lines]
    if in_prompt:  # the docstring speaks of the arguments by name
        doc = fn.body[0]
        for i in range(doc.lineno - 1, doc.end_lineno):
            for old, new in renames.items():
                lines[i] = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, lines[i])
    new_prompt, new_body = "".join(lines[:prompt_lines]), "".join(lines[prompt_lines:])
    return (new_prompt, new_body) if parses(new_prompt + new_body) else None


def renamed_arguments(prompt, body, rng, pool):
    """The same function with its arguments renamed consistently, in the def line, the docstring and the body, to
    other argument names of the corpus: a demonstration that the body's names come from the prompt, not from
    memory. None when the body reads no argument (nothing to learn from it) or renaming fails."""
    args = argument_names(prompt)
    taken = names(prompt + body) | set(args)
    fresh = [n for n in pool if n not in taken]
    if not args or not fresh or not reads_arguments(prompt, body):
        return None
    renames = dict(zip(args, rng.sample(fresh, min(len(args), len(fresh)))))
    return _rename_spans(prompt, body, renames)


def reads_arguments(prompt, body):
    tree = parse(prompt + body)
    statements = tree.body[0].body[1:] if tree is not None else []
    return reads_any(statements, set(argument_names(prompt)))


def wrong_names(body, rng, pool, prompt):
    """The real body with the arguments it reads renamed in the body only: valid-looking code that reads names
    the function was never given."""
    args = argument_names(prompt)
    if not reads_arguments(prompt, body):
        return None
    fresh = [n for n in pool if n not in names(prompt + body) | set(args)]
    renamed = _rename_spans(prompt, body, dict(zip(args, rng.sample(fresh, min(len(args), len(fresh))))),
                            in_prompt=False)
    return renamed[1] if renamed else None


CORRUPTIONS = {"truncated": truncated, "unbalanced": unbalanced, "bad_indent": bad_indent,
               "shuffled": shuffled, "other_function": other_function, "does_nothing": does_nothing,
               "wrong_names": wrong_names}
MUST_NOT_PARSE = ("truncated", "unbalanced", "bad_indent")


def preference_pairs(pairs, rng, per_function=1):
    """Up to per_function preference pairs per (prompt, response) pair, each rejecting with a different kind.
    Returns (rows, pairs per kind, functions skipped because no kind applies)."""
    pool = [r for _, r in pairs]
    name_pool = argument_pool(pairs)
    used, rows, skipped = Counter({kind: 0 for kind in CORRUPTIONS}), [], 0
    for prompt, chosen in pairs:
        options = {}
        corrupt = dict(CORRUPTIONS, other_function=functools.partial(other_function, pool=pool, prompt=prompt),
                       wrong_names=functools.partial(wrong_names, pool=name_pool, prompt=prompt))
        for kind, fn in corrupt.items():
            rejected = fn(chosen, rng)
            if rejected is None or rejected == chosen or (kind in MUST_NOT_PARSE and parses(prompt + rejected)):
                continue
            options[kind] = rejected
        if not options:
            skipped += 1
            continue
        # the least used kinds that apply: kinds stay balanced though some apply more often than others
        for kind in sorted(options, key=lambda k: (used[k], rng.random()))[:per_function]:
            used[kind] += 1
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": options[kind], "kind": kind})
    return rows, dict(used), skipped


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    make_out_dir(args.out_dir)
    for key, value in vars(args).items():
        print(f"{key} = {value}")
    src_dir = os.path.abspath(args.src_dir)
    paths = find_source_files(src_dir, args.max_files) if os.path.isdir(src_dir) else []
    if not paths:
        raise UserError(f"no .py files found under {src_dir}")

    # read every file, remembering its split
    texts = {split: [] for split in SPLITS}
    counts = {split: Counter(files=0, files_skipped_not_utf8=0, bytes=0, chars=0, lines=0) for split in SPLITS}
    inputs_hash = hashlib.sha256()
    for rel in paths:
        split = split_of(rel, args.val_every)
        with open(os.path.join(src_dir, rel), "rb") as f:
            raw = f.read()
        inputs_hash.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(raw).digest())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts[split]["files_skipped_not_utf8"] += 1
            continue
        texts[split].append(text)
        counts[split].update(files=1, bytes=len(raw), chars=len(text), lines=text.count("\n"))  # lines as wc -l
    # the tokenizer: a fixed one, or a BPE learnt from the train split only (val stays unseen, as text)
    if args.tokenizer == "bpe":
        t_bpe = time.time()
        tok = BPETokenizer(train_bpe(texts["train"], args.vocab_size))
        print(f"learnt {tok.name} from the train split in {time.time() - t_bpe:.1f}s")
    else:
        tok = get_tokenizer(args.tokenizer)
    assert tok.n_vocab <= 2 ** 16, "token ids must fit in uint16"
    out = functools.partial(os.path.join, args.out_dir)
    # every file is made in memory first and written only once none of them is empty: a source folder with
    # nothing usable in it leaves the dataset that is there as it was
    files, written = {}, {}

    # pretraining: every file, end-of-text after each so the model learns where files end
    for split in SPLITS:
        ids = [np.array(tok.encode(text) + [tok.eot_token], dtype=np.uint16) for text in texts[split]]
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)
        files[f"{split}.bin"] = ids
        counts[split]["tokens"] = written[f"{split}.bin"] = len(ids)

    # fine-tuning pairs; val keeps only prompts train never shows, so that val is truly held out
    dropped = {split: Counter() for split in SPLITS}
    sft = {}
    for split in SPLITS:
        pairs = [pair for text in texts[split] for pair in extract_functions(
            text, tok, args.max_body_lines, args.max_tokens, dropped[split])]
        sft[split] = dedupe(pairs, dropped[split])
    train_prompts = {prompt for prompt, _ in sft["train"]}
    dropped["val"]["prompt_in_train"] = sum(prompt in train_prompts for prompt, _ in sft["val"])
    sft["val"] = [(prompt, response) for prompt, response in sft["val"] if prompt not in train_prompts]

    # demonstrations that the body's names come from the prompt: training functions with their arguments renamed
    rng, pool = random.Random(f"{args.seed}:renamed"), argument_pool(sft["train"])
    renamed = [copy for _ in range(args.renamed_copies) for p, r in sft["train"]
               for copy in [renamed_arguments(p, r, rng, pool)] if copy is not None]
    files["sft_train_renamed.jsonl"] = [{"prompt": p, "response": r} for p, r in renamed]
    written["sft_train_renamed.jsonl"] = len(renamed)

    kinds = {}
    for split in SPLITS:
        files[f"sft_{split}.jsonl"] = [{"prompt": p, "response": r} for p, r in sft[split]]
        rows, kinds[split], dropped[split]["no_corruption_applies"] = preference_pairs(
            sft[split], random.Random(f"{args.seed}:{split}"), args.train_pairs_per_function if split == "train" else 1)
        files[f"pref_{split}.jsonl"] = rows
        written[f"sft_{split}.jsonl"], written[f"pref_{split}.jsonl"] = len(sft[split]), len(rows)

    # prompts for PPO (train) and for evaluation (val: never seen by any training stage), one row per prompt
    ppo = list(dict.fromkeys(prompt for prompt, _ in sft["train"]))
    evals = {}
    for prompt, response in sft["val"]:
        evals.setdefault(prompt, response)  # where a prompt repeats, its first response is the reference
    files["prompts_train.jsonl"] = [{"prompt": p} for p in ppo]
    files["prompts_eval.jsonl"] = [{"prompt": p, "reference": r} for p, r in evals.items()]
    written["prompts_train.jsonl"], written["prompts_eval.jsonl"] = len(ppo), len(evals)

    meta = {
        "tokenizer": tok.spec, "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "dtype": "uint16",
        "python_version": sys.version, "stdlib": STDLIB, "src_dir": src_dir,
        "split_rule": f"a file goes to val if int(sha256(relative_path).hexdigest(), 16) % {args.val_every} == 0",
        "options": vars(args),
        "counts": {split: dict(counts[split]) for split in SPLITS},
        "examples": written,
        "preference_kinds": kinds,
        "dropped": {split: dict(sorted(dropped[split].items())) for split in SPLITS},
        "inputs_sha256": inputs_hash.hexdigest(),
    }
    empty = [name for name, n in written.items() if n == 0 and not (name == "sft_train_renamed.jsonl"
                                                                     and args.renamed_copies == 0)]
    if empty:
        raise UserError(f"{src_dir} gives nothing usable for {', '.join(empty)} ({len(paths)} .py files read, "
                        f"{sum(c['files_skipped_not_utf8'] for c in counts.values())} not UTF-8); nothing was written")
    if os.path.exists(out("meta.json")):  # a dataset with a meta.json is complete: it is written last
        os.remove(out("meta.json"))
    for name, content in files.items():
        if name.endswith(".bin"):
            write_atomic(out(name), content.tofile)
        else:
            write_jsonl(out(name), content)
    write_atomic(out("meta.json"), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))

    print(f"read {len(paths)} .py files from {src_dir}")
    for split in SPLITS:
        c = counts[split]
        print(f"{split:>5}: {c['files']} files ({c['files_skipped_not_utf8']} skipped, not UTF-8), "
              f"{c['bytes'] / 1e6:.2f} MB, {c['lines']:,} lines, {c['tokens']:,} tokens")
    print(f"wrote to {os.path.abspath(args.out_dir)}:")
    for name, n in written.items():
        print(f"  {name:<20} {n:>10,} {'tokens' if name.endswith('.bin') else 'rows'}")
    for split in SPLITS:
        print(f"  pref_{split} kinds: " + ", ".join(f"{k} {n}" for k, n in kinds[split].items()))
        print(f"  {split} functions dropped: " + ", ".join(f"{k} {n}" for k, n in sorted(dropped[split].items())))
    print(f"  meta.json  ({time.time() - t0:.1f}s)")
    return meta


if __name__ == "__main__":
    main()
