#!/usr/bin/env bash
# Purpose:  README's main command: the embedded default run (`devise demo`): renders a coloured-
#           shapes dataset named with real GloVe words, builds shards, trains the three DeViSE
#           stages, checkpoints, evaluates zero-shot on held-out classes, writes the report.
# Hardware: 2 CPU cores; no GPU.
# Command:  bash scripts/demo.sh [--out DIR]
# Time:     setup + release build ~5-10 min on a fresh machine; the run itself ~2 min.
# Result:   prints the results table and the path of runs/demo/run/report.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export LIBTORCH="$PWD/.deps/libtorch"
cargo build --release --locked
exec target/release/devise demo "$@"
