"""A training checkpoint's expert table (`experts.json`): one fingerprint per expert of every layer, so that a
checkpoint whose experts were lost, written into the wrong slots, or taken from replicas that diverged is refused.

The fingerprint of an expert is the sum, modulo 2^64, of each element's bits times a pseudo-random coefficient
of the element's place in the whole weight (w1, w2 and w3 each with their own). A sum does not depend on how
the weight is split, so every rank fingerprints only the pieces it holds, on its device, and the pieces add up;
the ranks holding the same piece (its replicas) must agree on it. Tables written by earlier versions (a SHA-256
of every expert, each made whole on every rank) are still checked as they were."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.dims import ParallelDims
from moe_diff.parallel.pieces import Piece, piece
from moe_diff.parallel.runtime import Runtime

EXPERTS = "experts.json"
FORMAT = "weighted-bits-v2"  # experts.json's "format"; a table without one is an earlier version's SHA-256 table
WEIGHTS = ("w1", "w2", "w3")
MASK = (1 << 64) - 1
CHUNK = 1 << 24  # elements of a weight fingerprinted at once (each temporary int64 copy: 128 MiB)
ONE_PROCESS = Runtime(ParallelDims(1, 1, 1, 1))
# splitmix64's constants as signed int64 (torch multiplies int64 tensors modulo 2^64)
GOLDEN, MIX_1, MIX_2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >> bits as if z were unsigned (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _coefficients(index: torch.Tensor, salt: int) -> torch.Tensor:
    """splitmix64 of each element's index in its expert, the weight's `salt` added, made odd: no element's
    coefficient is 0, and none drops a 64-bit element's top bit (c * 2^63 is 0 modulo 2^64 for even c)."""
    z = (index + salt + 1) * GOLDEN
    z = (z ^ _shift_right(z, 30)) * MIX_1
    z = (z ^ _shift_right(z, 27)) * MIX_2
    return (z ^ _shift_right(z, 31)) | 1


def _bits(weight: torch.Tensor) -> torch.Tensor:
    """Each element's bits as a non-negative int64."""
    width = weight.element_size() * 8
    signed = weight.contiguous().view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).to(torch.int64)
    return signed if width == 64 else signed & ((1 << width) - 1)


