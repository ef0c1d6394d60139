"""Time MosRep's training step for two views, multi-crop and mosaic, against the ideal cost ratios.

For each framework the three view modes run round-robin on synthetic device-resident inputs (one
step of each mode per round, the order rotating), so drift hits all modes alike. A step is what
train.py does: mosaic built on the device, forward under autocast, backward, SGD momentum 0.9
(for BYOL too, instead of LARS), EMA update. Forward-equivalents per image, U (a backward = 2
forwards): BYOL two views 8, multi-crop / mosaic 11; MoCo 4 and 7. efficiency = img/s divided
by what U predicts from the supervised step (U = 3, timed in the same rounds): sup. img/s x 3 / U.
The image mixtures of train.py --mix run beside them as two+flatten, mosaic+cutmix...: flatten adds no pass,
cutmix (MoCo) adds an online pass over x1m and a target pass over x2m (U + 4). After the table: the device
augmentation's time per batch, and the loader's JPEGs per worker-second at the paper's geometry: the LOADER line,
for train.py's loader (torchvision.io decode, crop and flip on the uint8 tensor) beside the PIL loader it replaced
(PIL decode, crop and flip) and the full CPU recipe (the loader before augment.py).
On a CPU shared with other jobs, OMP_NUM_THREADS=1 gives steadier, often faster, timings.
"""
import argparse
import ctypes
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import augment
import data
import eval_transfer
import models
from mosaic import default_jitter, make_mosaic

