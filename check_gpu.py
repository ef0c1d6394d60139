"""Check a GPU machine end to end in one command, within a time budget, and write one markdown report.

    python check_gpu.py                      # 8 minutes; report in runs/check_gpu/report.md
    python check_gpu.py --minutes 30 --archive ../cifar10-jpg.tar.gz
    python check_gpu.py --dry-run            # the plan, every command checked to parse; runs nothing, needs no GPU

Stages, in order (each command is a plain call of this repository's scripts, run from its root):
1. Environment: torch, torchvision, CUDA, cuDNN, NCCL, the GPUs, the CPU cores.
2. Correctness on CUDA: (a) test_mosrep.py's device-independent tests on the GPU (MOSREP_TEST_DEVICE=cuda);
   (b) roi_align on CUDA equals the CPU result; (c) no host sync in a training step but the documented one;
   (d) 20 steps of every framework x view mode in bf16, one fp16 run (GradScaler), a resume that repeats the
   uninterrupted losses; (e) under torchrun: an all_reduce, gather_all and SyncBatchNorm (nccl), then train.py
   with BYOL (train.py uses DDP and SyncBN only with 2 processes or more, so 2 GPUs or more).
3. Speed at the paper's geometry: bench.py (ResNet-50, 224 px, batch 128, bf16, channels_last), and whether the
   loader feeds the GPU.
4. With the minutes left: MoCo with two views, multi-crop and mosaic on CIFAR-10 (the README's CIFAR recipe, seed 0,
   E epochs each, E chosen from the measured step time), k-NN at k = 20 and 200; then BYOL's three if time remains.

A step that fails is reported with the end of its log, and the next one still runs; a step that would overrun the
time left is skipped and reported as such; every subprocess gets a timeout from what is left (a stopped step has
15 s to exit, so the budget can be passed by that much). Each step's output
(stdout and stderr) is kept beside the report as <step>.log, the runs' folders under <out>/outputs (wiped at start).
Without a CUDA GPU the check stops with a one-line error (exit code 1); --dry-run works anywhere.
"""
import argparse
import contextlib
import functools
import inspect
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field

import torch

from cifar_table import FRAMEWORK, RECIPE   # the README's CIFAR recipe, per framework

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
PROBES = ("env", "roi_align", "sync", "nccl")
VIEWS = ("two", "multicrop", "mosaic")
STAGES = {"1": "Environment", "2": "Correctness on CUDA", "3": "Speed at the paper's geometry",
          "4": "CIFAR-10: a first comparison of the view modes"}
# Stage 2's small runs: the CIFAR geometry on synthetic images, 768 / 64 = 12 steps per epoch, so that 20 steps cross
# an epoch end (a checkpoint save) and the 10-step half of the resume check stops mid-epoch.
TINY = ["--dataset", "fake", "--fake-size", "768", *RECIPE, "--epochs", "10", "--log-every", "1", "--workers", "2",
        "--seed", "0"]
TINY_BATCH = 64        # per process
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mosrep.py", "-k", "on_cuda"]
BENCH = ["bench.py", "--device", "cuda", "--supervised", "--arch", "resnet50", "--image-size", "224", "--crop-size",
         "112", "--batch-size", "128", "--amp", "bf16"]
KNN = ["--arch", "resnet18", "--stem", "cifar", "--image-size", "32", "--k", "20", "200"]
CIFAR_IMAGES, CIFAR_TEST_IMAGES, CIFAR_BATCH = 50000, 10000, 256
BYOL_COST = 11 / 7     # BYOL's step over MoCo's, in forward-equivalents per image (bench.py's UNITS, mosaic)
PUBLISHED = "a 1,000-epoch MoCo ResNet-18 reaches about 89 % 200-NN on CIFAR-10 in published work"
RESERVE_S = 5          # kept back from the budget for writing the report


class CheckFailed(Exception):
    """A step ran but its output shows the check failed; the message says how."""


@dataclass
class Step:
    """One command of the plan. Steps handed to Runner.run together run at the same time."""
    stage: str                       # "1", "2a" ... "4"
    name: str                        # short id, also its log file's name
    argv: list                       # the command, run from the repository root
    need_s: float                    # about the least it takes: skipped when less time than this is left
    cap_s: float                     # its time limit, when the budget leaves that much
    verdict: object = None           # log path -> summary, or (summary, markdown for the report); may raise
    env: dict = field(default_factory=dict)


def shown(step) -> str:
    """The command as a user would type it."""
    env = "".join(f"{k}={v} " for k, v in step.env.items())
    return env + "python " + shlex.join(step.argv[1:])


# ---- verdicts: read a finished step's outputs

