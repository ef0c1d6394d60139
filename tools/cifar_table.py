"""Rerun the CIFAR-10 comparison of the README: {moco, byol} x {two, multicrop, mosaic} and mosaic
without jitter, same budget and seed, then k-NN (k = 1, 5, 20, 200) and the cached linear probe on
the test split. Writes <out>/table.md and <out>/table.json, both rewritten after each run.

    python tools/cifar_table.py --data data/cifar10-jpg --epochs 200        # the full table (GPU)
    python tools/cifar_table.py --data tiny/cifar10-jpg --max-steps 2 --batch-size 64 --probe-epochs 2  # smoke run
    python tools/cifar_table.py --data data/cifar10-jpg --minutes 30 --runs moco-two moco-mosaic --probe-epochs 0

Each run is a plain call of train.py, eval_knn.py and eval_linear.py (under torchrun with --nproc > 1),
exactly as a user would type them at the repository root, where this runs; the commands are printed and kept in the
JSON.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root: its modules
from mosaic import default_jitter  # noqa: E402

# The CIFAR recipe [ours]: ResNet-18 with the cifar stem, 32 px views, 16 px crops (train.py's default jitter
# for a 32 px mosaic, 48/224 of it, is 7 px), batch 256. Per framework, what differs from the ImageNet defaults.
RECIPE = ["--arch", "resnet18", "--stem", "cifar", "--image-size", "32", "--crop-size", "16"]
FRAMEWORK = {"moco": ["--lr", "0.06", "--wd", "5e-4", "--queue-size", "4096"],
             "byol": ["--lr", "1.0", "--wd", "1e-5", "--warmup-epochs", "10"]}
# name -> (framework, views, jitter or None for train.py's default)
RUNS = {f"{f}-{v}": (f, v, None) for f in ("moco", "byol") for v in ("two", "multicrop", "mosaic")}
RUNS.update({f"{f}-mosaic-jitter0": (f, "mosaic", "0") for f in ("moco", "byol")})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the cifar10-jpg folder holding train/ and test/")
    p.add_argument("--out", default="runs/cifar_table")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--minutes", type=float, help="instead of --epochs: the most epochs with which every run and its "
                   "evaluations fit in this many minutes, from a 60-step calibration run")
    p.add_argument("--max-steps", type=int, default=0, help="cut every run short (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="several seeds repeat every run")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default: all)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, via torchrun")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs (0 = no linear probe)")
    return p.parse_args(argv)


def commands(args, name: str, seed: int):
    """(output folder, [train, k-NN, linear probe] commands) of one run; no probe command with --probe-epochs 0."""
    framework, views, jitter = RUNS[name]
    out = os.path.join(args.out, f"{name}-seed{seed}")
    train_dir, test_dir = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone"]
                                 if args.nproc > 1 else [])
    recipe = list(FRAMEWORK[framework])
    if "--warmup-epochs" in recipe:   # BYOL warms up for 10 of 200 epochs: the same share at any --epochs
        at = recipe.index("--warmup-epochs") + 1
        recipe[at] = f"{float(recipe[at]) * args.epochs / 200:g}"
    train_cmd = launch + ["train.py", "--framework", framework, "--views", views, "--data", train_dir,
                          "--epochs", str(args.epochs), "--seed", str(seed), "--out", out,
                          "--workers", str(args.workers), "--log-every", "20", *RECIPE,
                          "--batch-size", str(args.batch_size), *recipe] + (["--jitter", jitter] if jitter else []) \
        + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
    evaluation = ["--weights", os.path.join(out, "backbone.pth"), "--arch", "resnet18", "--stem", "cifar",
                  "--image-size", "32", "--dataset", "imagefolder", "--data", train_dir, "--val-data", test_dir,
                  "--workers", str(args.workers)]
    knn_cmd = launch + ["eval_knn.py", *evaluation, "--out", os.path.join(out, "knn.json")]
    probe_cmd = launch + ["eval_linear.py", *evaluation, "--epochs", str(args.probe_epochs), "--out",
                          os.path.join(out, "linear.json")]
    return out, [train_cmd, knn_cmd] + ([probe_cmd] if args.probe_epochs else [])


def choose_epochs(left_s, epoch_s, run_s, eval_s, runs=3, margin=0.9):
    """The most whole epochs E such that `runs` runs of E epochs (epoch_s each, plus run_s of start-up) and their
    evaluations (eval_s each) fit in margin * left_s seconds; 0 when not even one epoch fits."""
    return max(0, math.floor((margin * left_s - runs * (run_s + eval_s)) / (runs * epoch_s)))


def fit_epochs(args, log) -> int:
    """--epochs for --minutes: 60 steps of the costliest run chosen (BYOL over MoCo, mosaic over the others) give the
    images/s of a step and a run's start-up; k-NN and the cached probe each forward every image once (>= 2x the
    training's images/s); every run is assumed to cost as much."""
    name = max(args.runs, key=lambda n: (RUNS[n][0] == "byol", RUNS[n][1] == "mosaic"))
    trial = argparse.Namespace(**{**vars(args), "epochs": 1, "max_steps": 60, "out": os.path.join(args.out, "fit")})
    out, (train_cmd, *_) = commands(trial, name, args.seeds[0])
    seconds = run(train_cmd, log)
    with open(os.path.join(out, "log.jsonl")) as f:
        rates = sorted(r["images_per_s"] for r in map(json.loads, f) if "images_per_s" in r)
    rate = rates[len(rates) // 2]
    images = {split: sum(len(files) for _, _, files in os.walk(os.path.join(args.data, split)))
              for split in ("train", "test")}
    start_s = max(0.0, seconds - 60 * args.batch_size / rate)
    eval_s = (1 + bool(args.probe_epochs)) * (start_s + (images["train"] + images["test"]) / (2 * rate))
    epoch_s = images["train"] // args.batch_size * args.batch_size / rate
    epochs = choose_epochs(60 * args.minutes - seconds, epoch_s, start_s, eval_s, len(args.runs) * len(args.seeds))
    print(f"--minutes {args.minutes:g}: {rate:.0f} img/s, {epoch_s:.0f} s per epoch: {epochs} epochs per run")
    if epochs < 1:
        raise SystemExit(f"error: --minutes {args.minutes:g} leaves no time for one epoch per run (~{epoch_s:.0f} s "
                         f"each, + {start_s + eval_s:.0f} s of start-up and evaluation); raise it or pass fewer --runs")
    return epochs


def run(command, log):
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    log.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode:
        raise SystemExit(f"error: this command failed (exit {result.returncode}); its output is in {log.name}:\n"
                         + result.stderr[-2000:])
    return time.time() - start


def write_table(rows, out: str) -> str:
    """Write rows to <out>/table.json and their markdown table to <out>/table.md; returns the table."""
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| method | framework | jitter | seed | epochs | 1-NN | 5-NN | 20-NN | 200-NN | linear top-1 | train min "
             "| hardware |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knn, linear = r["knn_top1"], r["linear"].get("best_top1")
        budget = f"{r['epochs']}" + (f" ({r['max_steps']} steps)" if r["max_steps"] else "")
        lines.append(f"| {r['views']} | {r['framework']} | {r['jitter']} | {r['seed']} | {budget} | "
                     + " | ".join(f"{knn[k]:.1f}" for k in ("1", "5", "20", "200"))
                     + f" | {'-' if linear is None else f'{linear:.1f}'} | {r['train_minutes']} | {r['hardware']} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not all(os.path.isdir(os.path.join(args.data, split)) for split in ("train", "test")):
        raise SystemExit(f"error: {args.data} must hold train/ and test/ class folders (extract cifar10-jpg.tar.gz)")
    os.makedirs(args.out, exist_ok=True)
    hardware = (torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"CPU x{os.cpu_count()} {platform.machine()}")
    rows = []
    with open(os.path.join(args.out, "commands.log"), "w") as log:
        args.epochs = fit_epochs(args, log) if args.minutes else args.epochs
        for seed in args.seeds:
            for name in args.runs:
                out, steps = commands(args, name, seed)
                seconds = [run(command, log) for command in steps][0]   # the training's time
                with open(os.path.join(out, "knn.json")) as f:
                    knn = json.load(f)["knn"]
                linear = {}
                if args.probe_epochs:
                    with open(os.path.join(out, "linear.json")) as f:
                        linear = json.load(f)["best"]
                framework, views, jitter = RUNS[name]
                rows.append({"name": f"{name}-seed{seed}", "framework": framework, "views": views,
                             "jitter": jitter or str(default_jitter(32)), "seed": seed, "epochs": args.epochs,
                             "max_steps": args.max_steps, "knn_top1": {k: v["top1"] for k, v in knn.items()},
                             "linear": linear, "train_minutes": round(seconds / 60, 1), "hardware": hardware,
                             "commands": steps})
                table = write_table(rows, args.out)
    print(f"{table}\n{len(rows)} runs of {args.epochs} epochs, 200-NN top-1: "
          + ", ".join(f"{r['name']} {r['knn_top1']['200']:.2f} %" for r in rows) + f"; {args.out}/table.md")


if __name__ == "__main__":
    main()
