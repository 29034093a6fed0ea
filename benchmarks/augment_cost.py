"""What the device-side augmentation costs next to the CFF step it feeds (issue 13: under 10%).

    python benchmarks/augment_cost.py                       # CPU, ViT[128 4 5], batch 512
    python benchmarks/augment_cost.py --device cuda --steps 20 --out augment_cost.json

The data is a CIFAR-10-shaped uint8 ImageStore on the device (as ``--dataset cifar10`` holds it),
so the measured input path is the trainer's own: index a batch, standardize it, make the two
views (ffkern.train.methods.first_batch), patchify. Per augmentation setting it reports:

  input_s  median time of that input path for one batch (both views)
  step_s   median time of one whole CFF training step: the input path plus every layer's forward,
           fused marginal SupCon loss, backward and AdamW step (ffkern.train.run_layers)
  ratio    input_s / step_s, the augmentation's share of the step

"none" (crop 0, no flip, no noise) is the input path without augmentation, so the augmentation's
own cost is input_s minus that row's. Timings synchronize the device around each call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from ffkern.bench.devinfo import cpu_name

SETTINGS = {
    "none": dict(shift=0, noise=0.0),
    "crop4+flip (CFF CIFAR)": dict(shift=4, noise=0.0, flip=True),
    "crop4+flip+noise": dict(shift=4, noise=0.2, flip=True),
    "crop4+rotate15 (Trifecta)": dict(shift=4, noise=0.0, rotate=15.0),
    "crop4+flip+randaug 2,9": dict(shift=4, noise=0.0, flip=True, randaug=(2, 9)),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, warmup, steps):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    from ffkern.train import rng
    from ffkern.train.augment import Augment
    from ffkern.train.data import ImageStore
    from ffkern.train.layerwise import make_local_layers, run_layers
    from ffkern.train.methods import first_batch, make_objective
    from ffkern.train.models import build_encoder
    from ffkern.train.schedules import margin_schedule

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--samples", type=int, default=4096, help="size of the fake uint8 training set on the device")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (args.samples, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (args.samples,), generator=gen).to(device)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    store = ImageStore(raw, mean, std)
    encoder = build_encoder("vit", (3, 32, 32), 10, width=args.width, depth=args.depth, heads=args.heads,
                            patch_size=4, seed=0).to(device)
    margins = margin_schedule("linear", args.depth, 0.4, 0.1)
    layers = make_local_layers(list(encoder.layers),
                               [make_objective("cff", encoder, m, backend=args.backend) for m in margins], lr=1e-3)

    results = {}
    for name, opts in SETTINGS.items():
        augment = Augment(**opts, pixel_mean=mean, pixel_std=std)
        counter = {"step": 0}

        def inputs():
            step = counter["step"]
            counter["step"] += 1
            idx = torch.randperm(args.samples, generator=rng.generator(0, rng.SHUFFLE, step))[:args.batch].to(device)
            return first_batch("cff", encoder, store[idx], labels[idx], augment=augment, num_views=2, seed=0,
                               epoch=0, step=step)

        def train_step():
            run_layers(layers, inputs(), train=True)

        input_s = _median_time(inputs, device, args.warmup, max(args.steps, 5))
        step_s = _median_time(train_step, device, args.warmup, args.steps)
        results[name] = {"input_s": input_s, "step_s": step_s, "ratio": input_s / step_s}
        print(f"{name:28s} input {1e3 * input_s:9.2f} ms   step {1e3 * step_s:9.2f} ms   ratio {100 * input_s / step_s:6.2f} %",
              flush=True)

    report = {
        "model": f"ViT[{args.width} {args.heads} {args.depth}], patch 4, CIFAR-10 shape, batch {args.batch}, two views",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": datetime.date.today().isoformat(), "loss_backend": args.backend, "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