MODES = ("two", "multicrop", "mosaic")
UNITS = {"byol": {"two": 8, "multicrop": 11, "mosaic": 11}, "moco": {"two": 4, "multicrop": 7, "mosaic": 7}}
# The image mixtures (train.py --mix), timed beside the view modes as "<views>+<mix>". flatten mixes the online
# views in place: no extra pass. cutmix (MoCo only) adds an online pass over x1m (forward + backward = 3) and a
# target pass over x2m (1): U + 4.
MIXES = {"byol": ("flatten",), "moco": ("flatten", "cutmix")}
MIX_UNITS = {"flatten": 0, "cutmix": 4}
DEFAULTS = {"cpu": dict(arch="resnet18", stem="cifar", image_size=32, crop_size=16, batch_size=32, steps=5,
                        warmup=2, amp="off"),
            "cuda": dict(arch="resnet50", stem="imagenet", image_size=224, crop_size=112, batch_size=64,
                         steps=20, warmup=5, amp="bf16")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Unset flags take device-dependent defaults. cpu (CIFAR-like): "
                                f"{DEFAULTS['cpu']}. cuda (the paper's ImageNet setting, batch per GPU): "
                                f"{DEFAULTS['cuda']}.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--arch", choices=models.ARCHS)
    p.add_argument("--stem", choices=("imagenet", "cifar"))
    p.add_argument("--image-size", type=int, help="global view side (px)")
    p.add_argument("--crop-size", type=int, help="small crop side (px); the mosaic is sqrt(M) times it")
    p.add_argument("--crops", type=int, default=4, help="M small crops per image, a perfect square")
    p.add_argument("--jitter", type=float, help="max mosaic shift (px); default 48 px per 224 px of mosaic")
    p.add_argument("--batch-size", type=int, help="images per step (per GPU)")
    p.add_argument("--steps", type=int, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed rounds before them")
    p.add_argument("--framework", choices=("moco", "byol", "both"), default="both")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype")
    p.add_argument("--data", help="ImageFolder root: time the data pipeline on its JPEGs (decode included); "
                   "default: synthetic PIL images of --image-size")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers to project the data rate "
                   "to (default: CPU count)")
    p.add_argument("--supervised", action="store_true", help="also time a supervised ResNet step (the ceiling)")
    p.add_argument("--loader-only", action="store_true", help="only the LOADER comparison (about a minute)")
    p.add_argument("--transfer", type=int, nargs=3, metavar=("N", "D", "K"), help="only time eval_transfer.py's "
                   "45-lambda sweep + refit on N x D synthetic features of K classes (the goal: 50000 2048 10)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                 "use --device cpu")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.jitter is None and args.crops > 0:
        args.jitter = default_jitter(math.isqrt(args.crops) * args.crop_size)
    if math.isqrt(args.crops) ** 2 != args.crops or args.batch_size < args.crops or args.warmup < 0 or args.steps < 1:
        sys.exit(f"bench.py: need a perfect square --crops (got {args.crops}), --batch-size >= --crops "
                 f"(got {args.batch_size}), --warmup >= 0 and --steps >= 1")
    return args


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rss_mib(field):
    """VmRSS or VmHWM of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_memory(device, fn):
    """Run fn; cuda: max_memory_allocated (MiB); cpu: peak RSS growth during fn (MiB, Linux) or None."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        timed(device, fn)
        return torch.cuda.max_memory_allocated() / 2**20
    try:   # hand freed heap back to the OS for an honest baseline, then reset VmHWM to the current RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = rss_mib("VmRSS")
    except (OSError, AttributeError):
        baseline = None
    fn()
    peak = rss_mib("VmHWM")
    return None if peak is None or baseline is None else peak - baseline


def make_step(model, device, amp, loss_fn):
    """A closure for one optimisation step: forward under autocast, backward, SGD, EMA if any."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
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


def bench_framework(framework, args, device, x1, x2, crops, sup_step=None):
    """Median step time per mode, peak memory per mode, median make_mosaic time. The supervised
    step, if given, joins the round-robin as a fourth mode so that it sees the same drift."""
    def learner_step(mix):
        if framework == "moco":
            learner = models.MoCo(args.arch, args.stem, queue_size=65536 if args.image_size >= 64 else 4096, mix=mix)
        else:
            learner = models.BYOL(args.arch, args.stem, mix=mix)
        learner = learner.to(device, memory_format=torch.channels_last if device.type == "cuda"
                             else torch.preserve_format)
        return make_step(learner, device, args.amp, lambda a, b, local: learner(a, b, local)["loss"])

    def local_views(mode):
        if mode != "mosaic":
            return crops if mode == "multicrop" else None
        return make_mosaic(crops, args.jitter)   # the trunk puts the mosaics in its weights' layout

    steps = {mix: learner_step(mix) for mix in ("off",) + MIXES[framework]}
    runs = {mode: (lambda mode=mode: steps["off"](x1, x2, local_views(mode))) for mode in MODES}
    for mix in MIXES[framework]:
        runs.update({f"{mode}+{mix}": (lambda mode=mode, mix=mix: steps[mix](x1, x2, local_views(mode)))
                     for mode in ("two", "mosaic")})
    if sup_step is not None:
        runs["supervised"] = sup_step
    names, times = list(runs), {mode: [] for mode in runs}
    for r in range(args.warmup + args.steps):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            t = timed(device, runs[mode])
            if r >= args.warmup:
                times[mode].append(t)
    # One more, untimed round for peak memory (its reset would slow a timed step).
    memory = {mode: peak_memory(device, run) for mode, run in runs.items()}
    build = [timed(device, lambda: make_mosaic(crops, args.jitter)) for _ in range(args.warmup + args.steps)]
    return {mode: statistics.median(t) for mode, t in times.items()}, memory, statistics.median(build[args.warmup:])


def loader_line(args):
    """Run bench_loader, print where its JPEGs came from, return the LOADER line: JPEGs per worker-second of the full
    CPU recipe, of train.py's loader and of the PIL loader, and train.py's loader's speedup over each."""
    rates, source = bench_loader(args)
    print(f"# loader at the paper's geometry: 2 views of 224 px + 4 crops of 112 px, BYOL recipe, one thread; {source}")
    full, loader, pil = rates["full"], rates["loader"], rates["pil"]
    return (f"LOADER full_recipe={full:.1f} loader={loader:.1f} speedup={loader / full:.2f} pil_loader={pil:.1f} "
            f"over_pil={loader / pil:.2f}")


def time_augment(framework, args, device):
    """Median seconds of augment.augment over one batch's uint8 views: x1, x2 [B, 3, S, S] and the crops."""
    B, M, S, s = args.batch_size, args.crops, args.image_size, args.crop_size
    u1, u2 = (torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device=device) for _ in range(2))
    crops = torch.randint(0, 256, (B * M, 3, s, s), dtype=torch.uint8, device=device)
    run = lambda: [augment.augment(u, framework, view) for u, view in ((u1, "x1"), (u2, "x2"), (crops, "crops"))]
    times = [timed(device, run) for _ in range(args.warmup + args.steps)]
    return statistics.median(times[args.warmup:])


def supervised_step(args, device, x1):
    """Plain ResNet (the same Trunk) + linear classifier on one view per image: the ceiling."""
    trunk = models.Trunk(args.arch, args.stem)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(trunk.out_channels, 1000))
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    labels = torch.randint(0, 1000, (x1.shape[0],), device=device)
    step = make_step(model, device, args.amp, lambda x, y: F.cross_entropy(model(x), y))
    return lambda: step(x1, labels)


def bench_data(framework, args, num_crops, images):
    """Images/s of one loader worker (main process, one thread) making 2 + num_crops uint8 views per image."""
    return loader_rate(data.MultiViewTransform(framework, args.image_size, args.crop_size, num_crops), images)


