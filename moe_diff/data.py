"""Training data: tokenizers, corpora (built-in, text, JSONL, token files), packing and sampling."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import track

from moe_diff.config import DataConfig
from moe_diff.errors import MoeDiffError

SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class DataError(MoeDiffError, ValueError):
    """Data that cannot be used: a missing path, an empty corpus, a malformed record."""


# ---- tokenizers ------------------------------------------------------------------------------

class Tokenizer(Protocol):
    name: str  # "byte" or the tokenizer.json path; recorded in token files' sidecars
    vocab_size: int
    eot_id: int  # ends every document

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document."""

    name, vocab_size, eot_id = "byte", 257, 256

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
            self._tokenizer = TokenizerFile.from_file(path)
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


# ---- files and documents ---------------------------------------------------------------------

@dataclass
class Document:
    name: str  # relative path, `path:line` or `path:index`; decides the train/validation split
    text: str | None = None
    tokens: np.ndarray | None = None  # pre-tokenised documents (from .bin files), without end-of-text


def builtin_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files; tests and installed packages are skipped."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]  # pruned: os.walk never enters them
        paths = [Path(directory, f) for f in files if f.endswith(".py")]
        found += [(os.path.relpath(p, root), p) for p in paths]
    return sorted(found)


def _is_sidecar(path: Path) -> bool:
    return path.suffix == ".json" and path.with_suffix(".bin").is_file()


def source_files(entry: str) -> list[Path]:
    """The files a data.source entry names: a file, a directory (recursively) or a glob.

    As with glob, hidden files are skipped; so are the .json sidecars of .bin token files.
    """
    if Path(entry).is_file():
        return [Path(entry)]
    pattern = os.path.join(entry, "**", "*") if Path(entry).is_dir() else entry
    matches = map(Path, sorted(glob.glob(pattern, recursive=True)))
    files = [p for p in matches if p.is_file() and not _is_sidecar(p)]
    if not files:
        raise DataError(f"data.source entry {entry!r} matches no file")
    return files


def corpus_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(document name, path) of every file the configured sources name, in order."""
    files = []
    for entry in cfg.sources:
        files += builtin_files() if entry == "builtin" else [(str(p), p) for p in source_files(entry)]
    return files


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        meta = {key: meta[key] for key in ("dtype", "eot_id", "tokenizer", "n_tokens")}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a token file sidecar written by tokenize ({error!r})") from None
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path} says dtype={meta['dtype']!r}; token files hold uint16 or uint32")
    return meta


def read_token_file(path: Path, cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
    """A .bin token file as a read-only memmap; its element type is from the sidecar or data.token_dtype."""
    sidecar = path.with_suffix(".json")
    meta = _read_sidecar(sidecar) if sidecar.is_file() else None
    if meta is None and cfg.token_dtype == "auto":
        raise DataError(f"{path} has no .json sidecar saying its element type; set data.token_dtype to "
                        "uint16 or uint32")
    if meta is not None and meta["eot_id"] != tokenizer.eot_id:
        raise DataError(f"{path} was tokenised with {meta['tokenizer']!r}, whose documents end with token "
                        f"{meta['eot_id']}, but data.tokenizer={tokenizer.name!r} ends them with "
                        f"{tokenizer.eot_id}; set data.tokenizer to the tokenizer that wrote the file")
    dtype = np.dtype(meta["dtype"] if meta else cfg.token_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise DataError(f"{path} holds {size} bytes, not a positive whole number of {dtype.name} tokens "
                        "(data.token_dtype)")
    if meta is not None and size != meta["n_tokens"] * dtype.itemsize:
        raise DataError(f"{path} holds {size // dtype.itemsize} tokens but its sidecar says "
                        f"{meta['n_tokens']}; tokenise the sources again")
    return np.memmap(path, dtype=dtype, mode="r")


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number} has no string field {field!r} (data.text_field)")
            yield Document(f"{path}:{number}", text=record[field])


def _token_documents(name: str, tokens: np.ndarray, eot_id: int) -> Iterator[Document]:
    """The runs between end-of-text tokens, named `name:index`."""
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends + 1])
    for index, (start, stop) in enumerate(zip(starts, np.append(ends, len(tokens)), strict=True)):
        if stop > start:
            yield Document(f"{name}:{index}", tokens=tokens[start:stop])


def iter_documents(cfg: DataConfig, tokenizer: Tokenizer, progress: bool = False) -> Iterator[Document]:
    """Every document of the configured sources, in a fixed order."""
    files = corpus_files(cfg)
    for name, path in track(files, description="tokenizing") if progress else files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, cfg.text_field)
        elif path.suffix == ".bin":
            yield from _token_documents(name, read_token_file(path, cfg, tokenizer), tokenizer.eot_id)
        else:
            yield Document(name, text=path.read_text(encoding="utf-8", errors="replace"))


def document_tokens(document: Document, tokenizer: Tokenizer) -> np.ndarray:
    """The document's token ids (uint32) followed by end-of-text."""
    tokens = document.tokens if document.tokens is not None else tokenizer.encode(document.text)
    return np.append(np.asarray(tokens, dtype=np.uint32), np.uint32(tokenizer.eot_id))


