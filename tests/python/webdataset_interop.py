"""Python `webdataset` side of the interoperability test (tests/it/shards.rs).

Run by the Rust tests with the venv of scripts/setup.sh (.deps/venv/bin/python, which has
webdataset 1.0.2 installed):

  read SHARD...                  iterate the shards with webdataset.WebDataset (no shuffling) and
                                 print one JSON line per sample: url, key, sorted field names,
                                 cls (int), sha256 of the image bytes, the .json wnid if any
  write PATTERN MAXCOUNT LIST    write standard ImageNet WebDataset shards with
                                 webdataset.ShardWriter(PATTERN, maxcount=MAXCOUNT): one sample
                                 per line of LIST (TAB-separated key, image path, cls, wnid) with
                                 fields jpg (the file's bytes), cls (int) and json ({"wnid": ...})

Exit status 0 on success; any exception is a failure with its traceback.
"""

import hashlib
import json
import sys

import webdataset as wds


def read(urls):
    # shardshuffle=False: shards in the order given, samples in tar order.
    dataset = wds.WebDataset(urls, shardshuffle=False)
    for sample in dataset:
        image = sample.get("jpg", sample.get("png"))
        meta = json.loads(sample["json"]) if "json" in sample else {}
        print(
            json.dumps(
                {
                    "url": sample["__url__"],
                    "key": sample["__key__"],
                    "fields": sorted(k for k in sample if not k.startswith("__")),
                    "cls": int(sample["cls"]),
                    "image_sha256": hashlib.sha256(image).hexdigest() if image else None,
                    "wnid": meta.get("wnid"),
                }
            )
        )


def write(pattern, maxcount, listing):
    with open(listing) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    with wds.ShardWriter(pattern, maxcount=int(maxcount), verbose=0) as sink:
        for key, path, cls, wnid in rows:
            with open(path, "rb") as image:
                data = image.read()
            sink.write({"__key__": key, "jpg": data, "cls": int(cls), "json": {"wnid": wnid}})


def main(argv):
    if len(argv) >= 2 and argv[0] == "read":
        read(argv[1:])
    elif len(argv) == 4 and argv[0] == "write":
        write(*argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