def loader_rate(transform, images):
    """Images per second of one thread applying transform to each image (a PIL image, or a callable that
    decodes one), in one pass: what one DataLoader worker sustains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in a DataLoader worker
    start = time.perf_counter()
    for image in images:
        transform(image() if callable(image) else image)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(images) / seconds


def full_recipe_view(framework, size, recipe):
    """The whole view recipe in the worker with PIL, as the loader ran it before augment.py moved the photometric
    half to the device: the reference that the LOADER line compares against."""
    steps = [v2.RandomResizedCrop(size, scale=recipe.scale, antialias=True), v2.RandomHorizontalFlip(),
             v2.RandomApply([v2.ColorJitter(*augment.COLOUR_JITTER[framework])], p=0.8), v2.RandomGrayscale(p=0.2)]
    if recipe.blur > 0 and size >= 64:
        steps.append(v2.RandomApply([v2.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=recipe.blur))
    if recipe.solarize > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=recipe.solarize))
    return v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.MEAN,
                                                                                               augment.STD)])


def photo_like_jpegs(folder, count=48, size=(500, 375)):
    """Write `count` ImageNet-sized JPEGs (quality 90) into folder: smooth random colour fields upscaled to 500x375
    plus Gaussian noise of sigma 10, so that they compress about as photos do (~60-90 kB). Returns the paths."""
    rng, paths = np.random.default_rng(0), []
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (size[1], size[0], 3))
        paths.append(os.path.join(folder, f"{i:03d}.jpg"))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def pil_loader_views(framework, size, crop_size, num_crops):
    """The PIL loader that data.load_image and the tensor crops replaced: PIL image -> RandomResizedCrop + flip on
    PIL -> PILToTensor, for x1, x2 and the crops: the reference for the LOADER line's over_pil."""
    recipe = augment.RECIPES[framework]
    x1, x2, crop = (v2.Compose([v2.RandomResizedCrop(side, scale=recipe[name].scale, antialias=True),
                                v2.RandomHorizontalFlip(), v2.PILToTensor()])
                    for side, name in ((size, "x1"), (size, "x2"), (crop_size, "crops")))

    def views(image):
        crops = torch.stack([crop(image) for _ in range(num_crops)])   # first, as MultiViewTransform draws them
        return x1(image), x2(image), crops
    return views


