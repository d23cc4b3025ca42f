"""Text in: a bundle's own tokenizer, and batches of token rows of different lengths.

A text bundle (`Manifest.text` set) ships the `tokenizer.json` it was trained with (hashed in the
manifest like every file). The server tokenizes with the `tokenizers` library (Rust, no torch):
special tokens added, truncation to the bundle's `max_length`, **no padding to a fixed length**: a
batch is padded on the right to its longest row only, and the attention mask says which positions
are real. `model_export` builds its training data through the same class, so the ids a client gets
in the server are the ids the model was trained and checked on.

`TokenRows` is what flows between the stages of a text model: the hidden state (or, before stage
0, the token ids) together with the attention mask. Selecting rows trims the padding columns no
remaining row needs, merging rows of different lengths pads them to the longest, so survivors of
batches with different lengths re-batch into one stage run (server/engine/runtime.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.errors import BadRequest, BundleError

if TYPE_CHECKING:
    from server.bundle import Bundle

TEXT_INPUT = "text"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"


class TextTokenizer:
    """`tokenizer.json` -> (input_ids, attention_mask), int64 [N, longest], padded on the right."""

    def __init__(self, path: str | Path, max_length: int):
        from tokenizers import Tokenizer

        if max_length < 2:
            raise BundleError(f"{path}: max_length must be >= 2 (room for the special tokens), got {max_length}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exceptions for a damaged file
            raise BundleError(f"{path}: not a readable tokenizer.json ({err})") from err
        tok.no_padding()
        tok.enable_truncation(max_length)
        self._tok = tok
        self.max_length = max_length
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        pad = tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else int(pad)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._tok.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        if 0 in lengths:  # a tokenizer without special tokens turns "" into nothing: no row to attend over
            raise BadRequest(f"sentence {lengths.index(0)} gives no tokens with this model's tokenizer")
        width = max(lengths, default=0)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, (e, n) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :n] = e.ids
            mask[row, :n] = 1
        return ids, mask

    def encode_bytes(self, items: list[bytes], name: str = TEXT_INPUT) -> tuple[np.ndarray, np.ndarray]:
        """UTF-8 byte strings (the V2 BYTES elements) -> ids and mask; BadRequest for invalid UTF-8."""
        texts = []
        for i, item in enumerate(items):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise BadRequest(f"input {name!r} element {i} is not valid UTF-8 ({err.reason} at byte "
                                 f"{err.start})") from None
        return self.encode(texts)


@functools.lru_cache(maxsize=16)
def _tokenizer(path: str, sha256: str, max_length: int) -> TextTokenizer:
    return TextTokenizer(path, max_length)


def tokenizer_for(bundle: Bundle) -> TextTokenizer:
    """The bundle's tokenizer, loaded once per file and setting (the engine loads it at start, so a
    damaged tokenizer.json stops the server there, not at the first request)."""
    text = bundle.manifest.text
    if text is None:
        raise BadRequest(f"model {bundle.name!r} does not take text")
    return _tokenizer(str(bundle.root / text.file), text.sha256, text.max_length)


@dataclass(frozen=True)
class TokenRows:
    """Rows of a text model between stages: `data` [N, T, ...] (token ids before stage 0, the hidden
    state after) and `mask` int64 [N, T], 1 on real positions, padding on the right."""

    data: Any
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)


def check_mask(ids: np.ndarray, mask: np.ndarray, max_length: int) -> None:
    """The client-tokenized inputs: same shape [N, T], T within the bundle's max length, a 0/1
    mask that is right-padded (ones first) with at least one real token per row."""
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise BadRequest(f"{INPUT_IDS!r} and {ATTENTION_MASK!r} must both have shape [N, T], got "
                         f"{list(ids.shape)} and {list(mask.shape)}")
    if ids.shape[1] > max_length:
        raise BadRequest(f"sequences of {ids.shape[1]} tokens exceed this model's max_length {max_length}")
    if len(mask) == 0:
        return
    if ids.shape[1] == 0:
        raise BadRequest(f"{INPUT_IDS!r} has rows of 0 tokens; every row needs at least one")
    if not np.isin(mask, (0, 1)).all():
        raise BadRequest(f"{ATTENTION_MASK!r} must hold only 0 and 1")
    if mask.shape[1] and ((np.diff(mask, axis=1) > 0).any() or (mask[:, 0] == 0).any()):
        raise BadRequest(f"{ATTENTION_MASK!r} must be right-padded: ones first, at least one per row")
    if (ids < 0).any():
        raise BadRequest(f"{INPUT_IDS!r} must be non-negative token ids")


def trim(rows: TokenRows) -> TokenRows:
    """Drop padding columns no row needs (host arrays only)."""
    width = int(rows.lengths().max(initial=0))
    if width == rows.mask.shape[1]:
        return rows
    return TokenRows(np.ascontiguousarray(rows.data[:, :width]), np.ascontiguousarray(rows.mask[:, :width]))


def pad_concat(parts: list[TokenRows]) -> TokenRows:
    """Rows of several batches as one, each padded on the right to the longest (host arrays only)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.mask.shape[1] for p in parts)

    def pad(a: np.ndarray) -> np.ndarray:
        extra = width - a.shape[1]
        return a if extra == 0 else np.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))

    return TokenRows(np.concatenate([pad(p.data) for p in parts]), np.concatenate([pad(p.mask) for p in parts]))
