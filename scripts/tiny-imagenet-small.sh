#!/usr/bin/env bash
# Purpose:  the real-data run of configs/tiny-imagenet-small.toml from scratch: extract the first
#           40 classes of the fixed zero-shot split from ../shared/data/tiny-imagenet-200.tar.gz,
#           build WebDataset shards, train all three stages, write the report.
# Hardware: 2 CPU cores.
# Command:  bash scripts/tiny-imagenet-small.sh [extra `devise train` flags, e.g. --set k=v]
# Time:     extraction + shards ~1 min; training + evaluation ~11 min (budget 20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export LIBTORCH="$PWD/.deps/libtorch"
cargo build --release --locked
bash scripts/prepare-tiny-imagenet.sh 40
exec "${CARGO_TARGET_DIR:-target}/release/devise" train --config configs/tiny-imagenet-small.toml "$@"
