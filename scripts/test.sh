#!/usr/bin/env bash
# Purpose:  README's test command. Installs what the tests need (scripts/setup.sh, idempotent),
#           then runs formatting/lint checks and every test. The tests of the machinery run on
#           data they generate; the tests about real ImageNet data read ../shared and, where it
#           is missing, are reported as ignored (the last line counts them). CI=true requires it.
# Hardware: 2 CPU cores; no GPU.
# Command:  bash scripts/test.sh
# Time:     ~14 min from a clean clone (cold build, s3s-fs included), ~3 min warm; the SLURM
#           tests (tests/it/slurm.rs, under a local SLURM) add ~3 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${CI:-}" = true ] && [ ! -d ../shared/data ]; then
  echo "test.sh: CI=true but ../shared/data (the real ImageNet data) is missing beside $PWD" >&2
  exit 1
fi
bash scripts/setup.sh
# A full build needs a few GB under target/; a linker killed by SIGBUS is usually a full disk.
df -h . | awk 'NR==2 {print "test.sh: " $4 " free on the disk holding the build"}'
export LIBTORCH="$PWD/.deps/libtorch"
# The object-storage tests run a real S3 server on 127.0.0.1 (tests/it/s3.rs): s3s-fs, built
# once into .deps/s3s (~3.5 min on 2 cores).
[ -x .deps/s3s/bin/s3s-fs ] || cargo install --quiet --locked s3s-fs@0.14.1 --features binary --root .deps/s3s
# tests/it/report.rs opens report.html in a headless browser (Debian's chromium, ~100 MB);
# tests/it/cluster.rs runs shellcheck on the SLURM scripts; tests/it/slurm.rs runs them under a
# real SLURM (Debian's slurm-wlm 22.05 and munge, ~30 MB).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
if ((${#missing[@]})); then
  echo "test.sh: apt-get install ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A one-node SLURM on 127.0.0.1 for tests/it/slurm.rs (daemons started directly, no systemd),
# stopped when this script ends.
bash scripts/slurm-local.sh start
trap 'bash scripts/slurm-local.sh stop' EXIT
eval "$(bash scripts/slurm-local.sh env)"
# --workspace: the integration tests run the devise-launch binary next to devise. The output is
# also kept in a log, to count the ignored tests at the end.
log=$(mktemp)
trap 'rm -f "$log"; bash scripts/slurm-local.sh stop' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
# The NCCL backend (cargo feature `nccl`) builds and tests on this CPU machine: without GPU,
# libcuda and libnccl, joining a group with it is a clear error, never a panic.
cargo clippy -p devise --all-targets --features nccl --locked -- -D warnings
cargo test -p devise --lib --features nccl --locked collective::
# One line: how many tests were ignored, by reason (cargo prints `test NAME ... ignored, REASON`).
{ grep -E '^test .* \.\.\. ignored' "$log" || true; } | sed -E 's/^test .* \.\.\. ignored(, )?//' | sort | uniq -c |
  awk '{n = $1; $1 = ""; sub(/^ /, ""); total += n; parts = parts (parts ? "; " : "") n " " ($0 == "" ? "(no reason given)" : $0)}
       END {if (total) print "test.sh: " total " tests ignored: " parts; else print "test.sh: no test ignored"}'
