"""A source of one document (a text file, a one-record .jsonl, its token file) trains, split by position."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config  # tests/ is on the path

from moe_diff.cli import main
from moe_diff.config import DataConfig
from moe_diff.data import ByteTokenizer, load_corpus
from moe_diff.train import train

BYTES = ByteTokenizer()
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60))


def one_document(tmp_path: Path, kind: str) -> Path:
    """TEXT as the only document of a .txt, a .jsonl or a .bin written by `moe-diff tokenize`."""
    (tmp_path / "one.txt").write_text(TEXT)
    if kind == "jsonl":
        (tmp_path / "one.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    if kind == "bin":
        assert main(["tokenize", str(tmp_path / "one.txt"), "--out", str(tmp_path / "one.bin")]) == 0
    return tmp_path / f"one.{kind}"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "bin"])
def test_a_single_document_trains_with_its_tail_for_validation(tmp_path: Path, kind: str) -> None:
    source = one_document(tmp_path, kind)
    result = train(small_config(tmp_path / "run", f"data.source={source}", "train.max_steps=2",
                                "train.eval_every=2", "train.save_every=2"))
    assert result.step == 2 and result.val_loss is not None
    notes: list[str] = []
    corpus = load_corpus(DataConfig(source=str(source), val_fraction=0.3), BYTES, tell=notes.append)
    tokens = np.append(BYTES.encode(TEXT), BYTES.eot_id)
    cut = round(0.7 * len(tokens))
    assert corpus.train.tolist() == tokens[:cut].tolist() and corpus.val.tolist() == tokens[cut:].tolist()
    assert corpus.n_documents == (1, 1) and len(corpus.val_names) == 1
    assert notes == [f"data.source holds a single document ({corpus.val_names[0]}, {len(tokens):,} tokens): split "
                     f"by position, its first {cut:,} tokens for training and the last {len(tokens) - cut:,} for "
                     "validation (data.val_fraction=0.3)"]


def test_a_single_document_too_short_for_a_validation_window_is_named(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "short.txt").write_text("x" * 99)  # 100 tokens with end-of-text: 70 train, 30 validation
    assert main(["train", str(Path(__file__).parents[2] / "configs" / "tiny.yaml"), "train.seq_len=32",
                 f"train.out_dir={tmp_path / 'run'}", f"data.source={tmp_path / 'short.txt'}",
                 "data.val_fraction=0.3"]) == 2
    assert ("the validation split has 30 tokens, fewer than train.seq_len + 1 = 33"
            in " ".join(capsys.readouterr().err.split()))