def read_log(out):
    """(per-step records, final record or None) of a train.py --out folder's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if not r.get("final")], next((r for r in records if r.get("final")), None)


def train_verdict(out, steps, world=1):
    """A verdict for a train.py run: it logged steps 1..steps with finite losses and ended at `steps`."""
    def verdict(log_path):
        logged, final = read_log(out)
        if final is None or final["step"] != steps:
            raise CheckFailed(f"the run ended at step {final and final['step']}, not {steps}")
        if [r["step"] for r in logged] != list(range(1, steps + 1)):
            raise CheckFailed(f"log.jsonl holds steps {[r['step'] for r in logged]}, not 1..{steps}")
        if not all(math.isfinite(r["loss"]) for r in logged):
            raise CheckFailed("a logged loss is not finite")
        if len(final["rank_checksums"]) != world or not final["ranks_identical"]:
            raise CheckFailed(f"ranks: {final['rank_checksums']} (identical: {final['ranks_identical']})")
        last = logged[-1]
        return (f"loss {logged[0]['loss']:.3f} -> {last['loss']:.3f}, target_std {last['target_std']:.2f}, "
                f"max memory {last['max_memory_gb']} GB" + (f", {world} ranks identical" if world > 1 else ""))
    return verdict


def resume_verdict(baseline, resumed, split, steps):
    """The resumed run's losses repeat the uninterrupted run's. Both ran in fp32 (--amp off): steps 1..split are the
    same computation in two processes, so their difference is the GPU's own nondeterminism (atomics, cuDNN's
    benchmarked algorithms), ~1e-6; a resume that restores a wrong state (queue, RNG, schedule, data order) moves
    the later losses by ~1e-2. Tolerance: 10x that floor + 1e-4 of the loss."""
    def verdict(log_path):
        a = {r["step"]: r["loss"] for r in read_log(baseline)[0]}
        b = {r["step"]: r["loss"] for r in read_log(resumed)[0]}
        if sorted(b) != list(range(1, steps + 1)) or sorted(a) != sorted(b):
            raise CheckFailed(f"steps logged: uninterrupted {sorted(a)}, resumed {sorted(b)}")
        floor = max(abs(a[s] - b[s]) for s in range(1, split + 1))
        after = max(abs(a[s] - b[s]) for s in range(split + 1, steps + 1))
        tolerance = 10 * floor + 1e-4 * max(abs(v) for v in a.values())
        summary = (f"max |loss difference| steps {split + 1}-{steps} after the resume: {after:.2e}; steps 1-{split} "
                   f"(nondeterminism floor): {floor:.2e}; tolerance {tolerance:.2e}")
        if after > tolerance:
            raise CheckFailed(summary)
        return summary
    return verdict


def pytest_verdict(log_path):
    with open(log_path) as f:
        lines = [line.strip() for line in f if re.search(r"\d+ (passed|failed|error)", line)]
    return lines[-1] if lines else "no pytest summary line"


def probe_verdict(log_path):
    """A probe's findings: its '- ' lines for the report (train.py's console lines stay in the log), its last line
    as the summary."""
    with open(log_path) as f:
        lines = [line.rstrip() for line in f.read().split("\n", 2)[-1].splitlines() if line.strip()]   # no "$ ..."
    return (lines or ["no output"])[-1], "\n".join(line for line in lines if line.startswith("- "))


def knn_verdict(out):
    def verdict(log_path):
        with open(os.path.join(out, "knn.json")) as f:
            knn = json.load(f)["knn"]
        return f"k-NN top-1: 20-NN {knn['20']['top1']:.2f} %, 200-NN {knn['200']['top1']:.2f} %"
    return verdict


def bench_answer(text, cores, gpus):
    """bench.py's output -> (summary, markdown): its table as printed, and whether the loader feeds the GPU. The GPU
    takes the images/s of a mosaic step plus the device augmentation of its batch (bench times the two apart); one
    loader worker makes the 2 + 4 views of `rate` img/s: bench's LOADER line (JPEGs per worker-second of the loader
    train.py uses) when it prints one, else the framework's "data (...)" line."""
    rows, augment_ms, data, framework = {}, {}, {}, None
    for line in text.splitlines():
        row = re.match(r"(byol|moco)\s+(supervised|two|multicrop|mosaic)\s+([\d.]+)\s+([\d.]+)", line)
        if row:
            framework, rows[(row[1], row[2])] = row[1], (float(row[3]), float(row[4]))   # (step ms, img/s)
        augmenting = re.match(r"\s+device augmentation \(.*?\): ([\d.]+) ms", line)
        worker = re.match(r"\s+data \((.*?)\): (\d+) img/s per worker", line)
        if augmenting and framework:
            augment_ms[framework] = float(augmenting[1])
        if worker and framework:
            data[framework] = (float(worker[2]), f"bench's data line, {worker[1]}")
    loader = re.search(r"^LOADER full_recipe=([\d.]+) loader=([\d.]+) speedup=([\d.]+)", text, re.M)
    if not any(mode == "mosaic" for _, mode in rows):
        raise CheckFailed("no mosaic row in bench.py's output")
    table = text[text.index("# device"):] if "# device" in text else text
    lines, needs = [f"```\n{table.strip()}\n```", ""], []
    for framework in sorted({f for f, mode in rows if mode == "mosaic"}):
        step_ms, ips = rows[(framework, "mosaic")]
        demand = ips * step_ms / (step_ms + augment_ms.get(framework, 0.0))
        rate, source = ((float(loader[2]), f"bench's LOADER line; the full CPU recipe: {loader[1]} img/s")
                        if loader else data.get(framework, (0.0, "bench printed no data line")))
        needs.append(math.ceil(demand / rate) if rate > 0 else math.inf)
        lines.append(f"- {framework} + mosaic takes {demand:.0f} img/s per GPU (step {step_ms:.1f} ms + device "
                     f"augmentation {augment_ms.get(framework, 0.0):.1f} ms); one loader worker makes {rate:.0f} img/s "
                     f"({source}): **{needs[-1]} worker core(s) per GPU**.")
    per_gpu = cores // max(1, gpus)
    feeds = max(needs) <= per_gpu - 1   # one core stays with the training process
    lines += ["", f"Does the loader feed the GPU? **{'yes' if feeds else 'no'}**: it needs {max(needs)} worker cores "
              f"per GPU, plus one for the training process; this machine has {cores} cores for {gpus} GPU(s)."]
    if not loader:
        lines.append("A data line that says 'synthetic PIL, no decode' leaves JPEG decoding out of its rate.")
    return f"loader feeds the GPU: {'yes' if feeds else 'no'} (needs {max(needs)} cores per GPU)", "\n".join(lines)


