"""Helpers of bench/partitions.sh (see its header).

proxy PORT UPSTREAM_PORT STATS_FILE
    A TCP proxy on 127.0.0.1:PORT in front of the S3 server on 127.0.0.1:UPSTREAM_PORT that
    forwards both directions unchanged and counts bytes. Server->client bytes are attributed to
    the request the client last sent on that connection ("GET /bucket/key"): HTTP/1.1 without
    pipelining (object_store, curl) sends a request only once the previous answer was read, so
    every byte of an answer arrives before the next request is seen. On SIGTERM it writes
    {"down_bytes", "up_bytes", "connections", "requests", "objects": {"GET /b/k": bytes}} to
    STATS_FILE and exits.

peer URL --rank R --world-size W [--per-rank-batch-size B] [--epochs-fraction F]
    The peer: Python `webdataset` 1.0.2 streaming the train split of the shard directory
    s3://bucket/prefix from the S3 server at $AWS_ENDPOINT, one process per rank, the rank's
    shards chosen by webdataset's own `split_by_node` (shards[R::W], from RANK / WORLD_SIZE).
    Each shard is opened as `pipe:curl -s --fail URL` with URL a boto3-presigned GET (the S3
    request is signed in-process; curl moves the bytes). Pipeline: shardshuffle, shuffle(1000),
    decode("pil"), RandomResizedCrop(56, scale=(0.35, 1)) + RandomHorizontalFlip + to float
    CHW normalised (torchvision.transforms.v2), batched(B). Runs ceil(F * split samples / (B*W))
    batches, re-iterating the dataset at each epoch end (webdataset's epoch loop; the rank's
    epoch is its own shards). Prints the same JSON line as examples/plan_bench.rs, with its
    epoch boundary found the same way (the first batch holding a key the rank already
    delivered); cpu_seconds includes the finished curl children.

upload DIR s3://BUCKET/PREFIX [MANIFEST]
    Creates BUCKET if needed and uploads every file of DIR under PREFIX through the S3 API
    (boto3 `put_object`, one request per file) to the server at $AWS_ENDPOINT: the way shards
    reach a bucket in practice (`aws s3 cp`, devise's own writer). With MANIFEST, that file is
    uploaded as PREFIX/manifest.json instead of DIR's.

table ROWS.jsonl
    The Markdown tables of bench/partitions.sh from its JSON lines.
"""

import asyncio
import collections
import json
import math
import os
import resource
import signal
import statistics
import sys
import time


def proxy(port, upstream, stats_file):
    stats = {"down_bytes": 0, "up_bytes": 0, "connections": 0, "requests": 0}
    objects = collections.Counter()

    async def handle(creader, cwriter):
        stats["connections"] += 1
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            cwriter.close()
            return
        current = ["(none)"]

        async def up():
            # Request heads are parsed to know which object the answer bytes belong to; bodies
            # (Content-Length) are skipped.
            buf, body_left = b"", 0
            try:
                while data := await creader.read(1 << 16):
                    stats["up_bytes"] += len(data)
                    swriter.write(data)
                    buf += data
                    while True:
                        if body_left:
                            n = min(body_left, len(buf))
                            buf, body_left = buf[n:], body_left - n
                            if body_left:
                                break
                        end = buf.find(b"\r\n\r\n")
                        if end < 0:
                            break
                        head, buf = buf[:end].decode("latin-1").split("\r\n"), buf[end + 4 :]
                        method, target = (head[0].split(" ") + ["", ""])[:2]
                        current[0] = f"{method} {target.split('?')[0]}"
                        stats["requests"] += 1
                        for h in head[1:]:
                            k, _, v = h.partition(":")
                            if k.strip().lower() == "content-length":
                                body_left = int(v.strip())
                    await swriter.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if swriter.can_write_eof():
                    try:
                        swriter.write_eof()
                    except OSError:
                        pass

        async def down():
            try:
                while data := await sreader.read(1 << 16):
                    stats["down_bytes"] += len(data)
                    objects[current[0]] += len(data)
                    cwriter.write(data)
                    await cwriter.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                cwriter.close()

        await asyncio.gather(up(), down())
        swriter.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()
        with open(stats_file, "w") as f:
            json.dump({**stats, "objects": dict(objects)}, f)

    asyncio.run(main())


def cpu_seconds():
    r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in r)