def bench_loader(args, framework="byol", rounds=3):
    """JPEGs per worker-second at the paper's geometry (2 views of 224 px + 4 crops of 112 px), decode included,
    for the full CPU recipe, train.py's loader (data.load_image + data.MultiViewTransform) and the PIL loader it
    replaced, on --data's JPEGs or on ImageNet-sized ones made in a temporary folder. The three take turns, `rounds`
    passes each, the best pass kept, so that a busy machine slows them alike.
    Returns ({"full": img/s, "loader": img/s, "pil": img/s}, source)."""
    recipe = augment.RECIPES[framework]
    full_views = [full_recipe_view(framework, 224, recipe[v]) for v in ("x1", "x2")]
    full_crop = full_recipe_view(framework, 112, recipe["crops"])
    full = lambda image: [view(image) for view in full_views] + [full_crop(image) for _ in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        if args.data:
            paths = [path for path, _ in data.build_dataset("imagefolder", args.data, True, None).samples[:48]]
        else:
            paths = photo_like_jpegs(folder)
        kilobytes = statistics.mean(os.path.getsize(path) for path in paths) / 1024
        pil_images = [lambda path=path: Image.open(path).convert("RGB") for path in paths]
        tensor_images = [lambda path=path: data.load_image(path) for path in paths]
        runs = {"full": (full, pil_images), "loader": (data.MultiViewTransform(framework, 224, 112, 4), tensor_images),
                "pil": (pil_loader_views(framework, 224, 112, 4), pil_images)}
        rates = {name: 0.0 for name in runs}
        for _ in range(rounds):
            for name, (transform, images) in runs.items():
                rates[name] = max(rates[name], loader_rate(transform, images))
    source = f"{len(paths)} JPEGs of {kilobytes:.0f} kB from {args.data or 'photo_like_jpegs (500x375)'}"
    return rates, source


def bench_transfer(num_features, dim, num_classes, device):
    """Print the TRANSFER line: seconds of eval_transfer.transfer_fit (45 L-BFGS fits + the refit) on num_features x
    dim synthetic ReLU features of num_classes Gaussian classes (20 % held out as val; num_features / 5 test)."""
    generator = torch.Generator().manual_seed(0)
    means = 0.05 * torch.randn(num_classes, dim, generator=generator)

    def split(count):
        labels = torch.arange(count) % num_classes
        return (means[labels] + torch.randn(count, dim, generator=generator)).relu().to(device), labels.to(device)

    (features, labels), test = split(num_features), split(num_features // 5)
    train, val = ((features[index], labels[index]) for index in eval_transfer.held_out(labels.cpu(), seed=0))
    began = time.perf_counter()
    result = eval_transfer.transfer_fit(train, val, test)
    print(f"TRANSFER features={num_features}x{dim} classes={num_classes} device={device.type} "
          f"threads={torch.get_num_threads()} sweep+refit={time.perf_counter() - began:.1f}s (goal: 300 s for "
          f"50000 2048 10 on 2 CPU cores) lambda={result['best_lambda']:.3g} test_top1={result['test']:.1f} "
          f"relative_gradient={result['relative_gradient']:.1e}")


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    began = time.perf_counter()
    cpu = platform.processor() or platform.machine()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"# device: {name} | torch {torch.__version__} | python {platform.python_version()}")
    print(f"# command: python {' '.join(sys.argv)}")
    print("# flags: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    print(f"# step: synthetic inputs on {device.type}, autocast {args.amp}, SGD momentum 0.9 for both frameworks, "
          f"EMA 0.99; mem = {'max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth'} (MiB)")

    if args.transfer:
        return bench_transfer(*args.transfer, device)
    if args.loader_only:
        print(loader_line(args))
        return
    B, M, S, s = args.batch_size, args.crops, args.image_size, args.crop_size
    fmt = (lambda t: t.contiguous(memory_format=torch.channels_last)) if device.type == "cuda" else (lambda t: t)
    x1, x2 = fmt(torch.randn(B, 3, S, S, device=device)), fmt(torch.randn(B, 3, S, S, device=device))
    # [B, M, 3, s, s] with each crop channels-last on cuda, so that multi-crop's flatten(0, 1) stays so.
    crops = fmt(torch.randn(B * M, 3, s, s, device=device)).unflatten(0, (B, M))
    rng = np.random.default_rng(0)
    if args.data:   # callables, so that the JPEG decode is timed too
        folder = data.build_dataset("imagefolder", args.data, True, None)
        picks = rng.choice(len(folder), size=min(max(64, 2 * B), len(folder)), replace=False)
        images = [lambda i=int(i): folder[i][0] for i in picks]
    else:
        images = [Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)) for _ in range(max(64, 2 * B))]

    sup_step = supervised_step(args, device, x1) if args.supervised else None
    header = (f"{'framework':<11}{'views':<16}{'step ms':>9}{'img/s':>9}{'mem MiB':>9}{'x two':>7}{'U':>4}"
              f"{'ideal':>7}{'effic.':>8}")
    print(header + "\n" + "-" * len(header))
    summary = []
    for framework in (("byol", "moco") if args.framework == "both" else (args.framework,)):
        step, memory, build = bench_framework(framework, args, device, x1, x2, crops, sup_step)
        for mode in (["supervised"] if sup_step else []) + [mode for mode in step if mode != "supervised"]:
            views, _, mix = mode.partition("+")
            units = UNITS[framework].get(views, 3) + MIX_UNITS.get(mix, 0)
            ips = B / step[mode]
            mem = f"{memory[mode]:9.0f}" if memory[mode] is not None else f"{'n/a':>9}"
            if mode == "supervised":
                print(f"{framework:<11}{mode:<16}{step[mode] * 1e3:9.1f}{ips:9.1f}{mem}{'':>7}{units:>4}")
                continue
            eff = f"{ips / (B / step['supervised'] * 3 / units):8.2f}" if sup_step else f"{'-':>8}"
            print(f"{framework:<11}{mode:<16}{step[mode] * 1e3:9.1f}{ips:9.1f}{mem}{step[mode] / step['two']:7.2f}"
                  f"{units:>4}{units / UNITS[framework]['two']:7.3f}{eff}")
        print(f"  make_mosaic alone: {build * 1e3:.2f} ms = {100 * build / step['mosaic']:.1f} % of the mosaic step")
        colour = time_augment(framework, args, device)
        print(f"  device augmentation (2 views + {M} crops from uint8; not in the steps above): {colour * 1e3:.1f} ms = "
              f"{100 * colour / (colour + step['mosaic']):.1f} % of a mosaic step with it")
        rate_two, rate_all = bench_data(framework, args, 0, images), bench_data(framework, args, M, images)
        print(f"  data ({'JPEGs in ' + args.data if args.data else 'synthetic PIL, no decode'}): {rate_all:.0f} img/s "
              f"per worker with 2+{M} views ({rate_two:.0f} with 2 views); x {args.workers} workers = "
              f"{rate_all * args.workers:.0f} img/s; the mosaic step takes {B / step['mosaic']:.0f} img/s, so "
              f">= {math.ceil(B / step['mosaic'] / rate_all)} worker(s)")
        ideal = UNITS[framework]["mosaic"] / UNITS[framework]["two"]
        summary.append(f"RATIO framework={framework} multicrop/two={step['multicrop'] / step['two']:.2f} "
                       f"mosaic/two={step['mosaic'] / step['two']:.2f} ideal={ideal:g}")
    summary.append(loader_line(args))
    print(f"# total time {time.perf_counter() - began:.0f} s")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
