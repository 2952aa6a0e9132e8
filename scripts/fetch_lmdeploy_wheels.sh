#!/usr/bin/env bash
# Fetch LMDeploy 0.18.0 and what its PyTorch engine imports beyond the GPU image (torch, triton,
# transformers, numpy, ...) into .whl/ (git-ignored), for a GPU machine that has no network.
#
# Run where pip reaches PyPI:   bash scripts/fetch_lmdeploy_wheels.sh
# Result:
#   .whl/wheels/  the downloaded wheels (CPython 3.12, manylinux x86_64: the GPU image's python3)
#   .whl/site/    the same, unpacked and ready to import. LMDeploy's wheel is ~107 MB, almost all of
#                 it TurboMind's compiled engine, which the PyTorch engine never loads
#                 (lmdeploy/turbomind/__init__.py tolerates its absence); it is left out, so the tree
#                 stays well under the 64 MiB a device run can carry.
# On the GPU machine (carry ".whl/site"):
#   PYTHONPATH=$PWD/.whl/site:$PYTHONPATH python3 scripts/gpu_check_lmdeploy.py --out "$OUT"
#
# Environment: PYTHON (default python3), PY_VERSION (default 3.12), WITH_SERVER=0 to leave out
# fastapi/uvicorn (dirl serve needs them; the image lacks them), EXTRA="pkg ..." for more packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PYV=${PY_VERSION:-3.12}
DEST=.whl
WHEELS=$DEST/wheels
SITE=$DEST/site
mkdir -p "$WHEELS"

download() {  # binary wheels for the GPU machine's platform, never sdists
  "$PY" -m pip download --disable-pip-version-check --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$WHEELS" "$@"
}

# 1. Packages whose own requirements would pull torch/triton/CUDA wheels: exactly these, no deps.
download --no-deps "lmdeploy==0.18.0" "xgrammar>=0.2.0,!=0.2.5.post1" "apache-tvm-ffi==0.1.11" \
  mmengine-lite addict termcolor yapf platformdirs

# 2. Small pure dependencies, resolved with their own requirements (pruned below).
SMALL=(pybase64 shortuuid pyzmq pydantic)
if [ "${WITH_SERVER:-1}" = "1" ]; then SMALL+=(fastapi uvicorn); fi
# shellcheck disable=SC2206
SMALL+=(${EXTRA:-})
download "${SMALL[@]}"

# 3. Drop what the GPU image already has (python3 -m pip list there, 2026-11): a wheel here would
#    shadow the image's build of it.
IMAGE_HAS="torch triton numpy transformers tokenizers safetensors huggingface_hub hf_xet accelerate \
  pyyaml rich typing_extensions anyio idna sniffio click h11 annotated_doc filelock fsspec jinja2 \
  markupsafe packaging regex requests tqdm urllib3 certifi charset_normalizer pillow psutil protobuf \
  sentencepiece tiktoken einops cloudpickle peft mdurl markdown_it_py pygments setuptools sympy \
  mpmath networkx nvidia_ml_py"
for f in "$WHEELS"/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr '[:upper:]-.' '[:lower:]__')
  for have in $IMAGE_HAS; do
    if [ "$name" = "$have" ]; then rm -f "$f"; break; fi
  done
done

# 4. Unpack into an importable tree; strip TurboMind's binaries from lmdeploy.
rm -rf "$SITE"
mkdir -p "$SITE"
for f in "$WHEELS"/*.whl; do
  "$PY" -m zipfile -e "$f" "$SITE"
done
rm -f "$SITE"/lmdeploy/turbomind/_turbomind*.so
rm -rf "$SITE"/lmdeploy/turbomind/lib "$SITE"/lmdeploy/turbomind/lib64
find "$SITE" -maxdepth 1 -name '*.data' -type d -exec rm -rf {} +

"$PY" - "$SITE" <<'EOF'
import os, sys
site = sys.argv[1]
total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(site) for f in fs)
print(f"{site}: {total / 2**20:.1f} MiB")
if total > 60 * 2**20:
    print("warning: over 60 MiB; a device run carries at most 64 MiB in all", file=sys.stderr)
EOF
ls "$WHEELS"