def peer(argv):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--per-rank-batch-size", type=int)
    p.add_argument("--epochs-fraction", type=float, default=1.25)
    a = p.parse_args(argv)
    w = a.world_size
    b = a.per_rank_batch_size or 256 // w
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(a.rank), str(w)

    import boto3
    import torch
    import torchvision.transforms.v2 as T
    import webdataset as wds

    torch.set_num_threads(1)
    bucket, _, prefix = a.url.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    key = lambda name: f"{prefix}/{name}" if prefix else name
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key("manifest.json"))["Body"].read())
    shards = manifest["splits"]["train"]["shards"]
    epoch = manifest["splits"]["train"]["samples"]
    mine = shards[a.rank :: w]  # what split_by_node will keep; only for the rank's epoch length
    rank_epoch = sum(s["samples"] for s in mine)
    urls = []
    for s in shards:
        signed = s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key(s["name"])}, ExpiresIn=6 * 3600
        )
        urls.append(f"pipe:curl -s --fail '{signed}'")

    tf = T.Compose(
        [
            T.RandomResizedCrop(56, scale=(0.35, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    steps = math.ceil(a.epochs_fraction * epoch / (b * w))

    startup_cpu = cpu_seconds()  # imports (torch: a few CPU seconds) and presigning
    t0 = time.perf_counter()
    dataset = (
        wds.WebDataset(
            urls,
            shardshuffle=len(urls),
            detshuffle=True,
            seed=0,
            nodesplitter=wds.split_by_node,
            empty_check=False,
        )
        .shuffle(1000)
        .decode("pil")
        .to_tuple("__key__", "jpg", "cls")
        .map_tuple(str, tf, int)
        .batched(b, partial=False)
    )

    def batches():
        while True:  # one pass of the dataset = one epoch of this rank's shards
            yield from dataset

    waits, samples, seen, boundary_step = [], 0, set(), None
    it = batches()
    for step in range(steps):
        t = time.perf_counter()
        keys, images, labels = next(it)
        wait = time.perf_counter() - t
        samples += len(labels)
        waits.append(wait)
        if boundary_step is None and not seen.isdisjoint(keys):
            boundary_step = step
        seen.update(keys)
    seconds = time.perf_counter() - t0
    boundary = 0.0
    if boundary_step is not None:
        boundary = max(waits[max(0, boundary_step - 1) : boundary_step + 2])
    row = {
        "rank": a.rank,
        "world_size": w,
        "per_rank_batch_size": b,
        "partitions": None,
        "steps": steps,
        "samples": samples,
        "seconds": seconds,
        "time_to_first_batch_s": waits[0],
        "median_batch_wait_s": statistics.median_low(waits),
        "max_batch_wait_s": max(waits),
        "longest_epoch_boundary_wait_s": boundary,
        "boundary_step": boundary_step,
        "cpu_seconds": cpu_seconds(),
        "images_per_sec": samples / seconds,
        "startup_cpu_seconds": startup_cpu,
        "rank_shards": len(mine),
        "rank_epoch_samples": rank_epoch,
    }
    print(json.dumps(row), flush=True)
    os._exit(0)  # do not wait for the curl of a shard left half-read


def upload(argv):
    import boto3

    src, url = argv[0], argv[1]
    manifest = argv[2] if len(argv) > 2 else None
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"])
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    for name in sorted(os.listdir(src)):
        path = manifest if (manifest and name == "manifest.json") else os.path.join(src, name)
        with open(path, "rb") as f:
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=f.read())


def table(path):
    rows = [json.loads(l) for l in open(path)]
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault(r["world_size"], collections.OrderedDict()).setdefault(
            (r["design"], r.get("round", 1)), []
        ).append(r)
    for w, designs in groups.items():
        print(f"\n**W = {w}** (global batch {256 // w * w}, per-rank {256 // w})\n")
        print(
            "| design | bytes/rank (MB, each) | total MB | total / split | max rank share "
            "deviation from 1/W | MB/s per rank | MB/s per core | time to first batch (s) | "
            "longest epoch-boundary wait (s) | longest wait anywhere (s) | median batch wait (s) | "
            "first batch / median | boundary / median | MB from the shard cache, total |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (design, rnd), rs in designs.items():
            rs.sort(key=lambda r: r["rank"])
            mb = [r["bytes"] / 1e6 for r in rs]
            total = sum(mb)
            split = rs[0]["split_bytes"] / 1e6
            dev = max(abs(m / total - 1 / w) for m in mb) if total else float("nan")
            rate = [r["bytes"] / 1e6 / r["seconds"] for r in rs]
            per_core = sum(r["bytes"] for r in rs) / 1e6 / sum(r["cpu_seconds"] for r in rs)
            fmt = lambda v: ", ".join(f"{x:.0f}" for x in v)
            first = max(r["time_to_first_batch_s"] for r in rs)
            boundary = max(r["longest_epoch_boundary_wait_s"] for r in rs)
            median = statistics.median(r["median_batch_wait_s"] for r in rs)
            disk = sum(
                r.get("data_stats", {}).get("cache", {}).get("disk_bytes", 0) for r in rs
            ) / 1e6
            print(
                f"| {design} | {fmt(mb)} | {total:.0f} | {total / split:.2f} | {dev:.3f} | "
                f"{fmt(rate)} | {per_core:.1f} | {first:.3f} | {boundary:.3f} | "
                f"{max(r['max_batch_wait_s'] for r in rs):.3f} | {median:.3f} | "
                f"{first / median:.1f} | {boundary / median:.1f} | {disk:.0f} |"
            )
        ours = [rs for (d, _), rs in designs.items() if d == "ours"]
        peer_ = [rs for (d, _), rs in designs.items() if d == "peer"]
        if ours and peer_:
            ratio = lambda f: statistics.median(f(o) for o in ours) / statistics.median(
                f(p) for p in peer_
            )
            per_cpu = lambda key: lambda rs: sum(r[key] for r in rs) / sum(
                r["cpu_seconds"] for r in rs
            )
            print(
                f"\nours / peer: MB/s per core {ratio(per_cpu('bytes')):.2f}x, "
                f"images per CPU second {ratio(per_cpu('samples')):.2f}x "
                "(bytes count what was downloaded, used or not)"
            )


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "proxy":
        proxy(int(rest[0]), int(rest[1]), rest[2])
    elif cmd == "peer":
        peer(rest)
    elif cmd == "upload":
        upload(rest)
    elif cmd == "table":
        table(rest[0])
    else:
        sys.exit(f"unknown command {cmd}")