def piece_fingerprints(piece: Piece, salt: int) -> torch.Tensor:
    """int64 [experts of the piece]: each expert's part of its fingerprint from this piece of a [E, A, B] weight
    (none where FSDP left this rank no expert), a block of rows at a time, so that the temporaries stay near
    CHUNK elements."""
    _, rows, columns = piece.whole_shape
    _, first_row, first_column = piece.offset
    held_experts, held_rows, held_columns = piece.local.shape
    device = piece.local.device
    parts = torch.zeros(held_experts, dtype=torch.int64, device=device)
    step = max(1, CHUNK // max(1, held_experts * held_columns))
    for start in range(0, held_rows, step):
        block = piece.local[:, start:start + step].detach()
        index = ((torch.arange(block.shape[1], device=device) + first_row + start)[:, None] * columns
                 + torch.arange(held_columns, device=device) + first_column)
        parts += (_bits(block) * _coefficients(index, salt * rows * columns)).sum(dim=(1, 2))
    return parts


Held = dict[tuple[int, str, tuple[int, ...]], tuple[int, int, list[int]]]


def expert_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's expert weights as the job holds them (DTensors where it splits them), by name."""
    held = dict(block.moe.experts.named_parameters())
    return {weight: held[weight].detach() for weight in WEIGHTS}


def _held(model: MoEDiffTransformer) -> Held:
    """(layer, weight, offset of this rank's piece) -> (the piece's element count, the whole weight's, and its
    experts' fingerprint parts)."""
    pieces, parts = [], []
    for layer, block in enumerate(model.layers):
        for salt, (weight, value) in enumerate(expert_weights(block).items()):
            held = piece(value)
            pieces.append((layer, weight, held))
            parts.append(piece_fingerprints(held, salt))
    values = torch.cat(parts).tolist()  # one read for the whole table
    held, start = {}, 0
    for layer, weight, part in pieces:
        count = part.local.shape[0]
        held[(layer, weight, part.offset)] = (part.local.numel(), math.prod(part.whole_shape),
                                              values[start:start + count])
        start += count
    return held


def expert_table(model: MoEDiffTransformer, runtime: Runtime = ONE_PROCESS) -> dict[str, str]:
    """'layer L expert E' -> the expert's fingerprint (16 hex digits), on every rank, from the pieces each rank
    holds; CheckpointError if the replicas of a piece disagree or the pieces do not make up every weight."""
    pieces: Held = {}
    for rank, held in enumerate(runtime.gather_objects(_held(model))):
        for key, found in held.items():
            if pieces.setdefault(key, found) != found:
                layer, weight, offset = key
                experts = [offset[0] + i for i, (a, b) in enumerate(zip(pieces[key][2], found[2], strict=True))
                           if a != b]
                raise CheckpointError(f"rank {rank} holds different weights for layer {layer} experts {experts} "
                                      f"({weight}) than a lower rank: the replicas of an expert diverged, so no "
                                      "consistent checkpoint can be written")
    sums: dict[str, int] = {}
    covered: dict[tuple[int, str], int] = {}
    for (layer, weight, offset), (count, _, parts) in pieces.items():
        covered[(layer, weight)] = covered.get((layer, weight), 0) + count
        for i, part in enumerate(parts):
            key = f"layer {layer} expert {offset[0] + i}"
            sums[key] = (sums.get(key, 0) + part) & MASK
    short = [f"layer {layer} {weight}" for (layer, weight, _), (_, whole, _) in pieces.items()
             if covered[(layer, weight)] != whole]
    if short:
        raise CheckpointError(f"the job's pieces of {', '.join(sorted(set(short))[:4])} do not make up the whole "
                              "weights: a rank's experts are missing or held twice")
    return {key: f"{value:016x}" for key, value in sorted(sums.items())}


def write(directory: Path, table: dict[str, str]) -> None:
    (directory / EXPERTS).write_text(json.dumps({"format": FORMAT, "experts": table}, indent=1))


def check(directory: Path, model: MoEDiffTransformer, runtime: Runtime = ONE_PROCESS) -> None:
    """The checkpoint's expert table lists every expert of the loaded model once, with the model's fingerprint;
    CheckpointError naming the experts if not. Every rank of a job calls it."""
    path = directory / EXPERTS
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {EXPERTS} (the per-expert fingerprints): it was not written by "
                              "this version, or it is incomplete")
    stored = json.loads(path.read_text())
    if "format" not in stored:
        table = legacy_sha256_table(model, runtime)
    elif stored["format"] == FORMAT:
        stored, table = stored["experts"], expert_table(model, runtime)
    else:
        raise CheckpointError(f"{path} is in format {stored['format']!r}, which this version does not read (it "
                              f"reads {FORMAT!r} and the SHA-256 tables of earlier versions)")
    if set(stored) != set(table):
        missing = sorted(set(table) - set(stored))
        raise CheckpointError(f"{directory}: the expert table lists {len(stored)} experts, the model has "
                              f"{len(table)} ({', '.join(missing[:4]) or 'different names'} missing)")
    wrong = [name for name, digest in table.items() if stored[name] != digest]
    if wrong:
        raise CheckpointError(f"{directory}: {', '.join(wrong[:4])} do not match their checksums "
                              f"({len(wrong)} experts in all)")


def legacy_sha256_table(model: MoEDiffTransformer, runtime: Runtime = ONE_PROCESS) -> dict[str, str]:
    """An earlier version's table: 'layer L expert E' -> SHA-256 of the expert's w1, w2 and w3, each rank's
    experts made whole (gathered over every mesh dimension but ep) and hashed on the host."""
    table = {}
    for layer, block in enumerate(model.layers):
        held = [piece(_whole_but_for_ep(value)) for value in expert_weights(block).values()]
        first, weights = held[0].offset[0], [part.local.cpu() for part in held]
        for expert in range(len(weights[0])):
            digest = hashlib.sha256()
            for w in weights:
                digest.update(w[expert].contiguous().view(torch.uint8).numpy().tobytes())
            table[f"layer {layer} expert {first + expert}"] = digest.hexdigest()
    for rank_table in runtime.gather_objects(table):
        table |= rank_table
    return table


def _whole_but_for_ep(value: torch.Tensor) -> torch.Tensor:
    """An expert weight gathered over every mesh dimension but ep: this rank's experts whole."""
    if not isinstance(value, DTensor):
        return value
    names = value.device_mesh.mesh_dim_names
    return value.redistribute(placements=[Shard(0) if name == "ep" else Replicate() for name in names])
