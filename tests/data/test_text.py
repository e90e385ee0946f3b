"""Text sources that are not valid UTF-8: refused above 1% of a file's bytes, named in a note below it."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config  # tests/ is on the path
from rich.console import Console

from moe_diff.cli import main
from moe_diff.config import DataConfig
from moe_diff.data import ByteTokenizer, DataError, load_corpus, tokenize_corpus
from moe_diff.train import train

BYTES = ByteTokenizer()
NOISE = np.random.default_rng(0).bytes(4000)
INVALID = sum("\udc80" <= c <= "\udcff" for c in NOISE.decode("utf-8", errors="surrogateescape"))  # bytes


def texts(directory: Path) -> Path:
    directory.mkdir()
    for i in range(6):
        (directory / f"doc{i}.txt").write_text(f"document {i}: " + "héllo wörld " * 20)
    return directory


def test_tokenize_refuses_random_bytes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "noise.txt").write_bytes(NOISE)
    assert main(["tokenize", str(tmp_path / "noise.txt"), "--out", str(tmp_path / "tokens.bin")]) == 2
    assert (f"{tmp_path / 'noise.txt'} is not UTF-8 text: {INVALID / 4000:.2%} of its 4,000 bytes are not valid "
            "UTF-8, more than the 1% allowed; convert it to UTF-8 (iconv -f ENCODING -t UTF-8) or leave it out of "
            "the sources") in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "tokens.bin").exists()


def test_train_refuses_a_random_file_it_names_and_leaves_one_out_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "noise.txt").write_bytes(NOISE)
    with pytest.raises(DataError, match=r"noise.txt is not UTF-8 text: \d+\.\d\d% of its 4,000 bytes"):
        train(small_config(tmp_path / "run", f"data.source=[{texts(tmp_path / 'texts')},{tmp_path / 'noise.txt'}]"))
    (tmp_path / "noise.txt").rename(tmp_path / "texts" / "noise.bin.txt")
    said = io.StringIO()
    train(small_config(tmp_path / "run", f"data.source={tmp_path / 'texts'}", "train.max_steps=1"),
          Console(file=said, width=1000))
    assert (f"left out {tmp_path / 'texts' / 'noise.bin.txt'} ({INVALID:,} of 4,000 bytes, {INVALID / 4000:.2%}): not "
            "UTF-8 text (more than 1% of their bytes invalid), found in a data.source directory or glob"
            ) in " ".join(said.getvalue().split())


def test_jsonl_records_of_random_bytes_are_refused(tmp_path: Path) -> None:
    high = bytes(b | 0x80 for b in NOISE[:200])  # no quote, backslash or newline: the JSON stays valid
    (tmp_path / "r.jsonl").write_bytes(b"".join(b'{"text": "' + high + b'"}\n' for _ in range(5)))
    with pytest.raises(DataError, match="r.jsonl is not UTF-8 text"):
        load_corpus(DataConfig(source=str(tmp_path / "r.jsonl")), BYTES)


def test_a_few_invalid_bytes_are_read_as_replacement_characters_with_a_note(tmp_path: Path) -> None:
    source = texts(tmp_path / "texts")
    (source / "stray.txt").write_bytes(b"hello world " * 500 + b"\xff\xfe" + b"caf\xe9 " + b"more text " * 500)
    (tmp_path / "r.jsonl").write_bytes(json.dumps({"text": "abc " * 500}).encode() + b"\n"
                                       + b'{"text": "\xff ' + b"x" * 3000 + b'"}\n')
    (source / "literal.txt").write_text("a replacement character written on purpose: \ufffd")
    cfg = DataConfig(source=[str(source), str(tmp_path / "r.jsonl")], val_fraction=0.3)
    notes: list[str] = []
    corpus = load_corpus(cfg, BYTES, tell=notes.append)
    expected = (f"bytes that are not valid UTF-8 were read as U+FFFD in {source / 'stray.txt'} (3 of 11,007 bytes, "
                f"0.03%) and {tmp_path / 'r.jsonl'} (1 of 5,028 bytes, 0.02%); a file with more than 1% of them "
                "is refused")
    assert notes == [expected]
    assert "caf\ufffd " in BYTES.decode(np.concatenate([corpus.train, corpus.val]).tolist())
    notes.clear()
    tokenize_corpus(cfg, tmp_path / "tokens.bin", progress=False, tell=notes.append)
    assert notes == [expected]
