#!/usr/bin/env bash
# MegaBlocks for a GPU machine without a package index, from source distributions carried in a folder.
#
#   here, with a network:   benchmarks/build_megablocks.sh fetch DIR
#   there, on the GPU:      benchmarks/build_megablocks.sh build DIR
#
# fetch saves grouped_gemm 0.3.0 (MegaBlocks' grouped GEMM: all that moe_backend=megablocks needs),
# stanford-stk 0.7.1 and megablocks 0.10.0 as sdists in DIR (about 1 MB). build compiles and installs them in that
# order against the installed torch, with --no-build-isolation --no-deps (megablocks pins an older torch), for
# TORCH_CUDA_ARCH_LIST (default 9.0, Hopper) with CUDA's include/cccl on the include path, on MAX_JOBS cores
# (default: all). It stops at the first package that fails, printing the end of its log; grouped_gemm alone
# already makes the backend available. Exit status: 0 when all three built, 1 when grouped_gemm did only, 2 when
# nothing did.
set -uo pipefail

usage() { echo "usage: $0 fetch DIR | build DIR" >&2; exit 64; }
[ $# -eq 2 ] || usage
verb=$1 dir=$2
python=${PYTHON:-python3}

fetch() {
    mkdir -p "$dir" || exit 2
    # Straight from the index's links: pip would read each sdist's metadata, which for grouped_gemm asks the GPU
    # for its architecture and for megablocks builds against the torch it pins.
    "$python" - "$dir" <<'EOF' || exit 2
import re, sys, urllib.request
for project, file in [("grouped-gemm", "grouped_gemm-0.3.0"), ("stanford-stk", "stanford_stk-0.7.1"),
                      ("megablocks", "megablocks-0.10.0")]:
    page = urllib.request.urlopen(f"https://pypi.org/simple/{project}/").read().decode()
    url = re.search(rf'href="([^"#]+/{re.escape(file)}\.tar\.gz)', page).group(1)
    urllib.request.urlretrieve(url, f"{sys.argv[1]}/{file}.tar.gz")
EOF
    ls -l "$dir"
}

build_one() {  # build_one NAME: install DIR/NAME-*.tar.gz, or say why not
    local name=$1 sdist log start
    sdist=$(ls "$dir"/"$name"-*.tar.gz 2>/dev/null | head -n 1)
    if [ -z "$sdist" ]; then
        echo "$name: no $name-*.tar.gz in $dir (run '$0 fetch $dir' where there is a network)"
        return 1
    fi
    log=$(mktemp "/tmp/build-$name-XXXX.log")
    start=$SECONDS
    if "$python" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -v "$sdist" >"$log" 2>&1; then
        echo "$name: built and installed in $((SECONDS - start)) s"
        return 0
    fi
    echo "$name: FAILED after $((SECONDS - start)) s; the end of $log:"
    tail -n 30 "$log"
    return 1
}

build() {
    if ! "$python" -c "import torch" 2>/dev/null; then
        echo "$python has no torch: set PYTHON to the interpreter that holds the torch to build against"
        exit 2
    fi
    cuda=$("$python" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)
    if [ -z "$cuda" ]; then
        echo "no CUDA toolkit found for the installed torch (torch.utils.cpp_extension.CUDA_HOME is unset)"
        exit 2
    fi
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ -d "$cuda/include/cccl" ]; then  # CUDA 13 keeps thrust and cub there
        export CPATH="$cuda/include/cccl${CPATH:+:$CPATH}"
    fi
    echo "building for sm_${TORCH_CUDA_ARCH_LIST/./} with $MAX_JOBS jobs against CUDA at $cuda"
    build_one grouped_gemm || exit 2
    "$python" -c "import grouped_gemm" || { echo "grouped_gemm installed but does not import"; exit 2; }
    build_one stanford_stk || exit 1
    build_one megablocks || exit 1
    "$python" -c "import megablocks.layers.dmoe" || { echo "megablocks installed but does not import"; exit 1; }
}

case $verb in
    fetch) fetch ;;
    build) build ;;
    *) usage ;;
esac
