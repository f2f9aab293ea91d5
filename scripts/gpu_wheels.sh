#!/usr/bin/env bash
# Download, on a machine with network access, the wheels scripts/gpu_check.sh installs offline on a
# GPU machine whose image already has CUDA torch (Python 3.12, x86_64) and the common libraries
# (transformers, safetensors, numpy, pyyaml, tqdm, sentencepiece, tokenizers, psutil, matplotlib,
# tensorboard, pyarrow, xxhash): what this project needs beyond them, pinned to the versions it is
# tested with. No torch, no transformer-engine. See docs/gpu.md.
#
#   bash scripts/gpu_wheels.sh [DIR]     # default DIR: .whl/ at the repo root (git-ignored)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
MAX_MIB=60

# cp312 manylinux wheels (compiled code) and pure-python wheels, fetched for the GPU machine's
# interpreter whatever this one is.
WHEELS=(
  megatron-core==0.16.1
  # datasets and what it imports that such an image lacks (pandas: compiled, ~12 MB)
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 pandas==3.1.1
  # Rouge-L's Porter stemmer (evaluation) and their dependencies
  nltk==3.10.4 click==8.5.1 joblib==1.6.0 cloudpickle==3.1.3 defusedxml==0.7.1 absl-py==2.5.1 six==1.17.0
  # the build backend of the editable install of this project (--no-build-isolation: no network
  # there); wheel: what setuptools < 70.1 needs to build an editable install
  setuptools==84.2.1 wheel==0.45.1
)
# PyPI has only an sdist of rouge-score: built here into a pure-python wheel.
SDISTS=(rouge-score==0.1.2)

mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${WHEELS[@]}"
"$PY" -m pip wheel --quiet --no-deps -w "$DIR" "${SDISTS[@]}"

bytes=$(du -sb "$DIR" | cut -f1)
ls -l "$DIR"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
mib=$(( (bytes + 1048575) / 1048576 ))
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "error: $DIR holds $mib MiB, over the $MAX_MIB MiB limit (a wheel that should not be there?)" >&2
  exit 1
fi
echo "$DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $mib MiB (limit $MAX_MIB MiB)"
