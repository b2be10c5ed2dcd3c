#!/usr/bin/env bash
# Purpose:  time and peak memory of building the ImageNet-21K label embedding matrix (one unit
#           word vector per synset, paper A.2) from a word-vector file: ours
#           (examples/label_matrix_bench.rs: devise::text::load_label_embeddings, the trainer's
#           loader, which streams the file and keeps only the words the labels can need, then
#           LabelEmbeddings::matrix) against gensim 4.4.0 (bench/label_matrix_gensim.py:
#           KeyedVectors.load_word2vec_format, then the same mapping rule in numpy), on
#           (a) GloVe 6B 50d text, 400k words x 50 (.deps/vectors/glove.6B.50d.txt, what
#               scripts/setup.sh fetches; the 400k-word GloVe we have is the 50-d one), and
#           (b) a 1,000,000 words x 300 word2vec binary file, generated here once into
#               .deps/bench/ (the 28,432 words of ../shared/data/vectors/wiki-skipgram-300d.bin
#               first, byte for byte, so labels map; then synthetic words w_0000000.. with seeded
#               normal random vectors; gensim's layout, no '\n' after a vector; 1.2 GB).
#           Labels: the 21,841 wnids of ../shared/data/imagenet-meta/imagenet.synset.txt (ImageNet
#           fall 2011, blank lines skipped), names from its words.txt. First an untimed check run
#           of each side writes its matrix: same mapped wnids, max |ours - gensim| reported. Then
#           ROUNDS rounds (default 5) of ours, gensim, alternately, per file. Times are wall clock
#           measured inside each process, from reading the wnid list to the finished matrix (the
#           vector file is in the page cache: warm runs); peak memory is the process's peak RSS
#           (VmHWM / ru_maxrss), also shown above its RSS before the task started (our binary
#           links libtorch, Python imports numpy+scipy+gensim: ~110 MB each before any work).
#           Prints a Markdown table (medians, min-max) and appends the raw JSON lines to
#           bench/results/label_matrix-<UTC date>.jsonl (each with "run", "round", "file").
# Goal:     ours >= 10x faster than gensim and <= 1/5 of its peak memory.
# Hardware: written on a 2-core AMD EPYC VM (Linux, no GPU, 23 GiB RAM), shared with other jobs:
#           a spread (max-min)/median over 20% is flagged as noisy; rerun then (check `uptime`).
#           Each timed run holds `flock /tmp/bench.lock`, so runs of different benchmarks on the
#           machine never overlap.
# Command:  bash bench/label_matrix.sh        (ROUNDS=3 bash bench/label_matrix.sh for fewer)
# Builds, idempotently: .deps/libtorch (scripts/setup.sh, if missing), the release example
#           `label_matrix_bench` (honours CARGO_TARGET_DIR), .deps/bench-venv (bench/venv.sh)
#           plus gensim 4.4.0, scipy 1.17.1, smart_open 7.7.1, wrapt 2.5.2 (--no-deps, so pip
#           cannot replace the venv's numpy 2.4.6), and the 1M-word file (~30 s, 1.2 GB).
# Time:     ~3 min for 5 rounds once built (gensim: ~17 s per GloVe run, ~7 s per 1M run; ours
#           < 1 s each), plus any wait for the bench lock.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-5}
meta="$root/../shared/data/imagenet-meta"
names="$meta/words.txt"
wnids="$meta/imagenet.synset.txt"
glove="$root/.deps/vectors/glove.6B.50d.txt"
skipgram="$root/../shared/data/vectors/wiki-skipgram-300d.bin"
big="$root/.deps/bench/word2vec-1m-300d.bin"
log() { printf '[label_matrix] %s\n' "$*" >&2; }

export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
[ -f "$glove" ] || bash scripts/setup.sh
cargo build --quiet --release --example label_matrix_bench
ours="${CARGO_TARGET_DIR:-$root/target}/release/examples/label_matrix_bench"
bash bench/venv.sh
py="$root/.deps/bench-venv/bin/python"
if ! "$py" -W ignore -c 'import gensim, scipy, smart_open; assert gensim.__version__ == "4.4.0"' 2>/dev/null; then
  log "installing gensim 4.4.0 (+ scipy, smart_open, wrapt) into .deps/bench-venv"
  "$root/.deps/bench-venv/bin/pip" install --quiet --no-cache-dir --no-deps gensim==4.4.0 \
    scipy==1.17.1 smart_open==7.7.1 wrapt==2.5.2
  "$py" -W ignore -c 'from gensim.models import KeyedVectors'
fi

# --- the 1M x 300 word2vec binary file ----------------------------------------------------------
if [ ! -f "$big" ]; then
  log "generating $big (1,000,000 words x 300, word2vec binary)"
  mkdir -p "$(dirname "$big")"
  "$py" - "$skipgram" "$big.tmp" <<'PY'
import sys
import numpy as np
src, dst = sys.argv[1:3]
total, dim = 1_000_000, 300
with open(src, "rb") as f:
    count, src_dim = map(int, f.readline().split())
    assert src_dim == dim, src_dim
    body = f.read()  # the source's records, copied as they are (no '\n' after a vector)
rng = np.random.default_rng(20131205)
with open(dst, "wb") as out:
    out.write(f"{total} {dim}\n".encode())
    out.write(body)
    n_syn, chunk = total - count, 100_000
    for start in range(0, n_syn, chunk):
        n = min(chunk, n_syn - start)
        rec = np.empty((n, 10 + 4 * dim), dtype=np.uint8)
        words = np.array([f"w_{i:07d} ".encode() for i in range(start, start + n)])
        rec[:, :10] = np.frombuffer(words.tobytes(), dtype=np.uint8).reshape(n, 10)
        vec = (rng.standard_normal((n, dim), dtype=np.float32) * 0.1).astype("<f4")
        rec[:, 10:] = vec.view(np.uint8).reshape(n, 4 * dim)
        out.write(rec.tobytes())