def is_validation(name: str, val_fraction: float) -> bool:
    """The deterministic split: a hash of the document's name, independent of file order."""
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


# ---- corpus ----------------------------------------------------------------------------------

@dataclass
class Corpus:
    train: np.ndarray  # token stream: documents each followed by eot_id
    val: np.ndarray
    vocab_size: int  # the tokenizer's, or more when the data holds larger ids (token files)
    eot_id: int
    n_documents: tuple[int, int]  # (train, validation)
    val_names: list[str]  # the validation documents' names, in stream order


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """Tokenise the sources and split their documents into training and validation streams.

    Documents are assigned by a hash of their names. A lone .bin source is split without
    copying (it may be larger than memory): its last val_fraction, from a document boundary on,
    is the validation stream.
    """
    lone = cfg.sources[0] if len(cfg.sources) == 1 else ""
    if lone.endswith(".bin") and Path(lone).is_file():
        return _token_file_corpus(Path(lone), cfg, tokenizer)
    splits: dict[bool, list[tuple[str, np.ndarray]]] = {False: [], True: []}
    top = tokenizer.vocab_size - 1
    for document in iter_documents(cfg, tokenizer):
        tokens = document_tokens(document, tokenizer)
        if len(tokens) > 1:
            splits[is_validation(document.name, cfg.val_fraction)].append((document.name, tokens))
            top = max(top, int(tokens.max()))
    if sum(map(len, splits.values())) < 2:
        raise DataError(f"data.source={cfg.source!r} holds fewer than two non-empty documents; a corpus "
                        "needs documents for both training and validation")
    if not splits[True]:
        splits[True].append(splits[False].pop())
    if not splits[False]:
        splits[False].append(splits[True].pop())
    dtype = token_dtype(top + 1)
    train, val = (np.concatenate([tokens for _, tokens in splits[is_val]], dtype=dtype)
                  for is_val in (False, True))
    return Corpus(train, val, top + 1, tokenizer.eot_id, (len(splits[False]), len(splits[True])),
                  [name for name, _ in splits[True]])


