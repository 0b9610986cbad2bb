"""CLIP byte-level BPE tokenizer, reproducing OpenAI CLIP's `simple_tokenizer.py`.

Same algorithm as https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py as used by
FlashFace (`ldm/data/tokenizers.py`, `CLIPTokenizer(padding='eos')`): ftfy + double HTML unescape,
whitespace collapse, lower-case, the CLIP pre-tokenizer regex, byte-level BPE over the first
48894 merges of `bpe_simple_vocab_16e6.txt.gz`, then `<|startoftext|> tokens <|endoftext|>` padded
with `<|endoftext|>`. Pure Python + NumPy (no torch) so the slim runtime can use it.
"""

from __future__ import annotations

import gzip
import html
import logging
import zlib
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import ftfy
import numpy as np
import regex

from ..errors import InputError, WeightsError

log = logging.getLogger(__name__)

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: lines [1, 48895) of the vocabulary file
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CACHE_LIMIT = 20000  # words whose BPE result is memoised

# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other symbols.
_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character table (`bytes_to_unicode`), in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)  # non-printable bytes move past Latin-1
            extra += 1
    return table  # printable bytes first, then the remapped ones: the first 256 vocabulary entries


def clean_text(text: str) -> str:
    """CLIP's `basic_clean` + `whitespace_clean` + lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """The BPE merge list of a CLIP vocabulary file; `WeightsError` naming the path if unusable."""
    if not path.is_file():
        raise WeightsError(f"tokenizer vocabulary {str(path)!r} does not exist")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise WeightsError(f"tokenizer vocabulary {str(path)!r} is corrupt: {exc}") from exc
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    bad = next((i + 2 for i, m in enumerate(merges) if len(m) != 2), None)
    if len(merges) != NUM_MERGES or bad is not None:
        why = f"line {bad} is not a merge pair" if bad else f"{len(merges)} merges, expected {NUM_MERGES}"
        raise WeightsError(f"tokenizer vocabulary {str(path)!r} is not a CLIP BPE file: {why}")
    return merges  # type: ignore[return-value]


class Truncation(NamedTuple):
    """What CLIP's fixed length cut from a prompt: the number of tokens dropped and both parts as text."""

    dropped: int
    kept: str
    lost: str


class ClipTokenizer:
    """Prompts -> CLIP token ids, identical to FlashFace's `CLIPTokenizer(padding='eos')`."""

    def __init__(self, vocab_path: str | Path | None = None, length: int = 77):
        if length < 2:
            raise InputError(f"tokenizer length must be at least 2, got {length}")
        self.vocab_path = Path(vocab_path) if vocab_path is not None else self.packaged_vocab()
        self.length = length
        merges = _read_merges(self.vocab_path)
        self._bytes = byte_to_char()
        chars = list(self._bytes.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.decoder: dict[int, str] = dict(enumerate(tokens))
        self._byte_of = {c: b for b, c in self._bytes.items()}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(tokens)
        self._cache: dict[str, tuple[str, ...]] = {}
        log.debug("tokenizer: %d tokens from %s", self.vocab_size, self.vocab_path)

    @staticmethod
    def packaged_vocab() -> Path:
        """Path of the vocabulary shipped with the package."""
        return Path(__file__).resolve().parent / "assets" / VOCAB_NAME

    def bpe(self, word: str) -> tuple[str, ...]:
        """Byte-level BPE of one pre-token (CLIP `bpe`): repeatedly merge the lowest-ranked adjacent pair."""
        if word in (SOT, EOT):
            return (word,)
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, NUM_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
        self._cache[word] = result
        return result

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens or truncation."""
        ids: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            mapped = "".join(self._bytes[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        """BPE ids -> text (CLIP `decode`: pieces joined, bytes restored, `</w>` read as a space)."""
        pieces = "".join(self.decoder[i] for i in ids if i not in (self.sot_id, self.eot_id))
        data = bytearray(self._byte_of[c] for c in pieces)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def truncation(self, text: str) -> Truncation | None:
        """What `encode_one` drops from `text` (CLIP reads `length - 2` tokens), or None if it fits."""
        ids = self.tokenize(text)
        keep = self.length - 2
        if len(ids) <= keep:
            return None
        return Truncation(len(ids) - keep, self.decode(ids[:keep]), self.decode(ids[keep:]))

    def encode_one(self, text: str) -> list[int]:
        """`[SOT] + ids[:length-2] + [EOT]`, padded with EOT to `length`."""
        ids = [self.sot_id, *self.tokenize(text)[: self.length - 2], self.eot_id]
        return ids + [self.eot_id] * (self.length - len(ids))

    def encode(self, prompts: str | list[str]) -> np.ndarray:
        """Prompt(s) -> int64 ids [P, length] (a single string gives P = 1)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        out = np.empty((len(prompts), self.length), dtype=np.int64)  # [P, L]
        for i, prompt in enumerate(prompts):
            out[i] = self.encode_one(prompt)
        return out

    __call__ = encode