print(f"[label_matrix] wrote {count} real + {n_syn} synthetic words", file=sys.stderr)
PY
  mv "$big.tmp" "$big"
fi

# --- runs ---------------------------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# one ROUND FILE_TAG CMD...: runs CMD under the bench lock, tags its JSON line
one() {
  local round=$1 tag=$2
  shift 2
  flock /tmp/bench.lock "$@" >"$tmp/out" || { log "FAILED: $*"; exit 1; }
  sed "s/^{/{\"run\":\"$run\",\"round\":$round,\"file\":\"$tag\",/" "$tmp/out" |
    tee -a "$tmp/run.jsonl" >&2
}
files=("glove-400k-50d|$glove|glove" "word2vec-1m-300d|$big|word2vec-binary")
log "load before: $(uptime)"
start=$SECONDS
for spec in "${files[@]}"; do
  IFS='|' read -r tag path format <<<"$spec"
  log "$tag: check run (writes both matrices; also warms the page cache)"
  one 0 "$tag" "$ours" "$path" "$format" "$names" "$wnids" "$tmp/ours.$tag.f32"
  one 0 "$tag" "$py" -W ignore bench/label_matrix_gensim.py "$path" "$format" "$names" "$wnids" \
    "$tmp/gensim.$tag.f32"
  "$py" - "$tmp/ours.$tag.f32" "$tmp/gensim.$tag.f32" "$tag" >>"$tmp/check.txt" <<'PY'
import sys
import numpy as np
a, b, tag = sys.argv[1:4]
wa, wb = open(a + ".wnids").read().split(), open(b + ".wnids").read().split()
if wa != wb:
    print(f"| {tag} | {len(wa)} | {len(wb)} | mapped wnids DIFFER ({len(set(wa) ^ set(wb))} not in both) | - |")
else:
    x, y = np.fromfile(a, "<f4"), np.fromfile(b, "<f4")
    d = float(np.max(np.abs(x - y))) if x.size == y.size else float("nan")
    rows = int(np.sum(np.any(x.reshape(len(wa), -1) != y.reshape(len(wb), -1), axis=1)))
    print(f"| {tag} | {len(wa)} | {len(wb)} | same | {d:.3g} ({rows} rows not bit-identical) |")
PY
  rm -f "$tmp"/*.f32 "$tmp"/*.f32.wnids
  for ((k = 1; k <= rounds; k++)); do
    one "$k" "$tag" "$ours" "$path" "$format" "$names" "$wnids"
    one "$k" "$tag" "$py" -W ignore bench/label_matrix_gensim.py "$path" "$format" "$names" "$wnids"
  done
done
log "load after: $(uptime)"
mkdir -p bench/results
out="bench/results/label_matrix-$(date -u +%Y-%m-%d).jsonl"
cat "$tmp/run.jsonl" >>"$out"
log "$rounds rounds in $((SECONDS - start)) s; raw lines appended to $out"

python3 - "$tmp/run.jsonl" <<'PY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["round"] > 0:
        runs[r["file"], r["impl"]].append(r)
files = list(dict.fromkeys(f for f, _ in runs))
def cell(v):
    m = statistics.median(v)
    spread = (max(v) - min(v)) / m
    return m, f"{m:.3g} ({min(v):.3g}-{max(v):.3g}){' noisy' if spread > 0.2 else ''}"
med = lambda rs, f: statistics.median(f(r) for r in rs)
mb = lambda b: b / 2**20
print("| file | ours s | gensim s | speedup (wall / CPU) | ours peak RSS MB | gensim peak RSS MB "
      "| memory ratio | above start-up: ours / gensim MB | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for tag in files:
    o, g = runs[tag, "devise"], runs[tag, "gensim"]
    (ot, ots), (gt, gts) = cell([r["seconds"] for r in o]), cell([r["seconds"] for r in g])
    oc, gc = med(o, lambda r: r["cpu_seconds"]), med(g, lambda r: r["cpu_seconds"])
    om, gm = med(o, lambda r: mb(r["peak_rss_bytes"])), med(g, lambda r: mb(r["peak_rss_bytes"]))
    od = med(o, lambda r: mb(r["peak_rss_bytes"] - r["rss_before_bytes"]))
    gd = med(g, lambda r: mb(r["peak_rss_bytes"] - r["rss_before_bytes"]))
    print(f"| {tag} ({o[0]['rows_read']:,} x {o[0]['dim']}) | {ots} | {gts} "
          f"| {gt / ot:.1f}x / {gc / oc:.1f}x | {om:.0f} | {gm:.0f} | {om / gm:.2f} "
          f"| {od:.0f} / {gd:.0f} | {od / gd:.2f} |")
print(f"\n{len(o)} rounds, wall-clock seconds: median (min-max); 'noisy': (max-min)/median > 20%; "
      "speedup: ratio of medians, wall clock / CPU time; memory: median peak RSS (MB = 2^20 "
      "bytes). Mapped / unmapped of "
      f"{o[0]['wnids']:,} wnids: " + "; ".join(
          f"{t}: ours {runs[t, 'devise'][0]['mapped']:,}/{runs[t, 'devise'][0]['unmapped']:,}, "
          f"gensim {runs[t, 'gensim'][0]['mapped']:,}/{runs[t, 'gensim'][0]['unmapped']:,}"
          for t in files) + ".\n")
PY
echo "| file | ours mapped | gensim mapped | mapped wnids | max abs difference |"
echo "|---|---:|---:|---|---:|"
cat "$tmp/check.txt"
