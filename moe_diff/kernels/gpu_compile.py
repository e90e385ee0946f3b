"""The attention kernels compiled for a GPU architecture on a machine without one: Triton's frontend, its MLIR
passes and ptxas all run on the CPU, so CI checks that every mode's kernels compile for Hopper (the interpreter
that runs them in tests never does), and launch configurations can be compared by registers, spills and shared
memory before a GPU is at hand.

Arguments are described about as a launch at model shapes makes them: pointers 16-byte aligned, the strides of
q, k, v and the outputs multiples of 16; lengths, head counts and lambda's strides get no hint (a launch may
specialise them further). Under TRITON_INTERPRET=1 the kernels are interpreted functions,
which do not compile: run `python -m moe_diff.kernels.gpu_compile` (it prints one JSON line per kernel).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_diff.kernels import diff_flash_attention as flash
from moe_diff.kernels.triton_compat import triton

POINTER_TYPES = {"KEY_START": "*i32", "QUERY_STOP": "*i32", "DOCUMENTS": "*i32", "MASK": "*i1", "LSE": "*fp32",
                 "DELTA": "*fp32", "O2": "*fp32"}  # the rest hold the inputs' dtype
UNHINTED = {"n_queries", "n_keys", "n_heads", "n_groups", "group_size", "length_bucket",  # any value
            "stride_lb", "stride_lt", "stride_lh"}  # lambda's: 0 (one shared value) or 1 (per head) in real launches
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TRITON_TYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in TRITON_TYPES}


@dataclass(frozen=True)
class Resources:
    """What one kernel needs: registers and stack bytes per thread (where ptxas puts the registers it spills: the
    kernels have no other stack), shared memory per program."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    tensor_core_op: str  # "wgmma" (Hopper's warpgroup MMA), "mma" or "none"


def mode_launch(mode: str, head_dim: int, dtype: torch.dtype, documents: bool = False,
                offset_queries: bool = False) -> flash.Launch:
    """The launch description the mode wrappers would build, on meta tensors (shapes only); with `documents`, for
    packed documents (each key's document compared with the query's); with `offset_queries`, for fewer queries than
    keys under the rule (a context-parallel rank's)."""
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    n_queries = 32 if offset_queries else 64
    q, k, lam = meta(1, n_queries, 2, head_dim), meta(1, 64, 1, head_dim), meta(1, n_queries, 2)
    starts = torch.empty(1, 64, dtype=torch.int32, device="meta") if documents else None
    if mode == "standard":
        return flash.Launch(q, None, k, None, meta(1, 64, 1, head_dim), None, None, starts)
    if mode == "diff":
        return flash.Launch(q, q, k, k, meta(1, 64, 1, 2 * head_dim), lam, None, starts)
    if mode == "diff_v2":
        return flash.Launch(q, q, k, None, meta(1, 64, 1, head_dim), lam, None, starts)
    raise ValueError(f"mode must be one of {', '.join(flash.MODES)}, got {mode!r}")


def wide_values(mode: str, head_dim: int) -> bool:
    """Whether `mode` at head width `head_dim` has values over 128 wide (the candidates' third key)."""
    return mode_launch(mode, head_dim, torch.bfloat16).wide_values


def candidates(kernel: str, mode: str, head_dim: int) -> tuple[flash.LaunchParams, ...]:
    """The launches a GPU's autotuning chooses `kernel` of `mode` from at head width `head_dim`."""
    return flash.CANDIDATES[kernel, mode, wide_values(mode, head_dim)]


def hand_picked(kernel: str, mode: str, head_dim: int) -> flash.LaunchParams:
    """The launch picked by hand: the first candidate."""
    return candidates(kernel, mode, head_dim)[0]


def kernel_source(kernel: str, mode: str, head_dim: int, dtype: torch.dtype, launch: flash.LaunchParams,
                  documents: bool = False, offset_queries: bool = False) -> "triton.compiler.ASTSource":
    """One kernel of one mode as Triton compiles it ahead of time: the constants its launch sets, the type of
    every argument and which are 16-aligned."""
    from triton.compiler import ASTSource

    function = flash.KERNELS[kernel]
    constants = {**mode_launch(mode, head_dim, dtype, documents, offset_queries).constants,
                 **flash.launch_constants(kernel, launch), "STORE_O2": True}
    names = function.arg_names
    signature, aligned = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = POINTER_TYPES.get(name, f"*{TRITON_TYPES[dtype]}")
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
        if signature[name] != "constexpr" and name not in UNHINTED and not name.endswith("scale"):
            aligned[(index,)] = [["tt.divisibility", 16]]
    constexprs = {(names.index(name),): value for name, value in constants.items() if name in names}
    return ASTSource(function, signature, constexprs=constexprs, attrs=aligned)


