"""Tokenizers: UTF-8 bytes (no files needed) or a Hugging Face tokenizer.json, and the vocabulary check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from moe_diff.config import DataConfig
from moe_diff.errors import DataError

EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    name: str  # "byte" or the tokenizer.json path; recorded in token files' sidecars
    vocab_size: int
    eot_id: int  # ends every document
    file_text: str | None  # the tokenizer.json read, as it was read (None: bytes), for checkpoints to store

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document."""

    name, vocab_size, eot_id, file_text = "byte", 257, 256, None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; documents end with its end-of-text token."""

    def __init__(self, path: str, eot_token: str | None = None):
        try:
            from tokenizers import Tokenizer as TokenizerFile
        except ImportError:
            raise DataError("data.tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
        if not Path(path).is_file():
            raise DataError(f"data.tokenizer={path!r}: no such file (use 'byte' or a tokenizer.json path)")
        try:
            self.file_text = Path(path).read_bytes().decode("utf-8")  # newlines kept as they are
            self._tokenizer = TokenizerFile.from_str(self.file_text)
        except Exception as error:  # the library raises a bare Exception for unreadable files
            raise DataError(f"data.tokenizer={path!r} is not readable as a tokenizer.json: {error}") from None
        self.name = path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eot_token,) if eot_token else EOT_CANDIDATES
        found = [i for i in map(self._tokenizer.token_to_id, candidates) if i is not None]
        if not found:
            raise DataError(f"data.eot_token: {path} has none of {', '.join(candidates)}; set data.eot_token "
                            "to its end-of-text token")
        self.eot_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    return ByteTokenizer() if cfg.tokenizer == "byte" else HFTokenizer(cfg.tokenizer, cfg.eot_token)


def check_vocabulary(vocab_size: int, tokenizer: Tokenizer, corpus_vocab_size: int | None = None) -> None:
    """DataError unless a model with `vocab_size` ids covers every id of the tokenizer (and of a corpus, whose token
    files may hold larger ones): checked before any work, so that no command fails part-way on an id past the
    model's vocabulary."""
    needed = max(tokenizer.vocab_size, corpus_vocab_size or 0)
    if needed > vocab_size:
        holder = f"data.tokenizer={tokenizer.name!r} ({tokenizer.vocab_size} ids)"
        if needed > tokenizer.vocab_size:
            holder += f" and its corpus (ids up to {needed - 1})"
        raise DataError(f"model.vocab_size={vocab_size} is too small for {holder}: the model needs at least "
                        f"{needed}; use the tokenizer it was trained with")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest element type of a token stream whose ids are below `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
