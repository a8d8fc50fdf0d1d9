"""tokenizer.py: the byte tokenizer, and the BPE learnt from a corpus: its merges by hand on a tiny corpus,
lossless round trips, identifiers as whole tokens, and its spec (stored in checkpoints) rebuilding it exactly."""
import re

import pytest

import tokenizer
from tokenizer import BPETokenizer, get_tokenizer, tokenizer_name, train_bpe


def test_byte_tokenizer_round_trips_any_text():
    tok = get_tokenizer("byte")
    text = "déf f(x):\n\treturn x  # ü\n"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) == len(text.encode("utf-8"))
    assert tok.spec == tok.name == tokenizer_name("byte") == "byte"


def test_bpe_merges_the_most_frequent_pair_first_by_hand():
    # pieces: "aaab" x1, and " ab" (punctuation-free: the space is its own piece) ... keep it to identifiers:
    # "ab" appears 3 times, "abc" twice: pairs (a,b) 5, (b,c) 2 -> merge ab first, then (ab,c) 2
    vocab = train_bpe(["ab ab ab abc abc"], vocab_size=256 + 2 + 1)
    assert vocab[256:] == [b"ab", b"abc"]
    tok = BPETokenizer(vocab)
    assert tok.encode("abc ab") == [257, ord(" "), 256] and tok.eot_token == 258 and tok.n_vocab == 259


def test_bpe_never_merges_across_pieces_and_stops_when_nothing_repeats():
    # "x.y" x3: the pieces are x, ".", y -- no pair inside a piece repeats, so nothing is merged
    assert train_bpe(["x.y x.y x.y"], vocab_size=300)[256:] == []


def test_learnt_bpe_round_trips_code_and_keeps_identifiers_whole():
    corpus = ["def read(self, size):\n    return self._file.read(size)\n" * 20,
              "def write(self, data):\n    return self._file.write(data)\n" * 20]
    tok = BPETokenizer(train_bpe(corpus, vocab_size=320))
    for text in corpus + ["unseen_name = 'é' + 3 * x\r\n\t\n", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("def read(self, size):\n    return read(size)\n")
    pieces = [tok.decode([i]) for i in ids]
    # an argument is the same token in the def line and in the body: no leading space is glued to identifiers
    assert pieces.count("size") == 2 and "self" in pieces and "\n    " in pieces
    # the pieces the merges may not cross are the same for Python's re and for the encoder
    assert re.findall(tokenizer.PIECES, "x = f(a, b)") == ["x", " =", " ", "f", "(", "a", ",", " ", "b", ")"]


def test_the_spec_rebuilds_the_same_tokenizer_and_names_it_by_a_hash():
    tok = BPETokenizer(train_bpe(["abab cdcd abab"], vocab_size=262))
    again = get_tokenizer(tok.spec)
    assert again.encode("abab cd") == tok.encode("abab cd") and again.name == tok.name
    assert tokenizer_name(tok.spec) == tok.name and tok.name.startswith(f"bpe{tok.n_vocab}-")
    other = BPETokenizer(train_bpe(["xyxy zwzw xyxy"], vocab_size=262))
    assert other.name != tok.name  # same size, other merges: another name
    with pytest.raises(ValueError, match="256 single bytes"):
        BPETokenizer([b"a"] * 300)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("nope")
