"""MosRep pre-training. One script, one code path, from a laptop CPU to many GPUs:

    python train.py --framework moco --data imagenet/train                      # one process
    torchrun --nproc_per_node=8 train.py --framework byol --data imagenet/train # DDP

Each step: two global views and M small crops per image arrive from the loader; the mosaic is built
on the device (mosaic.make_mosaic); the learner (models.MoCo or models.BYOL) returns its losses; one
optimizer step; one EMA step of the target. Rank 0 writes checkpoint.pth, backbone.pth and log.jsonl
to --out. Defaults are the paper's ImageNet recipe of the chosen framework (METHOD.md section 4).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import models
from mosaic import make_mosaic

# Per-framework defaults; None in argparse means "take it from here".
RECIPES = {
    "moco": dict(lr=0.03, wd=1e-4, optimizer="sgd", warmup_epochs=0, ema=0.999,
                 epochs=200, dim=128),
    "byol": dict(lr=0.3, wd=1.5e-6, optimizer="lars", warmup_epochs=10, ema=0.99,
                 epochs=300, dim=256),
}
# A CPU-sized demo on CIFAR-10 (README): contrastive learning with in-batch negatives shows learning
# within minutes on 2 cores; the ImageNet defaults would learn next to nothing in that time.
# CIFAR images are upsampled to 64 px so the ImageNet stem (16x cheaper than the cifar stem at 32 px)
# still leaves a 2x2 C5 map to align RoIs on.
DEMO = dict(framework="moco", arch="resnet18", stem="imagenet", image_size=64, crop_size=32, batch_size=128,
            lr=0.4, queue_size=0, epochs=1, max_steps=180, workers=2, knn_final=True, log_every=10,
            out="runs/demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["moco", "byol"], default="byol")
    p.add_argument("--views", choices=["mosaic", "multicrop", "two"], default="mosaic",
                   help="mosaic = MosRep; multicrop = the same small crops encoded separately; two = plain")
    p.add_argument("--data", help="training images: an ImageFolder root (one folder per class), or the "
                                  "torchvision root for cifar10/cifar100/stl10")
    p.add_argument("--val-data", help="ImageFolder of the val split for the k-NN monitor "
                                      "(default: a val/ or test/ folder beside --data)")
    p.add_argument("--dataset", choices=data.DATASETS, default="imagefolder")
    p.add_argument("--arch", choices=models.ARCHS, default="resnet50")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.add_argument("--image-size", type=int, default=224, help="global views (px)")
    p.add_argument("--crop-size", type=int, default=112, help="small crops (px)")
    p.add_argument("--crops", type=int, default=4, help="M small crops per image, a perfect square")
    p.add_argument("--jitter", type=float, default=None,
                   help="max mosaic shift in px, 0 = off (default: 48 px per 224 px of mosaic)")
    p.add_argument("--jitter-alpha", type=float, default=0.5, help="Beta(alpha, alpha) of the shift")
    p.add_argument("--epochs", type=int, help="default: moco 200, byol 300")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split across processes")
    p.add_argument("--lr", type=float, help="base lr for batch 256 (default: moco 0.03, byol 0.3)")
    p.add_argument("--wd", type=float, help="weight decay (default: moco 1e-4, byol 1.5e-6)")
    p.add_argument("--optimizer", choices=["sgd", "lars"], help="default: moco sgd, byol lars")
    p.add_argument("--warmup-epochs", type=float, help="linear lr warm-up (default: moco 0, byol 10)")
    p.add_argument("--ema", type=float, help="target momentum (default: moco 0.999 constant, byol 0.99 "
                                             "cosine to 1; 0.996 for runs over 300 epochs)")
    p.add_argument("--temperature", type=float, default=0.2, help="moco")
    p.add_argument("--queue-size", type=int, default=65536, help="moco negatives (0 = in-batch only)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes per training process")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: bf16 on CUDA, off on CPU")
    p.add_argument("--out", default="runs/mosrep", help="folder for checkpoint.pth, backbone.pth, log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pth")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="steps")
    p.add_argument("--knn-every", type=int, default=0, help="k-NN monitor every N epochs (0 = off)")
    p.add_argument("--knn-final", action="store_true",
                   help="at the end, k-NN of the trained backbone next to a random-init one")
    p.add_argument("--knn-samples", type=int, default=10000, help="images per split for the k-NN monitor")
    p.add_argument("--fake-size", type=int, default=512, help="images in --dataset fake")
    p.add_argument("--demo", action="store_true", help="CPU demo on CIFAR-10: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items()))
    args = p.parse_args(argv)
    if args.demo:
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)   # flags given explicitly still win over the demo's values
    recipe = dict(RECIPES[args.framework])
    if args.framework == "byol" and (args.epochs or 0) > 300:
        recipe["ema"] = 0.996   # BYOL's longer schedules start the target closer to frozen
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.jitter is None:
        args.jitter = round(48 * math.isqrt(max(args.crops, 1)) * args.crop_size / 224)
    return args


def fail(message: str):
    """Stop with a one-line error (exit code 1): bad input is the user's to fix, not a traceback."""
    raise SystemExit(f"error: {message}")


