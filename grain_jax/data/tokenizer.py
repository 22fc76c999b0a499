"""The OpenAI CLIP byte-level BPE tokenizer, as GRAIN's reference uses it.

Vocabulary `bpe_simple_vocab_16e6.txt.gz` (from OpenAI CLIP via open_clip, MIT licence; see
NOTICE): 256 byte symbols + the same 256 with the end-of-word marker `</w>` + 48894 merges +
SOT + EOT = 49408 ids. A text is cleaned (ftfy fix, HTML-unescape twice, whitespace collapsed,
lowercased), split by the CLIP regex (contractions, letter runs, single digits, punctuation
runs), each piece's UTF-8 bytes are BPE-merged, and the sequence is `[SOT] ids [EOT]`,
zero-padded to the context length; a longer one is cut and its last token forced to EOT.

One deliberate difference from OpenAI's `simple_tokenizer.py`: the literal strings
"<|startoftext|>" / "<|endoftext|>" inside a text are ordinary characters here, not special
ids (as in open_clip), so EOT only ever marks the end (the text tower pools at it).

    tokenize(["a photo of a cat."])   # int32 [1, 77]: 49406 320 1125 539 320 2368 269 49407 0 ...
    truncate(tokens, 32)               # [..., 77] -> [..., 32], EOT kept last
    decode(tokens[0])                  # "a photo of a cat."
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # the reference keeps this many merge lines after the header
SOT = 49406
EOT = 49407
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"

# Contractions, letter runs, single digits, runs of other non-space characters (CLIP's regex,
# without its special-token alternatives).
_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (BPE works on these characters).

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) to 256 + k.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def clean(text: str) -> str:
    """The reference's text cleaning: ftfy, HTML unescape twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE over a vocabulary file; `encode` / `decode` of single texts.

    The BPE of each distinct pre-token is cached (`bpe_cache_size` entries): captions reuse a
    small set of words, so after warm-up almost every word is a cache hit.
    """

    def __init__(self, vocab_file: str = VOCAB_FILE, bpe_cache_size: int = 1 << 18):
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_file}: expected {NUM_MERGES} merge lines of two symbols after the header")
        byte_symbols = list(bytes_to_unicode().values())
        symbols = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges]
        symbols += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = symbols
        if len(self.encoder) != VOCAB_SIZE or self.encoder["<|endoftext|>"] != EOT:
            raise ValueError(f"{vocab_file}: vocabulary has {len(self.encoder)} symbols, expected {VOCAB_SIZE}")
        self.merge_ranks = {m: rank for rank, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token.

        Its UTF-8 bytes are mapped through `bytes_to_unicode`; then every occurrence (left to
        right) of the lowest-ranked adjacent pair is merged, repeatedly, starting from single
        characters with `</w>` on the last one.
        """
        chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
        word = [*chars[:-1], chars[-1] + END_OF_WORD]
        ranks = self.merge_ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self.encoder[symbol] for symbol in word)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without SOT/EOT."""
        ids: list[int] = []
        for piece in _PIECES.findall(clean(text)):
            ids.extend(self.bpe(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: SOT dropped, stops at the first EOT (padding follows it)."""
        symbols = []
        for i in ids:
            i = int(i)
            if i == EOT:
                break
            if i != SOT:
                symbols.append(self.decoder[i])
        text = bytearray(self.byte_decoder[c] for c in "".join(symbols)).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged vocabulary (loaded once per process)."""
    return Tokenizer()


@functools.lru_cache(maxsize=1 << 16)
def _encode_cached(text: str) -> tuple[int, ...]:
    """Whole-text cache: region descriptions and prompts repeat a lot, and cleaning (ftfy) is
    the costliest step once the BPE cache is warm."""
    return tuple(default_tokenizer().encode(text))


def _check_length(context_length: int) -> int:
    if int(context_length) != context_length or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2 (room for SOT and EOT), got {context_length!r}")
    return int(context_length)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """Texts -> int32 [N, context_length]: `[SOT] ids [EOT]`, zero-padded; too long: cut, EOT last.

    A single string is one text ([1, L]), like `clip.tokenize`.
    """
    context_length = _check_length(context_length)
    if isinstance(texts, str):
        texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize: text {row} is {type(text).__name__}, not str")
        ids = [SOT, *_encode_cached(text)[:context_length - 2], EOT]
        out[row, :len(ids)] = ids
    return out


def truncate(tokens: np.ndarray | Sequence, length: int) -> np.ndarray:
    """Token rows [..., L0] -> int32 [..., length] keeping EOT last (zero-padded if length > L0).

    A row whose content does not fit is cut and its last token set to EOT, exactly what
    `tokenize(text, length)` gives for the same text; all-zero (padding) rows stay zero.
    """
    length = _check_length(length)
    tokens = np.asarray(tokens)
    if tokens.ndim < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"truncate: tokens must be an integer array [..., L], got {tokens.dtype} {tokens.shape}")
    if length >= tokens.shape[-1]:
        pad = [(0, 0)] * (tokens.ndim - 1) + [(0, length - tokens.shape[-1])]
        return np.pad(tokens, pad).astype(np.int32)
    out = tokens[..., :length].astype(np.int32)
    cut = np.any(tokens[..., length:] != 0, axis=-1)
    out[..., -1] = np.where(cut, EOT, out[..., -1])
    return out


def decode(tokens: np.ndarray | Sequence) -> str | list[str]:
    """Text of one token row [L], or a list of texts for [N, L] (SOT/EOT/padding removed)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        return default_tokenizer().decode(tokens)
    if tokens.ndim == 2:
        return [default_tokenizer().decode(row) for row in tokens]
    raise ValueError(f"decode: tokens must be [L] or [N, L], got shape {tokens.shape}")
