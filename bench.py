"""Time MosRep's training step for two views, multi-crop and mosaic, against the ideal cost ratios.

python bench.py [--device cpu|cuda] [--framework moco|byol|both] [--supervised] [--data DIR] ...

For each framework the three view modes run round-robin (one step of each per round, the order
rotating each round) on synthetic device-resident inputs, so drift and data loading hit no mode
more than another. A step is what train.py does: mosaic built on the device, forward under
autocast, backward, SGD (momentum 0.9 for BYOL too: LARS would only add a constant), EMA update.
Cost units U per image (a backward = 2 forwards): BYOL two 8, local views 11; MoCo two 4, local 7.
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import models
from mosaic import make_mosaic

MODES = ("two", "multicrop", "mosaic")
UNITS = {"byol": {"two": 8, "multicrop": 11, "mosaic": 11}, "moco": {"two": 4, "multicrop": 7, "mosaic": 7}}
CPU_DEFAULTS = dict(arch="resnet18", stem="cifar", image_size=32, crop_size=16, batch_size=32, steps=5,
                    warmup=2, amp="off")
CUDA_DEFAULTS = dict(arch="resnet50", stem="imagenet", image_size=224, crop_size=112, batch_size=64, steps=20,
                     warmup=5, amp="bf16")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unset flags take device-dependent defaults. cpu: " + str(CPU_DEFAULTS)
                                + ". cuda (the paper's ImageNet setting, batch per GPU): " + str(CUDA_DEFAULTS))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--arch", choices=models.ARCHS)
    p.add_argument("--stem", choices=("imagenet", "cifar"))
    p.add_argument("--image-size", type=int, help="global view side (px)")
    p.add_argument("--crop-size", type=int, help="small crop side (px); the mosaic is sqrt(M) times it")
    p.add_argument("--crops", type=int, default=4, help="M small crops per image, a perfect square")
    p.add_argument("--jitter", type=float, help="max mosaic shift (px), default round(crop_size * 48/112)")
    p.add_argument("--batch-size", type=int, help="images per step (per GPU)")
    p.add_argument("--steps", type=int, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (>= 1; the last one measures memory)")
    p.add_argument("--framework", choices=("moco", "byol", "both"), default="both")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype")
    p.add_argument("--data", default=None, help="ImageFolder root for the data-pipeline timing (real JPEGs); "
                   "default: synthetic PIL images, so no decode")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="loader workers to project the data rate for (default: CPU count)")
    p.add_argument("--supervised", action="store_true", help="also time a supervised ResNet step (the ceiling)")
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu")
    for key, value in (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.jitter is None:
        args.jitter = round(args.crop_size * 48 / 112)
    if math.isqrt(args.crops) ** 2 != args.crops or args.batch_size < args.crops or args.warmup < 1 or args.steps < 1:
        sys.exit(f"bench.py: need --crops a perfect square (got {args.crops}), --batch-size >= --crops "
                 f"(got {args.batch_size}), --warmup >= 1 and --steps >= 1")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def proc_status(field):
    """A /proc/self/status field in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def reset_peak(device):
    """Start a peak-memory window; returns the baseline (MiB) to subtract, or None if unmeasurable."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    try:   # Linux: hand freed heap back (honest baseline), then reset VmHWM to the current RSS
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        return None
    return proc_status("VmRSS")


def read_peak(device, baseline):
    if baseline is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = proc_status("VmHWM")
    return None if peak is None else peak - baseline


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_step(model, params, device, amp, loss_fn):
    """One optimisation step as a closure: forward (autocast), backward, SGD, [EMA]."""
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step(*inputs):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(*inputs)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if hasattr(model, "update_target"):
            model.update_target(0.99)
    return step


def bench_framework(framework, args, device, inputs):
    x1, x2, crops = inputs
    if framework == "moco":
        learner = models.MoCo(args.arch, args.stem, queue_size=65536 if args.image_size >= 64 else 4096)
    else:
        learner = models.BYOL(args.arch, args.stem)
    learner = learner.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    step = make_step(learner, [p for p in learner.parameters() if p.requires_grad], device, args.amp,
                     lambda a, b, local: learner(a, b, local)["loss"])

    def local_views(mode):
        if mode == "two":
            return None
        if mode == "multicrop":
            return crops
        mosaic = make_mosaic(crops, args.jitter, 0.5)
        if device.type == "cuda":
            mosaic = mosaic._replace(images=mosaic.images.contiguous(memory_format=torch.channels_last))
        return mosaic

    times, memory = {m: [] for m in MODES}, {}
    for r in range(args.warmup + args.steps):
        for mode in MODES[r % 3:] + MODES[:r % 3]:   # rotate the order each round
            baseline = reset_peak(device) if r == args.warmup - 1 else None
            t = timed(device, lambda: step(x1, x2, local_views(mode)))
            if r == args.warmup - 1:
                memory[mode] = read_peak(device, baseline)
            if r >= args.warmup:
                times[mode].append(t)
    build = [timed(device, lambda: make_mosaic(crops, args.jitter, 0.5)) for _ in range(args.warmup + args.steps)]
    del learner, step
    return {m: statistics.median(times[m]) for m in MODES}, memory, statistics.median(build[args.warmup:])


def bench_supervised(args, device, x1):
    trunk = models.Trunk(args.arch, args.stem)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(trunk.out_channels, 1000))
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    labels = torch.randint(0, 1000, (x1.shape[0],), device=device)
    step = make_step(model, model.parameters(), device, args.amp, lambda x, y: F.cross_entropy(model(x), y))
    times = [timed(device, lambda: step(x1, labels)) for _ in range(args.warmup + args.steps)]
    return statistics.median(times[args.warmup:])


def bench_data(framework, args, num_crops):
    """Images/s of one loader worker (one thread, main process) making 2 + num_crops views per image."""
    transform = data.MultiViewTransform(framework, args.image_size, args.crop_size, num_crops)
    count = max(64, 2 * args.batch_size)
    rng = np.random.default_rng(0)
    if args.data:
        folder = data.build_dataset("imagefolder", args.data, True, None)
        picks = rng.choice(len(folder), size=min(count, len(folder)), replace=False)
        load = lambda i: folder[int(i)][0]   # JPEG decode included
    else:
        shape = (args.image_size, args.image_size, 3)
        picks = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]
        load = lambda image: image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in a DataLoader worker
    start = time.perf_counter()
    for pick in picks:
        transform(load(pick))
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(picks) / elapsed


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    began = time.perf_counter()
    print(f"# device: {device_name(device)} | torch {torch.__version__} | python {platform.python_version()}")
    print(f"# command: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
    print("# resolved: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    print(f"# step: synthetic inputs on {device.type}, autocast {args.amp}, SGD momentum 0.9 for both frameworks, "
          f"EMA 0.99; mem = {'max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth'} (MiB)")
    fmt = lambda b: b.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else b
    B, M, S, s = args.batch_size, args.crops, args.image_size, args.crop_size
    x1, x2 = fmt(torch.randn(B, 3, S, S, device=device)), fmt(torch.randn(B, 3, S, S, device=device))
    crops = torch.randn(B, M, 3, s, s, device=device)
    supervised = bench_supervised(args, device, x1) if args.supervised else None
    frameworks = ("byol", "moco") if args.framework == "both" else (args.framework,)
    header = f"{'framework':<9} {'views':<9} {'step ms':>9} {'img/s':>8} {'mem MiB':>8} {'x two':>6} {'U':>3} {'ideal':>6} {'effic.':>6}"
    print(header + "\n" + "-" * len(header))
    if supervised is not None:
        print(f"{'supervis.':<9} {'one':<9} {supervised * 1e3:9.1f} {B / supervised:8.1f} {'':>8} {'':>6} {3:>3}")
    summary = []
    for framework in frameworks:
        step, memory, build = bench_framework(framework, args, device, (x1, x2, crops))
        for mode in MODES:
            units = UNITS[framework][mode]
            ips, ideal = B / step[mode], units / UNITS[framework]["two"]
            eff = f"{ips / (B / supervised * 3 / units):6.2f}" if supervised else f"{'-':>6}"
            mem = f"{memory[mode]:8.0f}" if memory.get(mode) is not None else f"{'n/a':>8}"
            print(f"{framework:<9} {mode:<9} {step[mode] * 1e3:9.1f} {ips:8.1f} {mem} "
                  f"{step[mode] / step['two']:6.2f} {units:>3} {ideal:6.3f} {eff}")
        print(f"  make_mosaic alone: {build * 1e3:.2f} ms = {100 * build / step['mosaic']:.1f} % of the mosaic step")
        rate_two, rate_all = bench_data(framework, args, 0), bench_data(framework, args, M)
        need = math.ceil(B / step["mosaic"] / rate_all)
        print(f"  data ({'JPEG ' + args.data if args.data else 'synthetic PIL, no decode'}): {rate_all:.1f} img/s per "
              f"worker for 2+{M} views ({rate_two:.1f} for 2 views); x {args.workers} workers = "
              f"{rate_all * args.workers:.0f} img/s; the mosaic step needs >= {need} workers")
        summary.append(f"RATIO framework={framework} multicrop/two={step['multicrop'] / step['two']:.2f} "
                       f"mosaic/two={step['mosaic'] / step['two']:.2f} ideal={UNITS[framework]['mosaic'] / UNITS[framework]['two']:g}")
    print(f"# effic. = img/s / (supervised img/s x 3 / U); total time {time.perf_counter() - began:.0f} s")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
