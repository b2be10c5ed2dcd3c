"""The peer of bench/train_step.sh: the same training steps in PyTorch eager (torch 2.11, the
libtorch our binary links), written the way a torchvision user writes them.

Modes (each matches one stage of `devise train`):
  softmax        torchvision resnet18(num_classes) at SIZE px, batch BATCH, cross-entropy, SGD
                 (momentum 0.9, weight decay 5e-4), optimizer.zero_grad() (set_to_none), loss.item()
  devise         frozen encoder (eval mode, no_grad) -> Linear(512, 300, bias=False) -> the DeViSE
                 hinge rank loss (margin 0.1, summed over violating labels, batch mean) against
                 unit label vectors; Adagrad
  devise-cached  the same on cached [N, 512] features (the projection stage alone)
Input: one fixed random batch (no data loading: the peer gets its data for free).
Prints one JSON line: per-window mean step ms (windows of WINDOW steps, the first dropped).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["softmax", "devise", "devise-cached"], required=True)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--window", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--size", type=int, default=64)
p.add_argument("--classes", type=int, default=20)
p.add_argument("--cached", type=int, default=7000, help="cached feature rows (devise-cached)")
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
x = torch.randn(a.batch, 3, a.size, a.size)
y = torch.randint(0, a.classes, (a.batch,))
labels = F.normalize(torch.randn(a.classes, 300), dim=1)


def hinge_rank_loss(emb, labels, y, margin=0.1):
    scores = emb @ labels.t()
    true = scores.gather(1, y.unsqueeze(1))
    not_true = 1.0 - torch.zeros_like(scores).scatter_(1, y.unsqueeze(1), 1.0)
    return ((scores - true + margin).clamp_min(0) * not_true).sum(1).mean()


if a.mode == "softmax":
    model = torchvision.models.resnet18(num_classes=a.classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()
else:
    encoder = torchvision.models.resnet18()
    encoder.fc = torch.nn.Identity()
    encoder.eval()
    for q in encoder.parameters():
        q.requires_grad_(False)
    projection = torch.nn.Linear(512, 300, bias=False)
    opt = torch.optim.Adagrad(projection.parameters(), lr=0.003)
    if a.mode == "devise-cached":
        with torch.no_grad():
            cache = torch.randn(a.cached, 512)
        gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        if a.mode == "devise":
            with torch.no_grad():
                features = encoder(x)
            target = y
        else:
            rows = torch.randint(0, a.cached, (a.batch,), generator=gen)
            features, target = cache.index_select(0, rows), y
        loss = hinge_rank_loss(projection(features), labels, target)
        loss.backward()
        opt.step()
        return loss.item()

times = []
for _ in range(a.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
windows = [sum(times[i:i + a.window]) / a.window * 1000
           for i in range(0, a.steps - a.window + 1, a.window)][1:]
print(json.dumps({"mode": a.mode, "windows_ms": [round(w, 3) for w in windows]}))
