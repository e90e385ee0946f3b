"""The expert table: fingerprints that add up over any split of a weight, change when experts or elements are
moved, and the tables earlier versions wrote (SHA-256 per expert) still checked at resume."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import small_config  # tests/ is on the path

from moe_diff.checkpoint import experts, open_model
from moe_diff.checkpoint import training as checkpoints
from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.parallel.pieces import Piece
from moe_diff.train import train


def fingerprint(weight: torch.Tensor, salt: int = 0) -> list[int]:
    return experts.piece_fingerprints(Piece((0, 0, 0), weight, weight.shape), salt).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_pieces_of_any_split_add_up_to_the_whole_fingerprint(dtype: torch.dtype, monkeypatch) -> None:
    """Split [4, 6, 10] into blocks along every dimension at once, uneven as FSDP's padding leaves them: the
    blocks' parts, summed modulo 2^64, give each expert's fingerprint of the whole, however many rows are
    fingerprinted at once; a piece with no expert (FSDP over more ranks than experts) has no part."""
    weight = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = fingerprint(weight, salt=1)
    monkeypatch.setattr(experts, "CHUNK", 7)  # a row or two at a time
    assert fingerprint(weight, salt=1) == whole
    assert experts.piece_fingerprints(Piece((4, 0, 0), weight[4:], weight.shape), salt=1).tolist() == []
    sums = [0] * 4
    for (e, en), (r, rn), (c, cn) in itertools.product(((0, 3), (3, 1)), ((0, 2), (2, 4)), ((0, 7), (7, 3))):
        block = weight[e:e + en, r:r + rn, c:c + cn]
        parts = experts.piece_fingerprints(Piece((e, r, c), block, weight.shape), salt=1).tolist()
        for i, part in enumerate(parts):
            sums[e + i] = (sums[e + i] + part) & experts.MASK
    assert sums == [value & experts.MASK for value in whole]


def test_moved_experts_elements_or_weights_change_the_fingerprint() -> None:
    weight = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    base = fingerprint(weight)
    assert len(set(base)) == 3
    swapped = weight[[1, 0, 2]]
    assert fingerprint(swapped) == [base[1], base[0], base[2]]  # each expert keeps its own, in its new slot
    transposed = weight.clone()
    transposed[0, 1, 2], transposed[0, 2, 1] = weight[0, 2, 1], weight[0, 1, 2]
    assert fingerprint(transposed)[0] != base[0] and fingerprint(transposed)[1:] == base[1:]
    assert fingerprint(weight, salt=1) != base  # w1's values stored as w3's
    flipped = weight.clone()
    flipped.view(torch.int32)[2, 4, 6] ^= 1  # one bit of the last element
    assert fingerprint(flipped)[2] != base[2]
    first = weight.clone()
    first[0, 0, 0] += 1  # the first element of w1 (salt 0) counts too
    assert fingerprint(first)[0] != base[0]


def test_every_sign_of_a_float64_weight_counts() -> None:
    """Each element's top bit changes the fingerprint (an even coefficient would lose it modulo 2^64)."""
    weight = torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    base = fingerprint(weight)
    for row, column in itertools.product(range(4), range(8)):
        flipped = weight.clone()
        flipped[0, row, column] *= -1
        assert fingerprint(flipped) != base, (row, column)


def test_a_table_of_an_earlier_version_is_still_checked(tmp_path: Path) -> None:
    """A checkpoint whose experts.json is the SHA-256 table earlier versions wrote: it resumes and opens; with one
    expert's digest wrong, both refuse it, naming the expert."""
    train(small_config(tmp_path / "run", "train.max_steps=3"))
    step = tmp_path / "run" / "checkpoints" / "step-3"
    legacy = experts.legacy_sha256_table(open_model(step).model)
    (step / experts.EXPERTS).write_text(json.dumps(legacy))
    checkpoints._write_manifest(step, 3)
    assert train(small_config(tmp_path / "run", "train.max_steps=6")).step == 6
    assert open_model(step).model is not None

    legacy["layer 1 expert 2"] = "0" * 64
    (step / experts.EXPERTS).write_text(json.dumps(legacy))
    checkpoints._write_manifest(step, 3)
    with pytest.raises(CheckpointError, match="layer 1 expert 2 do not match their checksums"):
        open_model(step)
    with pytest.raises(CheckpointError, match="layer 1 expert 2 do not match their checksums"):
        train(small_config(tmp_path / "again", f"train.resume={step}"))


def test_a_saved_table_names_every_expert_once_and_an_unknown_format_is_refused(tmp_path: Path) -> None:
    train(small_config(tmp_path / "run", "train.max_steps=3"))
    step = tmp_path / "run" / "checkpoints" / "step-3"
    stored = json.loads((step / experts.EXPERTS).read_text())
    assert stored["format"] == experts.FORMAT
    assert sorted(stored["experts"]) == sorted(f"layer {layer} expert {expert}" for layer in range(2)
                                               for expert in range(8))
    assert all(len(value) == 16 for value in stored["experts"].values())
    (step / experts.EXPERTS).write_text(json.dumps(stored | {"format": "weighted-bits-v9"}))
    checkpoints._write_manifest(step, 3)
    with pytest.raises(CheckpointError, match="is in format 'weighted-bits-v9', which this version does not read"):
        open_model(step)