def _token_file_corpus(path: Path, cfg: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """Split one token file at the document boundary nearest to (1 - val_fraction) of its length."""
    tokens = read_token_file(path, cfg, tokenizer)
    ends = np.flatnonzero(tokens == tokenizer.eot_id)
    boundaries = ends[ends < len(tokens) - 1] + 1
    if not len(boundaries):
        raise DataError(f"{path} holds a single document; a corpus needs documents for both training and "
                        "validation")
    cut = int(boundaries[np.abs(boundaries - len(tokens) * (1 - cfg.val_fraction)).argmin()])
    n_train = int(np.searchsorted(ends, cut))
    n_val = len(ends) - n_train + int(tokens[-1] != tokenizer.eot_id)
    vocab_size = max(tokenizer.vocab_size, int(tokens.max()) + 1)
    return Corpus(tokens[:cut], tokens[cut:], vocab_size, tokenizer.eot_id, (n_train, n_val),
                  [f"{path}:{n_train + i}" for i in range(n_val)])


def tokenize_corpus(cfg: DataConfig, out_path: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write every document's tokens, in order, to a .bin file (raw little-endian) with a .json sidecar.

    Both files are written under temporary names and renamed into place; the sidecar's n_tokens
    lets readers notice a .bin and a sidecar from different runs.
    """
    out = Path(out_path)
    if out.suffix != ".bin":
        raise DataError(f"token file {str(out)!r} must end in .bin (sources are read by their suffix)")
    tokenizer = load_tokenizer(cfg)
    dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, partial_sidecar = out.with_name(out.name + ".partial"), out.with_name(out.name + ".json.partial")
    n_tokens = n_documents = 0
    try:
        with partial.open("wb") as file:
            for document in iter_documents(cfg, tokenizer, progress=progress):
                tokens = document_tokens(document, tokenizer)
                if len(tokens) == 1:  # empty documents are dropped, as load_corpus does
                    continue
                if tokens.max() > np.iinfo(dtype).max:
                    raise DataError(f"{document.name} holds token id {tokens.max()}, beyond the {dtype.name} "
                                    f"range of data.tokenizer={tokenizer.name!r}")
                file.write(tokens.astype(dtype).tobytes())
                n_tokens, n_documents = n_tokens + len(tokens), n_documents + 1
        if n_tokens == 0:
            raise DataError(f"data.source={cfg.source!r} holds no non-empty documents")
        info = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "tokenizer": tokenizer.name, "n_tokens": n_tokens, "n_documents": n_documents}
        partial_sidecar.write_text(json.dumps(info, indent=1))
        os.replace(partial_sidecar, out.with_suffix(".json"))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        partial_sidecar.unlink(missing_ok=True)
    return info


# ---- packing and sampling --------------------------------------------------------------------

@dataclass
class Batch:
    tokens: torch.Tensor  # [b, T] inputs
    targets: torch.Tensor  # [b, T] the next tokens
    positions: torch.Tensor  # [b, T] restart at 0 after each end-of-text
    document_ids: torch.Tensor  # [b, T] count the end-of-texts before each token in its window

    def slice(self, start: int, stop: int) -> Batch:
        """Rows start:stop, e.g. one data-parallel rank's or one micro-batch's share."""
        return Batch(*(t[start:stop] for t in (self.tokens, self.targets, self.positions, self.document_ids)))

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.tokens, self.targets, self.positions, self.document_ids)))


class PackedSequences:
    """A token stream cut into windows of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, stream: np.ndarray, seq_len: int, eot_id: int, split: str = "train"):
        if len(stream) < seq_len + 1:
            raise DataError(f"the {split} split has {len(stream):,} tokens, fewer than train.seq_len + 1 = "
                            f"{seq_len + 1}; use more data, a shorter train.seq_len or (validation) a larger "
                            "data.val_fraction")
        self.stream, self.seq_len, self.eot_id = stream, seq_len, eot_id

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [T + 1], positions [T], document ids [T]) of window `index`."""
        start = index * self.seq_len
        tokens = np.asarray(self.stream[start:start + self.seq_len + 1], dtype=np.int64)
        after_eot = np.concatenate([[False], tokens[:-2] == self.eot_id])  # a new document starts here
        document_ids = np.cumsum(after_eot)
        steps = np.arange(self.seq_len)
        starts = np.maximum.accumulate(np.where(after_eot, steps, 0))
        return tokens, steps - starts, document_ids


def make_batch(windows: PackedSequences, indices: Sequence[int]) -> Batch:
    tokens, positions, document_ids = zip(*(windows.window(i) for i in indices), strict=True)
    tokens = torch.from_numpy(np.stack(tokens))  # [b, T + 1]
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                 torch.from_numpy(np.stack(positions)), torch.from_numpy(np.stack(document_ids)))


class BatchSampler:
    """Global batches of window indices: a seeded permutation per epoch, resumable mid-epoch.

    Batches run on across epoch boundaries; state_dict() is the position in that endless sequence.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int):
        if n_windows < 1 or batch_size < 1:
            raise ValueError(f"BatchSampler needs n_windows >= 1 and batch_size >= 1, got {n_windows} and "
                             f"{batch_size}")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_indices(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.batch_size:
            if self.offset == self.n_windows:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(indices), self.n_windows - self.offset)
            indices += self._order[self.offset:self.offset + take].tolist()
            self.offset += take
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.n_windows:
            raise DataError(f"sampler state {state} does not fit {self.n_windows} windows; the data or "
                            "train.seq_len changed since the checkpoint")
        self.epoch, self.offset = epoch, offset
        self._order = self._permutation(epoch)


def fixed_batches(windows: PackedSequences, batch_size: int, n_batches: int) -> list[Batch]:
    """The same validation batches every time: evenly spaced windows (all of them if too few)."""
    count = min(len(windows), batch_size * n_batches)
    indices = (np.arange(count) * len(windows) // count).tolist()
    return [make_batch(windows, indices[i:i + batch_size]) for i in range(0, count, batch_size)]
