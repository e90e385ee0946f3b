"""Corpora: the built-in one (the Python standard library's sources), text, JSONL and token files, split into
training and validation streams by a hash of each document's name (a lone document by position); and
pre-tokenisation to a token file."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from moe_diff.config import DataConfig
from moe_diff.data.text import Utf8Check
from moe_diff.data.tokenizers import Tokenizer, load_tokenizer, token_dtype
from moe_diff.errors import DataError

SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class Document:
    name: str  # path from its source's root, `name:line` or `name:index`; decides the train/validation split
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


def source_root(entry: str) -> Path:
    """The folder a data.source entry's document names are relative to: a file's own folder, a directory, or a
    glob's folders before its first wildcard."""
    path = Path(entry)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), path.parts))
    return Path(*fixed) if fixed else Path()


def corpus_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(document name, path) of every file the configured sources name, in order. A name is the file's path from
    its entry's root (`source_root`), so the split holds wherever the data lies and however it is named; a file
    that several entries name keeps its first name, so that all its copies fall on one side of the split."""
    files, names = [], {}
    for entry in cfg.sources:
        if entry == "builtin":
            named = builtin_files()
        else:
            root = source_root(entry)
            named = [(Path(os.path.relpath(p, root)).as_posix(), p) for p in source_files(entry)]
        files += [(names.setdefault(path.resolve(), name), path) for name, path in named]
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


def _jsonl_documents(name: str, path: Path, field: str, check: Utf8Check) -> Iterator[Document]:
    measured = False
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if not measured and "\ufffd" in line:
                check.admit(path)
                measured = True
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number} has no string field {field!r} (data.text_field)")
            yield Document(f"{name}:{number}", text=record[field])


def _token_documents(name: str, tokens: np.ndarray, eot_id: int) -> Iterator[Document]:
    """The runs between end-of-text tokens, named `name:index`."""
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends + 1])
    for index, (start, stop) in enumerate(zip(starts, np.append(ends, len(tokens)), strict=True)):
        if stop > start:
            yield Document(f"{name}:{index}", tokens=tokens[start:stop])


def iter_documents(cfg: DataConfig, tokenizer: Tokenizer, tell: Callable[[str], None] | None = None,
                   progress: bool = False) -> Iterator[Document]:
    """Every document of the configured sources, in a fixed order; `tell` hears which text files held invalid
    UTF-8 (a file with too much of it is refused where the sources name it, else left out)."""
    files, check = corpus_files(cfg), Utf8Check()
    named = {Path(entry) for entry in cfg.sources if Path(entry).is_file()}
    for name, path in track(files, description="tokenizing") if progress else files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(name, path, cfg.text_field, check)
        elif path.suffix == ".bin":
            yield from _token_documents(name, read_token_file(path, cfg, tokenizer), tokenizer.eot_id)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if "\ufffd" not in text or check.admit(path, named=path in named):
                yield Document(name, text=text)
    for note in check.notes() if tell is not None else ():
        tell(note)


def document_tokens(document: Document, tokenizer: Tokenizer) -> np.ndarray:
    """The document's token ids (uint32) followed by end-of-text."""
    tokens = document.tokens if document.tokens is not None else tokenizer.encode(document.text)
    return np.append(np.asarray(tokens, dtype=np.uint32), np.uint32(tokenizer.eot_id))


def is_validation(name: str, val_fraction: float) -> bool:
    """The deterministic split: a hash of the document's name, independent of file order."""
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


@dataclass
class Corpus:
    train: np.ndarray  # token stream: documents each followed by eot_id
    val: np.ndarray
    vocab_size: int  # the tokenizer's, or more when the data holds larger ids (token files)
    eot_id: int
    n_documents: tuple[int, int]  # (train, validation)
    val_names: list[str]  # the validation documents' names, in stream order