def compile_for(kernel: str, mode: str, head_dim: int, dtype: torch.dtype, launch: flash.LaunchParams,
                arch: int = 90, documents: bool = False, offset_queries: bool = False) -> Resources:
    """Compile one kernel of one mode for compute capability `arch` with launch (BLOCK_M, BLOCK_N, num_warps,
    num_stages) (or take it from Triton's cache), with or without `documents` compared per key and queries offset
    past the keys' start, and read its resource usage from the binary."""
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1, which does not compile them: run "
                           "python -m moe_diff.kernels.gpu_compile without it")
    compiled = triton.compile(kernel_source(kernel, mode, head_dim, dtype, launch, documents, offset_queries),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch[2], "num_stages": launch[3]})
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    op = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
    return Resources(usage["REG"], usage["STACK"], compiled.metadata.shared, op)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's resource line for the one kernel in `cubin`: REG, STACK, SHARED, LOCAL, ..."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as directory:
        binary = Path(directory) / "kernel.cubin"
        binary.write_bytes(cubin)
        report = subprocess.run([str(tool), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                                check=True).stdout
    line = next((line for line in report.splitlines() if "REG:" in line), None)
    if line is None:
        raise RuntimeError(f"cuobjdump reported no resource usage: {report[-500:]}")
    return {name: int(value) for name, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}

def compile_in_process(args: list[str], timeout: float) -> list[dict]:
    """This module's command in a process without TRITON_INTERPRET (under which the kernels, replaced at import,
    do not compile): one row per kernel. Raises RuntimeError with the end of stderr if the command fails."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", __name__, *args], capture_output=True, text=True,
                             env=environment, timeout=timeout)
    if process.returncode:
        raise RuntimeError(f"python -m {__name__} failed: {process.stderr[-2000:]}")
    return [json.loads(line) for line in process.stdout.splitlines()]


def error_line(error: BaseException) -> str:
    """The exception's type and the last line of its message (Triton's compile errors end with the cause)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:300]}" if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=flash.MODES, default=list(flash.MODES))
    parser.add_argument("--kernel", nargs="+", choices=list(flash.KERNELS), default=list(flash.KERNELS))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[128])
    parser.add_argument("--launch", nargs="+", type=int, metavar="N",
                        help="one launch for every kernel: BLOCK_M BLOCK_N WARPS STAGES [VALUE_SPLITS, the forward "
                        "kernel's] (default: the one picked by hand)")
    parser.add_argument("--candidates", action="store_true",
                        help="every launch a GPU's autotuning chooses from, instead of the hand-picked one")
    parser.add_argument("--dtype", choices=list(TRITON_TYPES_BY_NAME), default="bfloat16")
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 80 (A100), 90 (H100/H200)")
    parser.add_argument("--documents", action="store_true",
                        help="the kernels' variant for packed documents (HAS_DOCUMENTS: each key's document "
                        "compared with the query's)")
    parser.add_argument("--offset-queries", action="store_true",
                        help="the kernels' variant for fewer queries than keys under the rule (OFFSET_QUERIES: a "
                        "context-parallel rank's queries after the earlier keys it receives)")
    parser.add_argument("--out", default=None, help="also write the rows, with the versions, to this JSON file")
    args = parser.parse_args(argv)
    if args.launch and len(args.launch) not in (4, 5):
        parser.error("--launch takes BLOCK_M BLOCK_N WARPS STAGES and optionally VALUE_SPLITS")
    rows = []
    for mode in args.mode:
        for kernel in args.kernel:
            for head_dim in args.head_dim:
                if args.launch:
                    launches = [tuple(args.launch)]
                else:
                    launches = candidates(kernel, mode, head_dim) if args.candidates else [
                        hand_picked(kernel, mode, head_dim)]
                for launch in launches:
                    row = {"mode": mode, "kernel": kernel, "head_dim": head_dim, "launch": launch,
                           "arch": args.arch, "documents": args.documents, "offset_queries": args.offset_queries}
                    try:
                        row |= asdict(compile_for(kernel, mode, head_dim, TRITON_TYPES_BY_NAME[args.dtype], launch,
                                                  args.arch, args.documents, args.offset_queries))
                    except Exception as error:  # noqa: BLE001 - a configuration that does not compile is a result
                        row["error"] = error_line(error)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.out:
        versions = {"triton": triton.__version__, "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(versions | {"settings": vars(args), "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