def bench_verdict(log_path):
    with open(log_path) as f:
        text = f.read()
    return bench_answer(text, os.cpu_count() or 1, max(1, torch.cuda.device_count()))


# ---- probes: in-process checks, each run by the plan as `python check_gpu.py --probe NAME` (a crash stays a step's)

def probe_env(args) -> int:
    """Print the environment as markdown bullets."""
    import torchvision
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:   # a build without NCCL
        nccl = "n/a"
    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}",
             f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                     f"{p.multi_processor_count} SMs")
    with contextlib.suppress(Exception):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split()[0]
        lines.append(f"- driver {driver}")
    lines.append(f"- bf16 supported: {torch.cuda.is_bf16_supported()}; TF32 in convolutions (cudnn.allow_tf32): "
                 f"{torch.backends.cudnn.allow_tf32}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with contextlib.suppress(Exception), open("/proc/meminfo") as f:
        lines.append(f"- host memory {int(f.readline().split()[1]) / 2**20:.0f} GiB")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    lines.append(f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({usable} usable here)")
    lines.append(f"{torch.cuda.device_count()} x {name}, {os.cpu_count()} CPU cores")
    print("\n".join(lines))
    return 0


def probe_roi_align(args) -> int:
    """roi_align as Encoder.embed_local calls it, forward and backward, on CUDA (channels_last input, as training
    gives it) and on the CPU, on the same feature maps, mosaic rois and output gradients. Tolerance 1e-5 (absolute
    and relative): each output is a mean of 4 bilinear samples, ~16 fp32 products of N(0, 1) values, so reordering
    and fused multiply-adds move it by ~1e-6; a wrong box convention (half a pixel, a bin) moves it by ~0.1."""
    from torchvision.ops import roi_align
    from mosaic import default_jitter, make_mosaic
    failed = False
    for label, channels, side, stride, crop in (("ResNet-50, 224 px mosaic (C5 7x7, stride 32)", 2048, 7, 32, 112),
                                                 ("cifar stem, 32 px mosaic (C5 4x4, stride 8)", 512, 4, 8, 16)):
        torch.manual_seed(0)
        rois = make_mosaic(torch.zeros(16, 4, 1, crop, crop), default_jitter(2 * crop)).rois   # [64, 5]
        maps, grads = torch.randn(16, channels, side, side), torch.randn(64, channels, 7, 7)
        results = []
        for device, layout in (("cpu", torch.contiguous_format), ("cuda", torch.channels_last)):
            x = maps.to(device).contiguous(memory_format=layout).detach().requires_grad_()   # a leaf of its own
            out = roi_align(x, rois.to(device), output_size=7, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
            out.backward(grads.to(device))
            results.append((out.detach().cpu(), x.grad.cpu()))
        for what, cpu, cuda in zip(("forward", "backward"), *results):
            ok = bool(((cuda - cpu).abs() <= 1e-5 + 1e-5 * cpu.abs()).all())
            failed |= not ok
            print(f"- {label}, {what}: max |cuda - cpu| = {(cuda - cpu).abs().max().item():.1e} "
                  f"({'within' if ok else 'BEYOND'} 1e-5 + 1e-5 |cpu|)")
    print("roi_align: CUDA " + ("differs from the CPU" if failed else "equals the CPU within 1e-5"))
    return int(failed)


def tiny(framework, views, amp, world=1):
    """train.py flags of stage 2's small runs."""
    return [*TINY, *FRAMEWORK[framework], "--framework", framework, "--views", views, "--amp", amp, "--batch-size",
            str(TINY_BATCH * world)]


def sync_argvs(out):
    """train.py argv of the sync probe's runs: (framework, argv)."""
    return [(f, [*tiny(f, "mosaic", "bf16"), "--max-steps", "3", "--out", os.path.join(out, f"{f}-mosaic")])
            for f in ("moco", "byol")]


def probe_sync(args) -> int:
    """train.py's real loop, 3 steps per framework (MoCo, BYOL with LARS; mosaic views, bf16), with train.train_step
    and the EMA update run under torch.cuda.set_sync_debug_mode: the first step in "warn" mode (a warm-up; its syncs
    are counted), the later ones in "error" mode, where any host sync raises. Excluded: the documented sync,
    train_step's status all-reduce and its .tolist() (a non-finite loss or a stop signal ends every rank at the same
    step). It follows scaler.update(), so the wrapped scaler.update switches the debug mode off."""
    import warnings
    import train
    real_step, failed = train.train_step, False

    def step_in_debug_mode(*call, **kwargs):
        given = inspect.signature(real_step).bind(*call, **kwargs).arguments
        mode, scaler, model = "warn" if given["step"] == 0 else "error", given["scaler"], given["model"]
        if given["step"] == 0:   # wrap once per run: the loop passes the same scaler and model at every step
            real_update, real_ema = scaler.update, model.update_target

            def update_then_off(*a, **k):
                real_update(*a, **k)
                torch.cuda.set_sync_debug_mode(0)   # what follows is the documented status readback

            def ema_in_debug_mode(ema):
                torch.cuda.set_sync_debug_mode(calls[-1])
                try:
                    real_ema(ema)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            scaler.update, model.update_target = update_then_off, ema_in_debug_mode
        calls.append(mode)
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return real_step(*call, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    train.train_step = step_in_debug_mode
    for framework, argv in sync_argvs(args.out):
        shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
        calls = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train.main(argv)
                error = None if len(calls) == 3 else f"train.py ran {len(calls)} steps through train_step, not 3"
            except (Exception, SystemExit) as exc:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        failed |= error is not None
        print(f"- {framework} + mosaic, bf16: first step ('warn' mode): {len(syncs)} host sync(s)"
              + (f" (first: {syncs[0]})" if syncs else "") + "; steps 2-3 ('error' mode): "
              + (f"FAILED at step {len(calls)}: {error}" if error else "no host sync"))
    print("training step: " + ("a host sync beyond the documented all-reduce" if failed else
                               "no host sync beyond the documented all-reduce"))
    return int(failed)


def probe_nccl(args) -> int:
    """Run under torchrun: join the process group as train.py does (models.distributed: nccl on CUDA), then check an
    all_reduce, models.gather_all, and SyncBatchNorm on each rank's share of one batch against BatchNorm on all of
    it (forward and input gradient). In a world of one, SyncBatchNorm is plain BatchNorm; that is said."""
    import torch.distributed as dist
    import models
    with models.distributed() as device:
        if not dist.is_initialized():
            print("- no process group: run this probe under torchrun")
            return 1
        world, rank = models.world_size(), models.rank()
        total = torch.full((4,), rank + 1.0, device=device)
        dist.all_reduce(total)
        gathered = models.gather_all(torch.full((2, 3), float(rank), device=device))   # [2 * world, 3]
        torch.manual_seed(0)   # the same batch on every rank; each normalises its share with SyncBatchNorm
        batch = torch.randn(8 * world, 16, 4, 4, device=device, requires_grad=True)
        share = slice(8 * rank, 8 * (rank + 1))
        mine = batch[share].detach().requires_grad_()
        out = torch.nn.SyncBatchNorm(16).to(device)(mine)
        ref = torch.nn.functional.batch_norm(batch, None, None, training=True)[share]
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        checks = {f"all_reduce over {world} rank(s)": bool((total == world * (world + 1) / 2).all())}
        checks["gather_all in rank order"] = gathered[:, 0].tolist() == [float(r // 2) for r in range(2 * world)]
        syncbn = "SyncBatchNorm = BatchNorm of the whole batch" + (" (world of one: plain BatchNorm)" * (world == 1))
        checks[syncbn] = torch.allclose(out, ref, atol=1e-5) and torch.allclose(mine.grad, batch.grad[share], atol=1e-5)
        if rank == 0:
            print("\n".join(f"- {name}: {'ok' if ok else 'FAILED'}" for name, ok in checks.items()))
            print(f"{dist.get_backend()} process group of {world}: " + ("ok" if all(checks.values()) else "FAILED"))
    return int(not all(checks.values()))


# ---- the plan

def outputs(args, *parts) -> str:
    return os.path.join(args.out, "outputs", *parts)


def train_run(stage, name, flags, out, steps, world=1, launcher=()):
    """A train.py step that must log `steps` steps into `out`."""
    return Step(stage, name, [PY, *launcher, "train.py", *flags, "--max-steps", str(steps), "--out", out], 20, 240,
                train_verdict(out, steps, world))


def small_runs(args):
    """Stage 2d and 2e, as groups of steps that run at the same time."""
    group = [train_run("2d", f"train-{f}-{v}", tiny(f, v, "bf16"), outputs(args, "train", f"{f}-{v}"), 20)
             for f in ("moco", "byol") for v in VIEWS]
    group.append(train_run("2d", "train-byol-mosaic-fp16", tiny("byol", "mosaic", "fp16"),
                            outputs(args, "train", "byol-mosaic-fp16"), 20))
    # The resume check runs in fp32, where the GPU's nondeterminism is small enough to see a resume fault.
    baseline, resumed = outputs(args, "train", "moco-mosaic-fp32"), outputs(args, "train", "moco-mosaic-resumed")
    group.append(train_run("2d", "train-moco-mosaic-fp32", tiny("moco", "mosaic", "off"), baseline, 20))
    group.append(train_run("2d", "resume-first-10-steps", tiny("moco", "mosaic", "off"), resumed, 10))
    resume = train_run("2d", "resume-to-20-steps", tiny("moco", "mosaic", "off") + ["--resume"], resumed, 20)
    resume.verdict = resume_verdict(baseline, resumed, 10, 20)
    nproc = args.nproc
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}")
    torchrun = train_run("2e", f"torchrun-byol-{nproc}-process", tiny("byol", "mosaic", "bf16", nproc),
                         outputs(args, "train", "torchrun-byol"), 20, nproc, launcher)
    torchrun.need_s = 30
    nccl = Step("2e", f"nccl-{nproc}-process", [PY, *launcher, "check_gpu.py", "--probe", "nccl"], 20, 120,
                probe_verdict)
    return [group, [resume], [nccl], [torchrun]]


def static_plan(args):
    """Stages 1 to 3, as groups of steps that run at the same time."""
    probe = lambda stage, name, need, cap, *more: Step(stage, name, [PY, "check_gpu.py", "--probe", name, *more],
                                                       need, cap, probe_verdict)
    pytest = Step("2a", "pytest-on-cuda", [PY, *PYTEST], 45, 300, pytest_verdict, {"MOSREP_TEST_DEVICE": "cuda"})
    bench = Step("3", "bench", [PY, *BENCH], 60, 420, bench_verdict)
    sync = probe("2c", "sync", 30, 180, "--out", outputs(args, "sync"))
    return [[probe("1", "env", 10, 60)], [pytest], [probe("2b", "roi_align", 10, 120)], [sync], *small_runs(args),
            [bench]]


def cifar_steps(args, framework, views, epochs):
    """(train step, k-NN step) of one CIFAR-10 run: the README's recipe, seed 0, `epochs` epochs."""
    out, train_dir, test_dir = outputs(args, "cifar", f"{framework}-{views}"), *cifar_splits(args)
    flags = [*RECIPE, *FRAMEWORK[framework], "--batch-size", str(CIFAR_BATCH)]
    if "--warmup-epochs" in flags:   # BYOL's recipe warms up for 10 of 200 epochs: keep that share in a short run
        at = flags.index("--warmup-epochs") + 1
        flags[at] = f"{float(flags[at]) * epochs / 200:g}"
    train = Step("4", f"cifar-{framework}-{views}", [PY, "train.py", "--framework", framework, "--views", views,
                                                    "--data", train_dir, *flags, "--epochs", str(epochs), "--seed", "0",
                                                    "--workers", str(args.workers), "--log-every", "50", "--out", out],
                 0, math.inf, finished_verdict(out, epochs * (CIFAR_IMAGES // CIFAR_BATCH)))
    knn = Step("4", f"knn-{framework}-{views}", [PY, "eval_knn.py", "--weights", os.path.join(out, "backbone.pth"),
                                                 *KNN, "--data", train_dir, "--val-data", test_dir, "--workers",
                                                 str(args.workers), "--out", os.path.join(out, "knn.json")],
               0, math.inf, knn_verdict(out))
    return train, knn


def calibration_step(args):
    """60 steps of MoCo + mosaic with the CIFAR recipe: the step time that E is chosen from."""
    out, (train_dir, _) = outputs(args, "cifar", "calibrate"), cifar_splits(args)
    argv = [PY, "train.py", "--framework", "moco", "--views", "mosaic", "--data", train_dir, *RECIPE,
            *FRAMEWORK["moco"], "--batch-size", str(CIFAR_BATCH), "--epochs", "1", "--seed", "0", "--workers",
            str(args.workers), "--log-every", "20", "--max-steps", "60", "--out", out]
    return Step("4", "cifar-calibrate", argv, 30, 240, finished_verdict(out, 60))


def finished_verdict(out, steps):
    """A verdict for a run logged every few steps: it ended at `steps`, every logged loss finite."""
    def verdict(log_path):
        logged, final = read_log(out)
        if final is None or final["step"] != steps or not all(math.isfinite(r["loss"]) for r in logged):
            raise CheckFailed(f"the run ended at step {final and final['step']} (of {steps}), or a loss is not finite")
        rates = sorted(r["images_per_s"] for r in logged)
        return (f"{steps} steps, loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f}, "
                f"{rates[len(rates) // 2]:.0f} img/s (median of {len(rates)} log intervals)")
    return verdict


def cifar_splits(args):
    return os.path.join(args.data, "train"), os.path.join(args.data, "test")


def choose_epochs(left_s, epoch_s, run_s, knn_s, runs=3, margin=0.9):
    """The most whole epochs E such that `runs` runs of E epochs (epoch_s each, plus run_s of start-up) and their
    k-NN (knn_s each) fit in margin * left_s seconds; 0 when not even one epoch fits."""
    return max(0, math.floor((margin * left_s - runs * (run_s + knn_s)) / (runs * epoch_s)))


# ---- running: the budget, the subprocesses, their results

class Runner:
    """Runs steps as subprocesses within the budget, keeps their logs and results, rewrites the report after each."""
    def __init__(self, args, started: float):
        self.args, self.started, self.deadline = args, started, started + args.minutes * 60
        self.results, self.extras = [], {}   # extras: stage -> markdown for the report

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def record(self, step, status, seconds, summary, extra=None):
        self.results.append(dict(stage=step.stage, name=step.name, command=shown(step), status=status,
                                 seconds=seconds, summary=summary, log=f"{step.name}.log"))
        if extra:
            self.extras[step.stage] = extra
        write_report(self)
        print(f"[{step.stage}] {step.name}: {status} ({seconds:.0f} s) {summary}", flush=True)

    def skip(self, steps, reason):
        for step in steps:
            self.record(step, "skipped", 0.0, reason)

    def run(self, steps) -> list:
        """Run steps at the same time; each result's status: passed, FAILED, timed out or skipped."""
        left, need = self.remaining(), max(step.need_s for step in steps)
        if need > left:
            self.skip(steps, f"would overrun the budget: needs ~{need:.0f} s, {max(0, left):.0f} s left")
            return self.results[-len(steps):]
        running, ended, stopping = [], {}, {}
        try:
            for step in steps:
                running.append(self._start(step))
            while len(ended) < len(steps):   # poll, so that each step's time is its own
                for i, (step, (process, began)) in enumerate(zip(steps, running)):
                    limit = min(step.cap_s, left)
                    if i in ended:
                        continue
                    if process.poll() is not None:   # done, or done stopping
                        ended[i] = (None if i in stopping else process.returncode, min(time.monotonic() - began, limit))
                    elif i not in stopping and time.monotonic() - began > limit:
                        stopping[i] = time.monotonic()
                        signal_group(process, signal.SIGTERM)   # train.py saves and exits; all overdue ones at once
                    elif i in stopping and time.monotonic() - stopping[i] > 15:
                        signal_group(process, signal.SIGKILL)
                time.sleep(0.1)
        finally:   # also on Ctrl-C: no process of ours outlives the check
            for process, _ in running:
                if process.poll() is None:
                    signal_group(process, signal.SIGKILL)
                    process.wait()
        for i, step in enumerate(steps):
            self._judge(step, *ended[i])
        return self.results[-len(steps):]

    def _start(self, step):
        with open(os.path.join(self.args.out, f"{step.name}.log"), "w") as log:
            log.write(f"$ {shown(step)}\n\n")
            log.flush()   # own session: a timeout stops the whole group (torchrun's workers, loader workers)
            return subprocess.Popen(step.argv, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **step.env}), time.monotonic()

    def _judge(self, step, code, seconds):
        """Record a finished step: its exit code (None: stopped at its limit), then its verdict."""
        log = os.path.join(self.args.out, f"{step.name}.log")
        if code is None:
            return self.record(step, "timed out", seconds, f"stopped at its limit of {seconds:.0f} s")
        if code != 0:
            return self.record(step, "FAILED", seconds, f"exit code {code}: {last_error(log)}")
        try:
            outcome = step.verdict(log) if step.verdict else "exit code 0"
        except (CheckFailed, OSError, ValueError, KeyError, TypeError, IndexError) as error:
            return self.record(step, "FAILED", seconds, f"{type(error).__name__}: {error}")
        summary, extra = outcome if isinstance(outcome, tuple) else (outcome, None)
        self.record(step, "passed", seconds, summary, extra)


def signal_group(process, sig):
    """Signal a step's whole process group (torchrun's workers, loader workers), if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def last_error(log_path) -> str:
    """The most telling line of a failed step's log: the last 'error:' or exception line, else the last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    telling = [line for line in lines if re.match(r"error:|[\w.]+(Error|Exception|Exit)\b", line)]
    return (telling or lines or ["(no output)"])[-1][:300]


def tail(log_path, count=30) -> str:
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        return "".join(f.readlines()[-count:])
    return "(no log)"


# ---- stage 4: CIFAR-10

def cifar_data(args):
    """(True, note) when args.data holds train/ and test/ (extracting --archive beside it first if it is missing),
    else (False, why not)."""
    train_dir, test_dir = cifar_splits(args)
    if args.archive and not os.path.isdir(train_dir):
        began, safe = time.monotonic(), {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            with tarfile.open(args.archive) as tar:   # holds cifar10-jpg/{train,test}/<class>/*.jpg
                tar.extractall(os.path.dirname(os.path.abspath(args.data)), **safe)
        except (OSError, tarfile.TarError) as error:
            return False, f"could not extract --archive {args.archive} ({error})"
        print(f"extracted {args.archive} in {time.monotonic() - began:.0f} s", flush=True)
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        return True, f"data: {args.data}"
    return False, f"no CIFAR-10 ImageFolder at {args.data} (train/, test/): pass --data or --archive"


def calibrated(args) -> float:
    """Images/s of MoCo + mosaic with the CIFAR recipe: the median over the calibration run's log intervals."""
    logged, _ = read_log(outputs(args, "cifar", "calibrate"))
    rates = sorted(r["images_per_s"] for r in logged[1:]) or [logged[-1]["images_per_s"]]   # the first: warm-up
    return rates[len(rates) // 2]


def run_cifar(runner, args):
    """Stage 4: calibrate, choose E, then per framework (MoCo, then BYOL) three runs and their k-NN."""
    ok, note = cifar_data(args)
    plan = [s for f in ("moco", "byol") for v in VIEWS for s in cifar_steps(args, f, v, 1)]
    if not ok:
        return runner.skip([calibration_step(args)] + plan, note)
    [calibration] = runner.run([calibration_step(args)])
    if calibration["status"] != "passed":
        return runner.skip(plan, f"no step time measured: the calibration run {calibration['status']}")
    rate = calibrated(args)
    overhead = max(0.0, calibration["seconds"] - 60 * CIFAR_BATCH / rate)   # start-up, warm-up, exit
    knn_s = overhead + (CIFAR_IMAGES + CIFAR_TEST_IMAGES) / (2 * rate)    # one forward per image: >= 2x the rate
    rows = []
    for framework, cost in (("moco", 1.0), ("byol", BYOL_COST)):
        epoch_s = (CIFAR_IMAGES // CIFAR_BATCH) * CIFAR_BATCH * cost / rate + 0.5   # + the checkpoint save
        epochs = choose_epochs(runner.remaining(), epoch_s, overhead, knn_s)
        if epochs < 1:
            runner.skip([s for s in plan if f"-{framework}-" in s.name], f"{framework}'s three runs and k-NN need ~"
                        f"{3 * (epoch_s + overhead + knn_s):.0f} s at one epoch each, {max(0, runner.remaining()):.0f} "
                        f"s left")
            continue
        for views in VIEWS:
            rows.append(cifar_run(runner, args, framework, views, epochs, overhead + epochs * epoch_s, knn_s))
        runner.extras["4"] = cifar_table(rows, rate, epoch_s / cost)


def cifar_run(runner, args, framework, views, epochs, train_s, knn_s):
    """Train, then k-NN, when each fits: (framework, views, epochs, train result, {k: top-1 %})."""
    train, knn = cifar_steps(args, framework, views, epochs)
    train.need_s, knn.need_s = train_s + knn_s, knn_s   # no training whose k-NN would not fit
    [trained], top1 = runner.run([train]), {}
    if trained["status"] != "passed":
        runner.skip([knn], "its training run did not pass")
    elif runner.run([knn])[0]["status"] == "passed":
        with open(os.path.join(outputs(args, "cifar", f"{framework}-{views}"), "knn.json")) as f:
            top1 = {k: v["top1"] for k, v in json.load(f)["knn"].items()}
    return framework, views, epochs, trained, top1


def cifar_table(rows, rate, moco_epoch_s):
    """Stage 4's markdown: the budget, then one row per run."""
    lines = [f"Budget: E epochs per run, chosen from the measured MoCo + mosaic rate ({rate:.0f} img/s, ~"
             f"{moco_epoch_s:.0f} s per epoch; BYOL's epoch estimated at {BYOL_COST:.2f}x). For scale: {PUBLISHED}.",
             "", "| framework | views | epochs | steps | train min | 20-NN | 200-NN |", "|---|---|---|---|---|---|---|"]
    for framework, views, epochs, trained, knn in rows:
        cells = [f"{knn[k]:.2f}" if k in knn else "-" for k in ("20", "200")]
        lines.append(f"| {framework} | {views} | {epochs} | {epochs * (CIFAR_IMAGES // CIFAR_BATCH)} | "
                     f"{trained['seconds'] / 60:.1f} ({trained['status']}) | {' | '.join(cells)} |")
    return "\n".join(lines)


# ---- the report

SUBSTAGES = {"2a": "test_mosrep.py's device-independent tests on CUDA", "2b": "roi_align on CUDA equals the CPU",
             "2c": "no host sync in a training step but the documented all-reduce",
             "2d": "20 steps per framework x view mode (bf16), fp16 with GradScaler, resume",
             "2e": "torchrun (nccl; train.py uses DDP and SyncBN only with 2 or more processes)"}


def write_report(runner):
    """Rewrite <out>/report.md from the results so far (a check cut short still leaves its report)."""
    args, results = runner.args, runner.results
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "FAILED", "timed out", "skipped")}
    command = getattr(args, "command", f"python check_gpu.py --minutes {args.minutes:g}")
    lines = ["# GPU check report", "", f"`{command}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}: used {(time.monotonic() - runner.started) / 60:.1f} of "
             f"{args.minutes:g} min; " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", "",
             "| stage | step | result | s | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | [{r['name']}]({r['log']}) | {r['status']} | {r['seconds']:.0f} | "
              f"{r['summary'].replace('|', '/')} |" for r in results]
    for stage, title in STAGES.items():
        lines += ["", f"## {stage}. {title}"]
        for key in dict.fromkeys(r["stage"] for r in results if r["stage"][0] == stage):
            if key in SUBSTAGES:
                lines += ["", f"### {key}. {SUBSTAGES[key]}"]
            for r in (r for r in results if r["stage"] == key):
                lines += ["", f"- **{r['name']}**: {r['status']} in {r['seconds']:.0f} s. {r['summary']}  ",
                          f"  `{r['command']}`"]
                if r["status"] in ("FAILED", "timed out"):
                    lines += ["", "```", tail(os.path.join(args.out, r["log"])).rstrip(), "```"]
            if key in runner.extras:
                lines += ["", runner.extras[key]]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the dry run: the plan, each command parsed by its own parser, nothing run

@contextlib.contextmanager
def cuda_seen():
    """Parse as on a CUDA machine: bench.py refuses --device cuda where torch sees no GPU."""
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = real


def parse_eval_knn(argv):
    """eval_knn.main() up to its work: its parser and checks (they read sys.argv); the first function it calls
    after them (distributed) and the ones after that stop it."""
    import eval_knn

    class Parsed(Exception):
        pass

    def stop_here(*args, **kwargs):
        raise Parsed
    names = [n for n in ("distributed", "build_trunk", "build_splits", "knn_eval") if hasattr(eval_knn, n)]
    saved = sys.argv, [getattr(eval_knn, n) for n in names]
    sys.argv = ["eval_knn.py", *argv]
    for name in names:
        setattr(eval_knn, name, stop_here)
    try:
        eval_knn.main()
    except Parsed:
        return
    finally:
        sys.argv = saved[0]
        for name, real in zip(names, saved[1]):
            setattr(eval_knn, name, real)
    raise SystemExit("eval_knn.main() returned before its work")


def check_script(script, argv) -> str:
    """Parse argv with script's own parser (SystemExit if it refuses); returns what was checked."""
    if not os.path.isfile(os.path.join(HERE, script)):
        raise SystemExit(f"{script} not found in {HERE}")
    if script == "train.py":
        import train
        train.parse_args(argv)
        return "train.parse_args accepts it"
    if script == "eval_knn.py":
        parse_eval_knn(argv)
        return "eval_knn's parser and checks accept it"
    if script == "bench.py":
        import bench
        with cuda_seen():
            bench.parse_args(argv)
        return "bench.parse_args accepts it"
    if script == "check_gpu.py":
        probe = build_parser().parse_args(argv)
        for _, inner in (sync_argvs(probe.out) if probe.probe == "sync" else []):
            check_script("train.py", inner)
        return f"probe {probe.probe}" + (" (and its train.py runs)" if probe.probe == "sync" else "")
    raise SystemExit(f"no parser known for {script}")


def check_command(argv, env=None):
    """(ok, message): does a command of the plan parse? pytest collects its tests (it runs none); the rest are
    parsed in this process by their own parsers, torchrun's launcher and the script it launches."""
    if argv[0] != PY:
        return False, "not run with this Python"
    if argv[1:3] == ["-m", "pytest"]:
        return check_pytest(tuple(argv), tuple(sorted((env or {}).items())))
    who, rest = "torchrun" if argv[1:3] == ["-m", "torch.distributed.run"] else argv[1], argv[1:]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            if who == "torchrun":
                from torch.distributed.run import get_args_parser
                launch = get_args_parser().parse_args(rest[2:])
                who, rest = launch.training_script, [launch.training_script, *launch.training_script_args]
            return True, check_script(rest[0], rest[1:])
        except SystemExit as error:
            said = error.code if isinstance(error.code, str) else telling_line(err.getvalue())
            return False, f"{who} refuses it: {said}"


def telling_line(text: str) -> str:
    """The last line of a parser's complaint that says 'error', without its program name (argparse starts it with
    sys.argv[0], which is not the script checked)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["(no message)"]
    line = ([line for line in lines if "error" in line.lower()] or lines)[-1]
    return line[line.index("error"):] if "error:" in line else line


@functools.lru_cache(maxsize=None)
def check_pytest(argv, env):
    """pytest --collect-only on the command: its flags parse and its -k selects tests (imports, runs none)."""
    result = subprocess.run([*argv, "--collect-only"], cwd=HERE, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **dict(env)})
    counted = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
    if result.returncode == 0 and counted:
        return True, f"collects {counted[1]} tests (collected, not run)"
    if result.returncode == 5:
        return False, "pytest selects no test"
    return False, f"pytest refuses it: {telling_line(result.stderr or result.stdout)}"


def data_note(args) -> str:
    if os.path.isdir(cifar_splits(args)[0]):
        return "present"
    return (f"missing: --archive {args.archive} will be extracted" if args.archive
            else "missing: stage 4 will be skipped")


def dry_run(args) -> int:
    """Print the plan, every command with whether it parses; 0 when all do, else 1 with a one-line error."""
    groups = static_plan(args) + [[calibration_step(args)]] + [
        [step] for f in ("moco", "byol") for v in VIEWS for step in cifar_steps(args, f, v, 1)]
    print(f"check_gpu.py plan: budget {args.minutes:g} min, report {os.path.join(args.out, 'report.md')}; each step is "
          f"skipped when it would overrun what is left. Dry run: every command parsed, none run.")
    failures, count, stage = [], 0, None
    for group in groups:
        for step in group:
            if step.stage[0] != stage:
                stage = step.stage[0]
                print(f"\n{stage}. {STAGES[stage]}")
                if stage == "4":
                    print(f"   data: {args.data} ({data_note(args)}); E epochs per run, chosen from the calibration "
                          f"run's step time (shown with E = 1)")
            ok, message = check_command(step.argv, step.env)
            count += 1
            failures += [] if ok else [step.name]
            together = f" (runs together with {len(group) - 1} others)" if len(group) > 1 else ""
            print(f"   [{step.stage}] {step.name}{together}\n      $ {shown(step)}\n      {'ok' if ok else 'FAILS'}: "
                  f"{message}")
    if failures:
        print(f"error: {len(failures)} of {count} commands do not parse ({', '.join(failures)}); fix them in "
              f"check_gpu.py", file=sys.stderr)
        return 1
    print(f"\ndry run: all {count} commands parse")
    return 0


# ---- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8, help="time budget of the whole check (default 8)")
    p.add_argument("--out", default=os.path.join("runs", "check_gpu"),
                   help="folder for report.md, each step's <step>.log, and outputs/ (the runs, wiped at start)")
    p.add_argument("--data", help="stage 4's CIFAR-10 ImageFolder holding train/ and test/ (default data/cifar10-jpg)")
    p.add_argument("--archive", help="a cifar10-jpg .tar.gz, extracted beside --data when --data is missing")
    p.add_argument("--nproc", type=int, help="processes of the torchrun step (default: the number of GPUs)")
    p.add_argument("--workers", type=int, default=max(2, min(16, (os.cpu_count() or 2) - 1)),
                   help="loader workers of stage 4's runs (default: CPU cores - 1, 2 to 16)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, check that each command parses, run nothing")
    p.add_argument("--probe", choices=PROBES, help="internal: one in-process check, run by the plan as a step")
    return p


def repo_path(path: str) -> str:
    """A user's path (relative to where they are) as seen from the repository root, where every step runs."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, HERE)
    return absolute if relative.startswith("..") else relative


def run_all(args) -> int:
    """Stages 1 to 4 within the budget; 0 when no step failed or timed out."""
    started = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(outputs(args), ignore_errors=True)   # the last check's runs: train.py would refuse their folders
    for name in os.listdir(args.out):
        if name.endswith(".log"):
            os.remove(os.path.join(args.out, name))
    runner = Runner(args, started)
    print(f"checking this machine within {args.minutes:g} min; report: {os.path.join(args.out, 'report.md')}",
          flush=True)
    for group in static_plan(args):
        runner.run(group)
    run_cifar(runner, args)
    write_report(runner)
    failed = [r["name"] for r in runner.results if r["status"] in ("FAILED", "timed out")]
    print(f"done: {len(runner.results)} steps, failed: {', '.join(failed) or 'none'}; "
          f"report: {os.path.join(args.out, 'report.md')}")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "python check_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.minutes <= 0:
        raise SystemExit(f"error: --minutes {args.minutes:g} must be positive")
    args.out = repo_path(args.out)
    args.data = repo_path(args.data) if args.data else os.path.join("data", "cifar10-jpg")
    args.archive = args.archive and repo_path(args.archive)
    os.chdir(HERE)
    args.nproc = args.nproc or max(1, torch.cuda.device_count())
    if args.probe:
        probes = {"env": probe_env, "roi_align": probe_roi_align, "sync": probe_sync, "nccl": probe_nccl}
        return probes[args.probe](args)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        raise SystemExit(f"error: no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
                         f"False); run this on a GPU machine, or pass --dry-run to see the plan")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
