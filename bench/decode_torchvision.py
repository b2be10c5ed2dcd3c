"""Decode + augment benchmark of torchvision on PIL, one thread: the reference for
examples/decode_bench.rs (same files, same pass policy, same JSON line, "impl":"torchvision").

Per image: PIL.Image.open(BytesIO(bytes)).convert("RGB") (torchvision's ImageFolder loader), then
the standard ImageNet training transform: RandomResizedCrop(size, scale=(min_scale, 1)) (PIL
bilinear, antialiased), RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet mean, std): a
[3, size, size] float32 tensor. torch.set_num_threads(1). Every file is read into memory first,
one warm-up pass, then passes until DECODE_BENCH_SECS (default 3) seconds have passed; wall-clock
and CPU-time (time.process_time) rates are printed.
TV_API=v2 uses torchvision.transforms.v2 (ToImage + ToDtype(float32, scale=True)) instead.

Run (normally through `bash bench/decode.sh`):
    .deps/bench-venv/bin/python bench/decode_torchvision.py ../shared/data/imagenet-sample-100
Env: DECODE_SIZE (224), DECODE_MIN_SCALE (0.08), DECODE_BENCH_SECS (3), TV_API (classic|v2).
"""
import io
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)
size = int(os.environ.get("DECODE_SIZE", "224"))
min_scale = float(os.environ.get("DECODE_MIN_SCALE", "0.08"))
min_secs = float(os.environ.get("DECODE_BENCH_SECS", "3"))
api = os.environ.get("TV_API", "classic")
mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
if api == "v2":
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(),
                    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
else:
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(mean, std)])

d = sys.argv[1]
images = [open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))]
checksum = 0.0


def one_pass(seed):
    global checksum
    torch.manual_seed(seed)
    for b in images:
        x = tf(Image.open(io.BytesIO(b)).convert("RGB"))
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        checksum += float(x[0, 0, 0])


one_pass(2**31)  # warm-up
cpu_start = time.process_time()
start = time.perf_counter()
passes = 0
while passes == 0 or time.perf_counter() - start < min_secs:
    one_pass(passes)
    passes += 1
seconds = time.perf_counter() - start
cpu = time.process_time() - cpu_start
print(json.dumps({"impl": "torchvision" if api == "classic" else "torchvision-v2",
                  "size": size, "min_scale": min_scale, "images": len(images), "passes": passes,
                  "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                  "images_per_sec": round(passes * len(images) / seconds, 1),
                  "images_per_cpu_sec": round(passes * len(images) / cpu, 1),
                  "checksum": round(checksum, 3)}))