def check_args(args, world: int):
    g = math.isqrt(args.crops)
    if g * g != args.crops or args.crops < 1:
        fail(f"--crops {args.crops} is not a perfect square; use 4 (2x2) or 9 (3x3)")
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} does not split evenly over {world} processes")
    if args.views == "mosaic":
        if args.batch_size // world < args.crops:
            fail(f"per-process batch {args.batch_size // world} is smaller than --crops {args.crops}: a mosaic "
                 f"needs crops of {args.crops} different images; raise --batch-size or lower --crops")
        if args.jitter >= args.crop_size:
            fail(f"--jitter {args.jitter} must be smaller than --crop-size {args.crop_size}, or a crop can "
                 f"leave the mosaic entirely")
        if g * args.crop_size != args.image_size:
            fail(f"a {g}x{g} mosaic of {args.crop_size} px crops is {g * args.crop_size} px but --image-size is "
                 f"{args.image_size}; set --crop-size {args.image_size // g}")
    if args.framework == "moco" and 0 < args.queue_size < args.batch_size:
        fail(f"--queue-size {args.queue_size} is smaller than the global batch {args.batch_size}")
    if args.stem == "cifar" and args.image_size > 64:
        print(f"warning: the cifar stem at {args.image_size} px costs 16x the imagenet stem's compute")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per tensor by trust * |w| / |g + wd * w| (You et al.,
    2017; BYOL's optimizer). Groups with lars=False (BN parameters and biases) get plain SGD
    without weight decay, as BYOL does."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["lars"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group["trust"] * w_norm / u_norm, 1.0)
                    update = update * ratio
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.clone(update)
                else:
                    state["momentum"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum"], alpha=-group["lr"])


def build_optimizer(learner, args, lr):
    params = [p for p in learner.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.wd)
    plain = [p for p in params if p.ndim <= 1]   # BN weights and biases
    adapted = [p for p in params if p.ndim > 1]
    return LARS([{"params": adapted}, {"params": plain, "lars": False, "weight_decay": 0.0}],
                lr=lr, weight_decay=args.wd)


def schedules(step: int, total: int, warmup: int, peak_lr: float, args):
    """lr: linear warm-up then cosine to 0; EMA momentum: constant or cosine from args.ema to 1."""
    if step < warmup:
        lr = peak_lr * (step + 1) / warmup
    else:
        lr = peak_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    ema = args.ema
    if args.framework == "byol":   # BYOL anneals the target momentum to 1; MoCo keeps it constant
        ema = 1 - (1 - args.ema) * 0.5 * (1 + math.cos(math.pi * step / total))
    return lr, ema


def save_atomically(obj, path: str):
    """Write to a temp file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, args, learner, optimizer, scaler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--resume: no checkpoint at {path}; drop --resume or point --out at the run's folder")
    except Exception as error:
        fail(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}); delete it or use another --out")
    if not isinstance(state, dict) or "args" not in state or "model" not in state:
        fail(f"--resume: {path} is not a train.py checkpoint")
    saved = state["args"]
    for key in ("framework", "arch", "stem", "views", "crops", "image_size"):
        if saved[key] != getattr(args, key):
            fail(f"{path} is a --{key.replace('_', '-')} {saved[key]} run but this one is "
                 f"--{key.replace('_', '-')} {getattr(args, key)}; use another --out or the same flags")
    learner.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] or not scaler.is_enabled():   # a bf16/off run saved no scaler state
        scaler.load_state_dict(state["scaler"])
    return state["step"]


def knn_report(trunk, args, device, baseline: bool) -> dict:
    """k-NN top-1 % (k=20, T=0.07) on the val split of `trunk`, and of a random-init trunk when
    baseline. At most --knn-samples images per split (a fixed random subset) keep it to minutes.
    Every process extracts a shard of the features (eval_knn.extract_features gathers them)."""
    from eval_knn import evaluate_knn, extract_features, shard_loader
    if models.world_size() > 1:   # without SyncBN each rank's BN statistics saw only its own shard
        for buffer in trunk.buffers():
            dist.broadcast(buffer, src=0)
    val_root = args.data
    if args.dataset == "imagefolder":
        parent = os.path.dirname(os.path.abspath(args.data))
        val_root = args.val_data or next((os.path.join(parent, n) for n in ("val", "test")
                                          if os.path.isdir(os.path.join(parent, n))), None)
        if val_root is None:
            print("k-NN skipped: no --val-data and no val/ or test/ folder beside --data")
            return {}
    transform = data.eval_transform(args.image_size)
    splits = []
    for train, root in ((True, args.data), (False, val_root)):
        split = data.build_dataset(args.dataset, root, train, transform, args.image_size, args.fake_size)
        if len(split) > args.knn_samples:
            keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:args.knn_samples]
            split = torch.utils.data.Subset(split, keep.tolist())
        splits.append(shard_loader(split, 256, args.workers))
    results = {}
    torch.manual_seed(args.seed)   # the same random-init baseline on every rank
    nets = [("trained", trunk)] + ([("random-init", models.Trunk(args.arch, args.stem).to(device))] if baseline else [])
    for name, net in nets:
        (train_x, train_y), (val_x, val_y) = [extract_features(net, loader, device) for loader in splits]
        num_classes = int(train_y.max()) + 1
        results[name] = evaluate_knn(train_x, train_y, val_x, val_y, [20], 0.07, num_classes)[20]["top1"]
    trunk.train()
    return results


@contextlib.contextmanager
def stop_requests():
    """Turn SIGTERM (cluster preemption) and Ctrl-C into a request the loop polls after each step, so
    it can save a checkpoint instead of dying mid-step. Yields the list the handler appends to."""
    received = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    with stop_requests() as stop_signal:
        return train(args, stop_signal)


def train(args, stop_signal: list) -> int:
    """The training run: returns 0 when done, 1 when stopped by a signal (checkpoint saved)."""
    device = models.init_distributed()
    world, rank = models.world_size(), models.rank()
    check_args(args, world)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    amp = args.amp or ("bf16" if cuda else "off")
    if amp == "fp16" and not cuda:
        fail("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True

    # Data: each process loads batch/world images per step.
    local_batch = args.batch_size // world
    num_crops = 0 if args.views == "two" else args.crops
    transform = data.MultiViewTransform(args.framework, args.image_size, args.crop_size, num_crops)
    dataset = data.build_dataset(args.dataset, args.data, True, transform, args.image_size, args.fake_size,
                                 unlabeled=True)
    loader = data.build_train_loader(dataset, local_batch, args.workers, args.seed)
    steps_per_epoch = loader.sampler.batches_per_epoch
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} images make no full batch of {args.batch_size}; lower --batch-size")
    total_steps = args.epochs * steps_per_epoch

    # Model. SyncBN for BYOL (no negatives, so BN statistics over the global batch matter); MoCo
    # uses shuffle-BN instead and keeps per-process BN.
    if args.framework == "moco":
        learner = models.MoCo(args.arch, args.stem, args.dim, args.queue_size, args.temperature)
    else:
        learner = models.BYOL(args.arch, args.stem, args.dim)
    if args.framework == "byol" and world > 1 and cuda:
        learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    learner = learner.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    peak_lr = args.lr * args.batch_size / 256   # the linear scaling rule, applied here and only here
    optimizer = build_optimizer(learner, args, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    os.makedirs(args.out, exist_ok=True)
    checkpoint_path = os.path.join(args.out, "checkpoint.pth")
    if not args.resume and os.path.exists(checkpoint_path):
        fail(f"{checkpoint_path} exists; pass --resume to continue it, or choose another --out")
    step = load_checkpoint(checkpoint_path, args, learner, optimizer, scaler) if args.resume else 0
    # Buffers are not broadcast each step: that would ship the 32 MB queue (identical on every rank
    # anyway) around every iteration. BN running statistics may differ between ranks (they do not
    # affect training); rank 0's are exported, and knn_report broadcasts them first.
    model = DistributedDataParallel(learner, device_ids=[device.index] if cuda else None,
                                    broadcast_buffers=False) if world > 1 else learner
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "off")

    def save(epoch_done: int):
        if is_main:
            save_atomically({"model": learner.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch_done, "step": step,
                             "args": vars(args)}, checkpoint_path)
            save_atomically(learner.online.trunk.state_dict(), os.path.join(args.out, "backbone.pth"))

    log(f"{args.framework} + {args.views} views | {args.arch} ({args.stem} stem) | {len(dataset)} images | "
        f"{world} process(es) on {device.type} | batch {args.batch_size} | {steps_per_epoch} steps/epoch | "
        f"peak lr {peak_lr:.4g} | amp {amp} | out {args.out}")
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if is_main else None
    last_step = min(total_steps, args.max_steps or total_steps)
    learner.train()
    tick, waited, steps_since_log = time.time(), 0.0, 0
    while step < last_step:
        epoch = step // steps_per_epoch
        loader.sampler.set_epoch(epoch, skip_batches=step % steps_per_epoch)
        wait_start = time.time()
        for (x1, x2, crops), _ in loader:   # labels are never used in pre-training
            waited += time.time() - wait_start
            lr, ema = schedules(step, total_steps, round(args.warmup_epochs * steps_per_epoch), peak_lr, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every random choice of this step (mosaic grouping, jitter, shuffle-BN order) is a
            # function of (seed, step, rank), so a resumed run repeats an uninterrupted one.
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
            fmt = torch.channels_last if cuda else torch.contiguous_format
            x1 = x1.to(device, non_blocking=True, memory_format=fmt)
            x2 = x2.to(device, non_blocking=True, memory_format=fmt)
            crops = crops.to(device, non_blocking=True)                          # [B, M, 3, s, s]
            local = crops if args.views == "multicrop" else None
            if args.views == "mosaic":   # built here, on the device: cross-batch grouping needs the batch
                local = make_mosaic(crops, args.jitter, args.jitter_alpha)
                local = local._replace(images=local.images.contiguous(memory_format=fmt))
            with autocast:
                losses = model(x1, x2, local)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            learner.update_target(ema)
            # One small sync per step: every rank learns whether any rank saw a non-finite loss or
            # a stop signal, so all of them stop at the same step instead of hanging in a collective.
            status = torch.stack([losses["loss"].detach().float(),
                                  torch.tensor(float(bool(stop_signal)), device=device)])
            if world > 1:
                dist.all_reduce(status)
            loss_value, stop_now = status.tolist()
            if not math.isfinite(loss_value):
                fail(f"non-finite loss {loss_value} at step {step} (epoch {epoch}); the last checkpoint in "
                     f"{args.out} is intact. Lower --lr, or use --amp bf16/off instead of fp16")
            step += 1
            steps_since_log += 1
            if is_main and (step % args.log_every == 0 or step == last_step):
                elapsed = time.time() - tick   # figures are over the steps since the last log line
                record = {"epoch": epoch, "step": step, **{k: round(v.item(), 5) for k, v in losses.items()},
                          "lr": lr, "momentum": ema,
                          "images_per_s": round(steps_since_log * args.batch_size / elapsed, 1),
                          "data_wait": round(waited / elapsed, 3),
                          "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
                eta = (last_step - step) * elapsed / steps_since_log
                log(f"ep {epoch} step {step}/{last_step} loss {record['loss']:.4f} (global "
                    f"{record['loss_global']:.4f} local {record['loss_local']:.4f}) lr {lr:.4g} m {ema:.5f} "
                    f"{record['images_per_s']:.0f} img/s data-wait {100 * record['data_wait']:.0f}% "
                    f"eta {eta / 60:.1f} min")
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                tick, waited, steps_since_log = time.time(), 0.0, 0
            if stop_now:
                save(epoch)
                log(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                return 1
            if step % steps_per_epoch == 0 or step == last_step:
                break
            wait_start = time.time()
        if step % steps_per_epoch == 0 or step == last_step:
            save(step // steps_per_epoch)
            if args.knn_every and (step // steps_per_epoch) % args.knn_every == 0:
                log(f"k-NN (k=20) top-1 after epoch {step // steps_per_epoch}: "
                    f"{knn_report(learner.online.trunk, args, device, False)}")
    # Parameters must be bit-identical on every rank after DDP training: say so, or say they are not.
    checksum = torch.stack([p.detach().double().sum() for p in learner.online.parameters()]).sum().reshape(1)
    sums = models.gather_all(checksum.to(device)).tolist()
    final = {"final": True, "step": step, "rank_checksums": sums,
             "ranks_identical": len(set(sums)) == 1}
    if args.knn_final:
        final["knn_top1"] = knn_report(learner.online.trunk, args, device, baseline=True)
        log("k-NN top-1 (k=20) on the val split: " + ", ".join(f"{k} {v:.2f}%" for k, v in final["knn_top1"].items()))
    if is_main:
        log_file.write(json.dumps(final) + "\n")
        log_file.close()
        log(f"done: {step} steps; weights identical on all {world} ranks: {final['ranks_identical']}; "
            f"outputs in {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
