"""The PyTorch reference for bench/gpu.sh: a torchvision training loop on one synthetic batch kept
on the GPU, the same work `devise bench-step` times.

  softmax   torchvision resnet50(num_classes) at SIZE px, bf16 autocast, channels-last,
            cross-entropy, SGD (momentum 0.9, weight decay 5e-4), loss.item() every step
  devise    frozen encoder (eval mode, no_grad, autocast) -> float32 features ->
            Linear(2048, 300, bias=False) -> the DeViSE hinge rank loss (margin 0.1) -> Adagrad
cudnn.benchmark = True (as torchvision's reference). Prints one JSON line like bench-step's.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--stage", choices=["softmax", "devise"], default="softmax")
p.add_argument("--encoder", default="resnet50")
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--classes", type=int, default=1000)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
p.add_argument("--channels-last", action="store_true")
p.add_argument("--device", default="cuda")
a = p.parse_args()

dev = torch.device(a.device)
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
fmt = torch.channels_last if a.channels_last else torch.contiguous_format
x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=dev).to(memory_format=fmt)
y = torch.randint(0, a.classes, (a.batch_size,), device=dev)
labels = F.normalize(torch.randn(a.classes, 300, device=dev), dim=1)
amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")


def hinge_rank_loss(emb, labels, y, margin=0.1):
    scores = emb @ labels.t()
    true = scores.gather(1, y.unsqueeze(1))
    not_true = 1.0 - torch.zeros_like(scores).scatter_(1, y.unsqueeze(1), 1.0)
    return ((scores - true + margin).clamp_min(0) * not_true).sum(1).mean()


build = getattr(torchvision.models, a.encoder)
if a.stage == "softmax":
    model = build(num_classes=a.classes).to(dev, memory_format=fmt)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad()
        with torch.autocast(**amp):
            features = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(
                model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        loss = F.cross_entropy(model.fc(features.float()), y)
        loss.backward()
        opt.step()
        return loss.item()
else:
    encoder = build()
    dim = encoder.fc.in_features
    encoder.fc = torch.nn.Identity()
    encoder = encoder.to(dev, memory_format=fmt).eval()
    for q in encoder.parameters():
        q.requires_grad_(False)
    projection = torch.nn.Linear(dim, 300, bias=False).to(dev)
    opt = torch.optim.Adagrad(projection.parameters(), lr=0.003)

    def step():
        opt.zero_grad()
        with torch.no_grad(), torch.autocast(**amp):
            features = encoder(x)
        loss = hinge_rank_loss(projection(features.float()), labels, y)
        loss.backward()
        opt.step()
        return loss.item()

for _ in range(a.warmup):
    step()
torch.cuda.synchronize() if dev.type == "cuda" else None
t = time.perf_counter()
for _ in range(a.steps):
    last = step()
torch.cuda.synchronize() if dev.type == "cuda" else None
seconds = time.perf_counter() - t
print(json.dumps({"encoder": a.encoder, "image_size": a.image_size, "batch_size": a.batch_size,
                  "stage": a.stage, "precision": a.precision, "channels_last": a.channels_last,
                  "device": str(dev), "result": {"images_per_sec": a.steps * a.batch_size / seconds,
                  "step_ms": 1000 * seconds / a.steps, "last_loss": last}}))
