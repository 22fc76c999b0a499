"""CLIP BPE tokenizer vs ids produced by open_clip's own tokenizer (open_clip_torch 3.3.0)."""
import numpy as np
import pytest

from grain_jax.data import tokenizer

LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
# "the quick brown fox jumps over the lazy dog " as open_clip tokenises it (9 ids, repeated).
LONG_PERIOD = [518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929]

# (text, open_clip.tokenizer.tokenize([text], 77)[0] up to and including EOT)
ORACLE = [
    ("a photo of a cat.",
     [49406, 320, 1125, 539, 320, 2368, 269, 49407]),
    ("",
     [49406, 49407]),
    ("   Hello,\n\tWORLD!!   ",
     [49406, 3306, 267, 1002, 748, 49407]),
    ("café crème brûlée — naïve façade",
     [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 2005, 1097, 35689, 563, 778, 10067, 1928, 49407]),
    ("Tom &amp;amp; Jerry &lt;3 &quot;cartoons&quot;",
     [49406, 2435, 261, 9164, 283, 274, 257, 17673, 257, 49407]),
    ("I'm sure they'll say it's what we've done, isn't it?",
     [49406, 328, 880, 1650, 889, 1342, 1451, 585, 568, 768, 649, 1200, 1700, 267, 2923, 713, 585, 286, 49407]),
    ("In 2024, 3.14159 and 1,000,000 people paid $42.50",
     [49406, 530, 273, 271, 273, 275, 267, 274, 269, 272, 275, 272, 276, 280, 537, 272, 267, 271, 271, 271, 267,
      271, 271, 271, 1047, 5057, 259, 275, 273, 269, 276, 271, 49407]),
    ("emoji 🙂👍 and CJK 猫と犬 and Ελληνικά",
     [49406, 16327, 32006, 4201, 537, 66, 9702, 163, 234, 104, 34671, 163, 232, 361, 537, 138, 113, 138, 119, 138,
      119, 138, 115, 138, 121, 138, 117, 138, 118, 138, 361, 49407]),
    ("mojibake: cafÃ© and donâ€™t",  # ftfy repairs both
     [49406, 617, 3252, 11878, 281, 15304, 537, 847, 713, 49407]),
    ("<|endoftext|> is not special <|startoftext|>",
     [49406, 27, 347, 40786, 4160, 91, 285, 533, 783, 1689, 27, 347, 993, 6659, 4160, 91, 285, 49407]),
    ("has a striped body, a small red disc on top",
     [49406, 791, 320, 22192, 1774, 267, 320, 2442, 736, 10712, 525, 1253, 49407]),
    ("hyper-realistic, state-of-the-art!!! ...wow?!",
     [49406, 22146, 268, 16157, 267, 1295, 268, 539, 268, 518, 268, 794, 995, 678, 2781, 2835, 49407]),
    (LONG_TEXT,  # 108 BPE ids: cut to 75 + SOT + EOT
     [49406] + (LONG_PERIOD * 12)[:75] + [49407]),
]


def test_constants_and_vocabulary():
    tok = tokenizer.default_tokenizer()
    assert (tokenizer.SOT, tokenizer.EOT, tokenizer.VOCAB_SIZE) == (49406, 49407, 49408)
    assert len(tok.decoder) == tokenizer.VOCAB_SIZE
    assert tok.decoder[tokenizer.SOT] == "<|startoftext|>" and tok.decoder[tokenizer.EOT] == "<|endoftext|>"


def test_batch_matches_open_clip_ids():
    texts = [text for text, _ in ORACLE]
    tokens = tokenizer.tokenize(texts)
    assert tokens.dtype == np.int32 and tokens.shape == (len(ORACLE), 77)
    for row, (text, ids) in zip(tokens, ORACLE):
        expected = np.zeros(77, np.int32)
        expected[:len(ids)] = ids
        np.testing.assert_array_equal(row, expected, err_msg=repr(text))


def test_short_context_truncation_keeps_eot_last():
    # open_clip.tokenizer.tokenize([LONG_TEXT], 16)
    expected = [49406, 518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929, 518, 3712, 2866, 3240, 18911, 49407]
    assert tokenizer.tokenize(LONG_TEXT, 16).tolist() == [expected]
    assert tokenizer.tokenize(["a photo of a cat."], 8).tolist() == [ORACLE[0][1]]  # fits exactly: unchanged
    assert tokenizer.tokenize(["a photo of a cat."], 7).tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407]]


def test_truncate_equals_tokenizing_at_the_shorter_length():
    texts = [text for text, _ in ORACLE]
    tokens = tokenizer.tokenize(texts, 77)
    for length in (2, 8, 16, 40):
        np.testing.assert_array_equal(tokenizer.truncate(tokens, length), tokenizer.tokenize(texts, length))
    # Leading dims are kept, zero (padding) rows stay zero, a longer length zero-pads.
    stacked = np.stack([tokens[:3], np.zeros_like(tokens[:3])])  # [2, 3, 77]
    cut = tokenizer.truncate(stacked, 5)
    assert cut.shape == (2, 3, 5) and cut.dtype == np.int32 and not cut[1].any()
    np.testing.assert_array_equal(cut[0], tokenizer.tokenize(texts[:3], 5))
    padded = tokenizer.truncate(tokens[:2, :10], 12)
    np.testing.assert_array_equal(padded, np.pad(tokens[:2, :10], [(0, 0), (0, 2)]))
    assert tokenizer.truncate(tokens[0].tolist(), 4).tolist() == [49406, 320, 1125, 49407]


def test_decode_round_trips_cleaned_text():
    assert tokenizer.decode(tokenizer.tokenize("A  small RED disc &amp; a striped body")[0]) == \
        "a small red disc & a striped body"
    assert tokenizer.decode(tokenizer.tokenize(["naïve café", ""])) == ["naïve café", ""]


def test_bpe_and_text_caches_are_used():
    tok = tokenizer.default_tokenizer()
    tok.encode("zebra-striped wombats")
    hits = tok.bpe.cache_info().hits
    tok.encode("Zebra-striped  wombats")
    assert tok.bpe.cache_info().hits == hits + 4  # zebra, -, striped, wombats
    first = tokenizer.tokenize(["wombats on a zebra crossing"])
    text_hits = tokenizer._encode_cached.cache_info().hits
    np.testing.assert_array_equal(tokenizer.tokenize(["wombats on a zebra crossing"]), first)
    assert tokenizer._encode_cached.cache_info().hits == text_hits + 1


def test_bad_input_errors():
    with pytest.raises(TypeError, match="text 1 is bytes"):
        tokenizer.tokenize(["ok", b"bytes"])
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.tokenize(["ok"], 1)
    with pytest.raises(ValueError, match="integer array"):
        tokenizer.truncate(np.zeros((2, 3), np.float32), 2)