def split_digest(corpus: Corpus) -> str:
    """16 hex digits naming the split: the validation documents' names and both streams' lengths, so that a resumed
    run can tell whether it reads the data it was trained on."""
    described = "\n".join([f"{len(corpus.train)} {len(corpus.val)}", *corpus.val_names])
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer, tell: Callable[[str], None] | None = None) -> Corpus:
    """Tokenise the sources and split their documents into training and validation streams.

    Documents are assigned by a hash of their names. A lone .bin source is split without
    copying (it may be larger than memory): its last val_fraction, from a document boundary on,
    is the validation stream. A lone document is split by position (`tell` hears so, and which
    text files held invalid UTF-8).
    """
    lone = cfg.sources[0] if len(cfg.sources) == 1 else ""
    if lone.endswith(".bin") and Path(lone).is_file():
        return _token_file_corpus(Path(lone), cfg, tokenizer, tell)
    documents = []
    top = tokenizer.vocab_size - 1
    for document in iter_documents(cfg, tokenizer, tell):
        tokens = document_tokens(document, tokenizer)
        if len(tokens) > 1:
            documents.append((document.name, tokens))
            top = max(top, int(tokens.max()))
    if not documents:
        raise DataError(f"data.source={cfg.source!r} holds no non-empty documents")
    dtype = token_dtype(top + 1)
    if len(documents) == 1:
        name, tokens = documents[0]
        return _position_split(name, tokens.astype(dtype), top + 1, tokenizer.eot_id, cfg.val_fraction, tell)
    splits: dict[bool, list[tuple[str, np.ndarray]]] = {False: [], True: []}
    for name, tokens in documents:
        splits[is_validation(name, cfg.val_fraction)].append((name, tokens))
    if not splits[True]:
        splits[True].append(splits[False].pop())
    if not splits[False]:
        splits[False].append(splits[True].pop())
    train, val = (np.concatenate([tokens for _, tokens in splits[is_val]], dtype=dtype)
                  for is_val in (False, True))
    return Corpus(train, val, top + 1, tokenizer.eot_id, (len(splits[False]), len(splits[True])),
                  [name for name, _ in splits[True]])


def _token_file_corpus(path: Path, cfg: DataConfig, tokenizer: Tokenizer,
                       tell: Callable[[str], None] | None) -> Corpus:
    """Split one token file at the document boundary nearest to (1 - val_fraction) of its length."""
    tokens = read_token_file(path, cfg, tokenizer)
    ends = np.flatnonzero(tokens == tokenizer.eot_id)
    boundaries = ends[ends < len(tokens) - 1] + 1
    vocab_size = max(tokenizer.vocab_size, int(tokens.max()) + 1)
    if not len(boundaries):
        return _position_split(f"{path.name}:0", tokens, vocab_size, tokenizer.eot_id, cfg.val_fraction, tell)
    cut = int(boundaries[np.abs(boundaries - len(tokens) * (1 - cfg.val_fraction)).argmin()])
    n_train = int(np.searchsorted(ends, cut))
    n_val = len(ends) - n_train + int(tokens[-1] != tokenizer.eot_id)
    return Corpus(tokens[:cut], tokens[cut:], vocab_size, tokenizer.eot_id, (n_train, n_val),
                  [f"{path.name}:{n_train + i}" for i in range(n_val)])


def _position_split(name: str, tokens: np.ndarray, vocab_size: int, eot_id: int, val_fraction: float,
                    tell: Callable[[str], None] | None) -> Corpus:
    """One document: its first (1 - val_fraction) of tokens for training, the rest for validation."""
    cut = round(len(tokens) * (1 - val_fraction))
    if tell is not None:
        tell(f"data.source holds a single document ({name}, {len(tokens):,} tokens): split by position, its first "
             f"{cut:,} tokens for training and the last {len(tokens) - cut:,} for validation "
             f"(data.val_fraction={val_fraction})")
    return Corpus(tokens[:cut], tokens[cut:], vocab_size, eot_id, (1, 1), [name])


def tokenize_corpus(cfg: DataConfig, out_path: str | Path, progress: bool = True,
                    tell: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write every document's tokens, in order, to a .bin file (raw little-endian) with a .json sidecar.

    Both files are written under temporary names and renamed into place; the sidecar's n_tokens
    lets readers notice a .bin and a sidecar from different runs. `tell` hears which text files
    held invalid UTF-8.
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
            for document in iter_documents(cfg, tokenizer, tell, progress):
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
