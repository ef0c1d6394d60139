"""Time train.py's own training step for two views, multi-crop and mosaic, against the ideal cost ratios, and
count its aten ops.

A step is what train.py's loop runs: train.train_step on a uint8 batch (the device augmentation of x1 and x2 in one
call and of the crops, the mosaic built on the device, the forward under autocast, backward, the framework's
optimizer from train.build_optimizer: LARS for BYOL, SGD for MoCo) and learner.update_target. For each framework
the view modes run round-robin on synthetic device-resident uint8 inputs (one step of each mode per round, the order
rotating), so drift hits all modes alike. Forward-equivalents per image, U (a backward = 2 forwards): BYOL two
views 8, multi-crop / mosaic 11; MoCo 4 and 7. efficiency = img/s divided by what U predicts from the supervised
step (U = 3, timed in the same rounds): sup. img/s x 3 / U. The image mixtures of train.py --mix run beside them as
two+flatten, mosaic+cutmix...: flatten adds no pass, cutmix (MoCo) adds an online pass over x1m and a target pass
over x2m (U + 4). --compile adds mosaic+compile (train.py --compile). Then, per framework x view mode, the aten ops
of one step after the warm-up (a TorchDispatchMode counter; the host's work per step, one launch each on a GPU),
split into optimizer, augment, ema and the rest: the OPS lines (--ops-only: just those). After the table: the
JPEGs per worker-second of train.py's loader (torchvision.io decode, crop and flip on the uint8 tensor) at the
paper's geometry: the LOADER line (--loader-only: just that). --transfer times eval_transfer.py's sweep instead (the
TRANSFER line).
On a CPU shared with other jobs, OMP_NUM_THREADS=1 gives steadier, often faster, timings.
"""
import argparse
import collections
import contextlib
import ctypes
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root: its modules
import augment  # noqa: E402
import data  # noqa: E402
import eval_transfer  # noqa: E402
import models  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from mosaic import default_jitter, make_mosaic  # noqa: E402

