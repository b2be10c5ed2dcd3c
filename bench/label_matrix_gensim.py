"""The ImageNet label embedding matrix the way a Python user builds it with gensim.

Counterpart of examples/label_matrix_bench.rs (same arguments, same JSON line); run by
bench/label_matrix.sh. `KeyedVectors.load_word2vec_format(path, binary=..., no_header=...)`
loads the whole vector file, then each wnid of the list is mapped with the project's rule
(src/text/labels.rs, paper A.2), mirrored here: the synset's names from the words.txt-format
file are tried in order, and the first that maps wins; a name maps through the first of
  1. the name itself, 2. its lowercase (if different), 3. its whitespace-separated words joined
  by "_", then that lowercased (if different), 4. the mean of the raw vectors of its
  alphanumeric tokens (each looked up as written, then lowercased; every token must be present;
  not tried when the name is its only token)
that finds a vector that is non-zero and finite; the vector is L2-normalised in float64 and
stored as float32, and the mapped rows are stacked into a [mapped, dim] float32 matrix in
wnid-list order.

Usage: label_matrix_gensim.py VECTORS FORMAT NAMES WNIDS [OUT]
  FORMAT: word2vec-binary | word2vec-text | fasttext | glove (glove: no_header=True)
  OUT: when given, the matrix is written there as raw little-endian float32 and the mapped
       wnids to OUT.wnids (after the timing).
Prints one JSON line: {"impl":"gensim",...,"seconds":..,"cpu_seconds":..,
"import_seconds":..,"rss_before_bytes":..,"peak_rss_bytes":..}. seconds: wall clock from before
reading the wnid list to the finished matrix (interpreter start-up and imports excluded, given
as import_seconds); cpu_seconds: user + system CPU time over the same span; peak_rss_bytes:
getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux) * 1024; rss_before_bytes: VmRSS after the
imports.
"""

import json
import sys
import time

t_import = time.perf_counter()
import numpy as np  # noqa: E402
from gensim.models import KeyedVectors  # noqa: E402
import gensim  # noqa: E402
import resource  # noqa: E402

import_seconds = time.perf_counter() - t_import


def cpu_seconds():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def vm_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def read_names(path):
    """words.txt: wnid TAB name, name, ...; '#' comments and blank lines skipped."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            wnid, _, rest = line.partition("\t")
            names[wnid.strip()] = [n.strip() for n in rest.split(",") if n.strip()]
    return names


def tokens(name):
    """Alphanumeric runs (Rust's char::is_alphanumeric ~ str.isalnum)."""
    out, cur = [], []
    for c in name:
        if c.isalnum():
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def normalise(v):
    """L2 in float64; None for a zero or non-finite vector."""
    v64 = np.asarray(v, dtype=np.float64)
    norm = np.sqrt(np.dot(v64, v64))
    if not (np.isfinite(norm) and norm > 0.0):
        return None
    out = (v64 / norm).astype(np.float32)
    return out if np.all(np.isfinite(out)) else None


def map_name(name, kv):
    index = kv.key_to_index

    def single(word):
        i = index.get(word)
        return None if i is None else normalise(kv.vectors[i])

    if (v := single(name)) is not None:
        return v
    lower = name.lower()
    if lower != name and (v := single(lower)) is not None:
        return v
    parts = name.split()
    if len(parts) > 1:
        phrase = "_".join(parts)
        if (v := single(phrase)) is not None:
            return v
        if phrase.lower() != phrase and (v := single(phrase.lower())) is not None:
            return v
    toks = tokens(name)
    if not toks or (len(toks) == 1 and toks[0] == name):
        return None
    total = np.zeros(kv.vector_size, dtype=np.float64)
    for t in toks:
        i = index.get(t)
        if i is None:
            i = index.get(t.lower())
            if i is None:
                return None
        total += kv.vectors[i]
    return normalise((total / len(toks)).astype(np.float32))


def main():
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    vectors, fmt, names_path, wnid_path = sys.argv[1:5]
    out = sys.argv[5] if len(sys.argv) == 6 else None
    binary = {"word2vec-binary": True, "word2vec-text": False, "fasttext": False, "glove": False}[fmt]
    rss_before = vm_rss_bytes()

    started = time.perf_counter()
    cpu_started = cpu_seconds()
    with open(wnid_path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    names = read_names(names_path)
    kv = KeyedVectors.load_word2vec_format(vectors, binary=binary, no_header=(fmt == "glove"))
    rows, kept = [], []
    for wnid in wnids:
        for name in names[wnid]:
            v = map_name(name, kv)
            if v is not None:
                rows.append(v)
                kept.append(wnid)
                break
    matrix = np.stack(rows)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if out:
        matrix.astype("<f4").tofile(out)
        with open(out + ".wnids", "w") as f:
            f.writelines(w + "\n" for w in kept)
    print(json.dumps({
        "impl": "gensim",
        "gensim": gensim.__version__,
        "vectors": vectors,
        "format": fmt,
        "wnids": len(wnids),
        "mapped": len(kept),
        "unmapped": len(wnids) - len(kept),
        "dim": int(kv.vector_size),
        "rows_read": len(kv.key_to_index),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "import_seconds": import_seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
    }))


if __name__ == "__main__":
    main()
