"""Rerun the CIFAR-10 comparison of the README: {moco, byol} x {two, multicrop, mosaic} and mosaic
without jitter, same budget and seed, then k-NN (k = 1, 5, 20, 200) and the cached linear probe on
the test split. Writes <out>/table.md and <out>/table.json.

    python cifar_table.py --data data/cifar10-jpg --epochs 200              # the full table (GPU)
    python cifar_table.py --data tiny/cifar10-jpg --max-steps 2 --batch-size 64 --probe-epochs 2  # smoke run

Each run is a plain call of train.py, eval_knn.py and eval_linear.py (under torchrun with --nproc > 1),
exactly as a user would type them; the commands are printed and kept in the JSON.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from mosaic import default_jitter

# The CIFAR recipe [ours]: ResNet-18 with the cifar stem, 32 px views, 16 px crops (train.py's default jitter
# for a 32 px mosaic, 48/224 of it, is 7 px), batch 256. Per framework, what differs from the ImageNet defaults.
RECIPE = ["--arch", "resnet18", "--stem", "cifar", "--image-size", "32", "--crop-size", "16"]
FRAMEWORK = {"moco": ["--lr", "0.06", "--wd", "5e-4", "--queue-size", "4096"],
             "byol": ["--lr", "1.0", "--wd", "1e-5", "--warmup-epochs", "10"]}
RUNS = [(f, v, None) for f in ("moco", "byol") for v in ("two", "multicrop", "mosaic")] + \
       [(f, "mosaic", "0") for f in ("moco", "byol")]


def run(command, log):
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    log.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode:
        raise SystemExit(f"error: this command failed (exit {result.returncode}); its output is in {log.name}:\n"
                         + result.stderr[-2000:])
    return time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the cifar10-jpg folder holding train/ and test/")
    p.add_argument("--out", default="runs/cifar_table")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=0, help="cut every run short (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="several seeds repeat every run")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, via torchrun")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--probe-epochs", type=int, default=100)
    args = p.parse_args()
    train_dir, test_dir = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    if not (os.path.isdir(train_dir) and os.path.isdir(test_dir)):
        raise SystemExit(f"error: {args.data} must hold train/ and test/ class folders (extract cifar10-jpg.tar.gz)")
    os.makedirs(args.out, exist_ok=True)
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone"]
                                 if args.nproc > 1 else [])
    evaluation = ["--arch", "resnet18", "--stem", "cifar", "--image-size", "32", "--dataset", "imagefolder",
                  "--data", train_dir, "--val-data", test_dir, "--workers", str(args.workers)]
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()} {platform.machine()}"
    rows = []
    with open(os.path.join(args.out, "commands.log"), "w") as log:
        for seed in args.seeds:
            for framework, views, jitter in RUNS:
                name = f"{framework}-{views}" + (f"-jitter{jitter}" if jitter else "") + f"-seed{seed}"
                out = os.path.join(args.out, name)
                train_cmd = launch + ["train.py", "--framework", framework, "--views", views, "--data", train_dir,
                                      "--epochs", str(args.epochs), "--seed", str(seed), "--out", out,
                                      "--workers", str(args.workers), "--log-every", "20", *RECIPE,
                                      "--batch-size", str(args.batch_size),
                                      *FRAMEWORK[framework]] + (["--jitter", jitter] if jitter else []) \
                    + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
                seconds = run(train_cmd, log)
                backbone = os.path.join(out, "backbone.pth")
                knn_cmd = launch + ["eval_knn.py", "--weights", backbone, *evaluation, "--out", out + "/knn.json"]
                probe_cmd = launch + ["eval_linear.py", "--weights", backbone, *evaluation, "--epochs",
                                      str(args.probe_epochs), "--out", out + "/linear.json"]
                run(knn_cmd, log)
                run(probe_cmd, log)
                with open(out + "/knn.json") as f:
                    knn = json.load(f)["knn"]
                with open(out + "/linear.json") as f:
                    linear = json.load(f)["best"]
                rows.append({"name": name, "framework": framework, "views": views, "jitter": jitter or str(default_jitter(32)),
                             "seed": seed, "epochs": args.epochs, "max_steps": args.max_steps,
                             "knn_top1": {k: v["top1"] for k, v in knn.items()}, "linear": linear,
                             "train_minutes": round(seconds / 60, 1), "hardware": hardware,
                             "commands": [train_cmd, knn_cmd, probe_cmd]})
                with open(os.path.join(args.out, "table.json"), "w") as f:
                    json.dump(rows, f, indent=2)
    lines = ["| method | framework | jitter | seed | epochs | 1-NN | 5-NN | 20-NN | 200-NN | linear top-1 | train min | hardware |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knn = r["knn_top1"]
        budget = f"{r['epochs']}" + (f" ({r['max_steps']} steps)" if r["max_steps"] else "")
        lines.append(f"| {r['views']} | {r['framework']} | {r['jitter']} | {r['seed']} | {budget} | "
                     + " | ".join(f"{knn[k]:.1f}" for k in ("1", "5", "20", "200"))
                     + f" | {r['linear'].get('best_top1', float('nan')):.1f} | {r['train_minutes']} | {r['hardware']} |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