MODES = ("two", "multicrop", "mosaic")
UNITS = {"byol": {"two": 8, "multicrop": 11, "mosaic": 11}, "moco": {"two": 4, "multicrop": 7, "mosaic": 7}}
# The image mixtures (train.py --mix), timed beside the view modes as "<views>+<mix>". flatten mixes the online
# views in place: no extra pass. cutmix (MoCo only) adds an online pass over x1m (forward + backward = 3) and a
# target pass over x2m (1): U + 4.
MIXES = {"byol": ("flatten",), "moco": ("flatten", "cutmix")}
MIX_UNITS = {"flatten": 0, "cutmix": 4}
DEFAULTS = {"cpu": dict(arch="resnet18", stem="cifar", image_size=32, crop_size=16, batch_size=32, steps=5,
                        warmup=2),
            "cuda": dict(arch="resnet50", stem="imagenet", image_size=224, crop_size=112, batch_size=32,
                         steps=20, warmup=5)}


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
    p.add_argument("--batch-size", type=int, help="images per step (per GPU; the card's 256 on 8 GPUs is 32)")
    p.add_argument("--steps", type=int, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed rounds before them")
    p.add_argument("--framework", choices=("moco", "byol", "both"), default="both")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype (default: train.py's)")
    p.add_argument("--data", help="ImageFolder root: the LOADER line times its first 48 JPEGs (default: 48 "
                   "photo-like 500x375 JPEGs)")
    p.add_argument("--supervised", action="store_true", help="also time a supervised ResNet step (the ceiling)")
    p.add_argument("--loader-only", action="store_true", help="only the LOADER line (about a minute)")
    p.add_argument("--transfer", type=int, nargs=3, metavar=("N", "D", "K"), help="only time eval_transfer.py's "
                   "45-lambda sweep + refit on N x D synthetic features of K classes, beside scikit-learn's lbfgs "
                   "sweep if installed (the goal: 50000 2048 10)")
    p.add_argument("--ops-only", action="store_true", help="only the OPS counts (one warm-up step and one counted)")
    p.add_argument("--compile", action="store_true", help="also time mosaic+compile (train.py --compile)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                 "use --device cpu")
    vars(args).update({key: value for key, value in DEFAULTS[args.device].items() if getattr(args, key) is None})
    args.amp = args.amp or runtime.default_amp(torch.device(args.device))   # train.py's: bf16 on compute capability 8+
    if args.jitter is None and args.crops > 0:
        args.jitter = default_jitter(math.isqrt(args.crops) * args.crop_size)
    if math.isqrt(args.crops) ** 2 != args.crops or args.batch_size < args.crops or args.warmup < 0 or args.steps < 1:
        sys.exit(f"bench.py: need a perfect square --crops (got {args.crops}), --batch-size >= --crops "
                 f"(got {args.batch_size}), --warmup >= 0 and --steps >= 1")
    return args


def timed(device, fn):
    """Seconds of fn(), the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
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


def learner_step(framework, views, mix, args, device, compile=False):
    """train.py's step as its loop runs it, on a uint8 batch already on the device: (a closure of one step and
    update_target, the learner, the optimizer)."""
    flags = ["--framework", framework, "--views", views, "--mix", mix, "--arch", args.arch, "--stem", args.stem,
             "--image-size", args.image_size, "--crop-size", args.crop_size, "--crops", args.crops, "--jitter",
             args.jitter, "--batch-size", args.batch_size, "--amp", args.amp, "--queue-size",
             65536 if args.image_size >= 64 else 4096] + ["--compile"] * compile
    targs = train.parse_args([str(flag) for flag in flags])
    learner, model = train.build_learner(targs, device, 1)
    optimizer = train.build_optimizer(learner, targs, targs.lr * args.batch_size / 256)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = torch.autocast(device.type, torch.float16 if args.amp == "fp16" else torch.bfloat16,
                              enabled=args.amp != "off")
    B, M, S, s = args.batch_size, args.crops * (views != "two"), args.image_size, args.crop_size
    uint8 = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    batch, steps = ((uint8(B, 3, S, S), uint8(B, 3, S, S), uint8(B, M, 3, s, s)), None), [0]

    def step():
        train.train_step(batch, model, optimizer, scaler, autocast, targs, device, steps[0], [])
        learner.update_target(targs.ema)
        steps[0] += 1
    return step, learner, optimizer


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by the section that `section(name)` set."""
    def __init__(self):
        super().__init__()
        self.counts, self.current = collections.Counter(), "rest"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.current] += 1
        return func(*args, **(kwargs or {}))

    def section(self, name, fn):
        """fn, counting its ops under name."""
        def counted(*args, **kwargs):
            outer, self.current = self.current, name
            try:
                return fn(*args, **kwargs)
            finally:
                self.current = outer
        return counted


def count_ops(framework, views, args, device) -> dict:
    """The aten ops of one train.py step (after one warm-up step): {optimizer, augment, ema, rest, step}."""
    step, learner, optimizer = learner_step(framework, views, "off", args, device)
    step()
    counter = OpCounter()
    with contextlib.ExitStack() as stack:   # the sections: train.augment, optimizer.step, update_target
        for owner, name, section in ((train, "augment", "augment"), (optimizer, "step", "optimizer"),
                                     (learner, "update_target", "ema")):
            stack.enter_context(mock.patch.object(owner, name, counter.section(section, getattr(owner, name))))
        with counter:
            step()
    return dict(counter.counts, step=sum(counter.counts.values()))


def ops_lines(args, device, framework_names):
    """The OPS line of each framework x view mode: the aten ops of one step and their split into optimizer,
    augment, ema and the rest (forward, backward, losses, mosaic)."""
    lines = []
    for framework in framework_names:
        for views in MODES:
            n = collections.Counter(count_ops(framework, views, args, device))   # a section without ops: 0
            lines.append(f"OPS framework={framework} views={views} step={n['step']} optimizer={n['optimizer']} "
                         f"augment={n['augment']} ema={n['ema']} rest={n['rest']}")
    return lines


def bench_framework(framework, args, device, sup_step=None):
    """Median step time per mode, peak memory per mode. The supervised step, if given, joins the round-robin as a
    fourth mode so that it sees the same drift."""
    runs = {mode: learner_step(framework, mode, "off", args, device)[0] for mode in MODES}
    for mix in MIXES[framework]:
        runs.update({f"{mode}+{mix}": learner_step(framework, mode, mix, args, device)[0]
                     for mode in ("two", "mosaic")})
    if args.compile:
        runs["mosaic+compile"] = learner_step(framework, "mosaic", "off", args, device, compile=True)[0]
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
    return {mode: statistics.median(t) for mode, t in times.items()}, memory


def time_parts(framework, args, device):
    """Median seconds of the two augment calls of a step (x1 and x2 together, then the crops) and of make_mosaic."""
    B, M, S, s = args.batch_size, args.crops, args.image_size, args.crop_size
    views = torch.randint(0, 256, (2 * B, 3, S, S), dtype=torch.uint8, device=device)
    crops = torch.randint(0, 256, (B * M, 3, s, s), dtype=torch.uint8, device=device)
    normalised = augment.augment(crops, framework, "crops").unflatten(0, (B, M))
    parts = (lambda: (augment.augment(views, framework, ("x1", "x2")), augment.augment(crops, framework, "crops")),
             lambda: make_mosaic(normalised, args.jitter))
    times = [[timed(device, part) for _ in range(args.warmup + args.steps)][args.warmup:] for part in parts]
    return tuple(statistics.median(t) for t in times)


def supervised_step(args, device):
    """Plain ResNet (the same Trunk) + linear classifier on one float view per image, SGD: the ceiling."""
    trunk = models.Trunk(args.arch, args.stem)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(trunk.out_channels, 1000))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def loader_rate(transform, paths):
    """JPEGs per second of one thread decoding each path (data.load_image) and applying transform, in one pass: what
    one DataLoader worker sustains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in a DataLoader worker
    start = time.perf_counter()
    for path in paths:
        transform(data.load_image(path))
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(paths) / seconds


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


def loader_line(args, framework="byol", rounds=3):
    """The LOADER line: JPEGs per worker-second of train.py's loader (data.load_image + data.MultiViewTransform) at
    the paper's geometry (2 views of 224 px + 4 crops of 112 px), decode included, the best of `rounds` passes, on
    --data's JPEGs or on ImageNet-sized ones made in a temporary folder; prints where the JPEGs came from."""
    with tempfile.TemporaryDirectory() as folder:
        if args.data:
            paths = [path for path, _ in data.build_dataset("imagefolder", args.data, True, None).samples[:48]]
        else:
            paths = photo_like_jpegs(folder)
        kilobytes = statistics.mean(os.path.getsize(path) for path in paths) / 1024
        transform = data.MultiViewTransform(framework, 224, 112, 4)
        rate = max(loader_rate(transform, paths) for _ in range(rounds))
    print(f"# loader at the paper's geometry: 2 views of 224 px + 4 crops of 112 px, BYOL recipe, one thread; "
          f"{len(paths)} JPEGs of {kilobytes:.0f} kB from {args.data or 'photo_like_jpegs (500x375)'}")
    return f"LOADER loader={rate:.1f}"


def bench_transfer(num_features, dim, num_classes, device):
    """Print the TRANSFER line: seconds of eval_transfer.transfer_fit (45 truncated-Newton fits + the refit) on
    num_features x dim synthetic ReLU features of num_classes Gaussian classes (20 % held out as val; num_features / 5
    test), beside scikit-learn's LogisticRegression(solver="lbfgs") over the same protocol if it is installed (the
    same standardisation; the 45 lambdas as C = 1 / (N lambda), strong to weak, warm-started; the same stopping rule
    as its tol; max_iter 1,000; selection on val; the refit from the chosen solution; K >= 3, as it fits two classes
    with one weight vector), its seconds over ours, and each side's largest relative gradient (eval_transfer's rule)."""
    generator = torch.Generator().manual_seed(0)
    means = 0.05 * torch.randn(num_classes, dim, generator=generator)

    def split(count):
        labels = torch.arange(count) % num_classes
        return (means[labels] + torch.randn(count, dim, generator=generator)).relu().to(device), labels.to(device)

    (features, labels), test = split(num_features), split(num_features // 5)
    train, val = ((features[index], labels[index]) for index in eval_transfer.held_out(labels.cpu(), seed=0))
    began = time.perf_counter()
    result = eval_transfer.transfer_fit(train, val, test)
    ours = time.perf_counter() - began
    line = (f"TRANSFER features={num_features}x{dim} classes={num_classes} device={device.type} "
            f"threads={torch.get_num_threads()} sweep+refit={ours:.1f}s lambda={result['best_lambda']:.3g} "
            f"test_top1={result['test']:.2f} relative_gradient={result['relative_gradient']:.1e}")
    try:
        import warnings
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return print(f"{line} | scikit-learn not installed (pip install scikit-learn)")
    if num_classes < 3:
        return print(f"{line} | scikit-learn: only for 3 classes or more")

    def largest(x, y, lam=0.0, W=None, b=None):   # the largest entry of the objective's gradient (at 0 by default)
        theta = torch.cat([W, b[None]]) if W is not None else x.new_zeros(dim + 1, num_classes)
        R = eval_transfer.logits(x, theta).softmax(1) - F.one_hot(y, num_classes).double()
        return float((eval_transfer.adjoint(x, R) / len(x) + lam * eval_transfer.penalised(theta)).abs().max())

    (x, y), (vx, vy), (tx, ty) = ((part[0].double().cpu(), part[1].cpu()) for part in (train, val, test))
    all_x, all_y = torch.cat([x, vx]), torch.cat([y, vy])
    normalise, refit = eval_transfer.standardiser(x), eval_transfer.standardiser(all_x)
    (x, vx), (all_x, tx) = (normalise(x), normalise(vx)), (refit(all_x), refit(tx))
    model = LogisticRegression(tol=eval_transfer.TOLERANCE * largest(x, y), max_iter=1000, warm_start=True)
    fits, best_val, began = [], -1.0, time.perf_counter()
    with warnings.catch_warnings():   # the ConvergenceWarning of fits at max_iter: counted below instead
        warnings.simplefilter("ignore")
        for lam in reversed(eval_transfer.LAMBDAS):
            model.set_params(C=1 / (len(x) * lam)).fit(x.numpy(), y.numpy())
            fits.append((x, y, lam, model.coef_.copy(), model.intercept_.copy(), int(model.n_iter_.max())))
            value = eval_transfer.score(torch.from_numpy(model.decision_function(vx.numpy())), vy)
            best_val, best = (value, fits[-1]) if value > best_val else (best_val, best)   # ties: the larger lambda
        model.coef_, model.intercept_ = best[3].copy(), best[4].copy()
        model.set_params(C=1 / (len(all_x) * best[2]), tol=eval_transfer.TOLERANCE * largest(all_x, all_y))
        model.fit(all_x.numpy(), all_y.numpy())
    theirs = time.perf_counter() - began
    fits.append((all_x, all_y, best[2], model.coef_, model.intercept_, int(model.n_iter_.max())))
    test_top1 = eval_transfer.score(torch.from_numpy(model.decision_function(tx.numpy())), ty)
    worst = max(largest(x, y, lam, torch.from_numpy(W.T.copy()), torch.from_numpy(b)) / largest(x, y)
                for x, y, lam, W, b, _ in fits)
    print(f"{line} | scikit-learn lbfgs: sweep+refit={theirs:.1f}s lambda={best[2]:.3g} test_top1={test_top1:.2f} "
          f"relative_gradient={worst:.1e} fits_at_max_iter={sum(fit[-1] >= 1000 for fit in fits)} | "
          f"speed-up={theirs / ours:.1f}x (goal: >= 5x, and ours <= 600 s, at 50000 2048 10 on 2 CPU cores)")


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
    print(f"# step: train.py's (train_step + update_target) on synthetic uint8 inputs on {device.type}, autocast "
          f"{args.amp}, LARS for BYOL, SGD for MoCo; mem = "
          f"{'max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth'} (MiB)")
    if args.transfer:
        return bench_transfer(*args.transfer, device)
    frameworks = ("byol", "moco") if args.framework == "both" else (args.framework,)
    if args.loader_only or args.ops_only:
        print(loader_line(args) if args.loader_only else "\n".join(ops_lines(args, device, frameworks)))
        return
    B, M = args.batch_size, args.crops
    sup_step = supervised_step(args, device) if args.supervised else None
    header = (f"{'framework':<11}{'views':<16}{'step ms':>9}{'img/s':>9}{'mem MiB':>9}{'x two':>7}{'U':>4}"
              f"{'ideal':>7}{'effic.':>8}")
    print(header + "\n" + "-" * len(header))
    summary = []
    for framework in frameworks:
        step, memory = bench_framework(framework, args, device, sup_step)
        for mode in (["supervised"] if sup_step else []) + [mode for mode in step if mode != "supervised"]:
            print(table_row(framework, mode, step, memory, B, sup_step is not None))
        colour, build = time_parts(framework, args, device)
        print(f"  of which the device augmentation (2 views + {M} crops from uint8, 2 calls): {colour * 1e3:.1f} ms = "
              f"{100 * colour / step['mosaic']:.1f} % of the mosaic step; make_mosaic {build * 1e3:.2f} ms = "
              f"{100 * build / step['mosaic']:.1f} %")
        ideal = UNITS[framework]["mosaic"] / UNITS[framework]["two"]
        summary.append(f"RATIO framework={framework} multicrop/two={step['multicrop'] / step['two']:.2f} "
                       f"mosaic/two={step['mosaic'] / step['two']:.2f} ideal={ideal:g}")
    summary += ops_lines(args, device, frameworks)
    summary.append(loader_line(args))
    print(f"# total time {time.perf_counter() - began:.0f} s")
    print("\n".join(summary))


def table_row(framework, mode, step, memory, batch, supervised) -> str:
    """One row of the table: step ms, img/s, memory, the ratio to two views, U, the ideal ratio, the efficiency."""
    views, _, mix = mode.partition("+")
    units = UNITS[framework].get(views, 3) + MIX_UNITS.get(mix, 0)
    ips = batch / step[mode]
    mem = f"{memory[mode]:9.0f}" if memory[mode] is not None else f"{'n/a':>9}"
    if mode == "supervised":
        return f"{framework:<11}{mode:<16}{step[mode] * 1e3:9.1f}{ips:9.1f}{mem}{'':>7}{units:>4}"
    eff = f"{ips / (batch / step['supervised'] * 3 / units):8.2f}" if supervised else f"{'-':>8}"
    return (f"{framework:<11}{mode:<16}{step[mode] * 1e3:9.1f}{ips:9.1f}{mem}{step[mode] / step['two']:7.2f}"
            f"{units:>4}{units / UNITS[framework]['two']:7.3f}{eff}")


if __name__ == "__main__":
    main()
