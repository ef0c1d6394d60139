"""MosRep pre-training, one code path from a laptop CPU to many GPUs (`python train.py --demo`; `torchrun
--nproc_per_node=8 train.py --framework byol --data imagenet/train`). Each step: the loader brings two global
views and M small crops per image, cropped and flipped, as uint8; on the device they are colour-augmented
(augment.py) and the crops tiled into mosaics; the learner (models.MoCo or models.BYOL, with an optional image
mixture) returns its losses; one optimizer step, one EMA step of the target. Rank 0 writes checkpoint.pth, backbone.pth
and log.jsonl to --out. The defaults are the paper's ImageNet recipe of the chosen framework.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

import data
import models
import runtime
from augment import augment
from mosaic import default_jitter, make_mosaic

# Per-framework defaults, used where argparse gives None (lr per 256 images; BYOL's ema: 0.996 beyond 300 epochs).
FRAMEWORK_DEFAULTS = {
    "moco": dict(lr=0.03, wd=1e-4, optimizer="sgd", warmup_epochs=0, ema=0.999, epochs=200, dim=128),
    "byol": dict(lr=0.3, wd=1.5e-6, optimizer="lars", warmup_epochs=10, ema=0.99, epochs=300, dim=256)}
# The CPU demo on CIFAR-10 (README): 64 px views leave the ImageNet stem a 2x2 C5 map to align RoIs on, at a
# quarter of the cifar stem's cost; each framework's recipe learns within minutes, as the ImageNet ones can't.
DEMO = dict(framework="moco", arch="resnet18", stem="imagenet", image_size=64, crop_size=32, batch_size=128,
            epochs=1, workers=2, knn_final=True, log_every=10, out="runs/demo")
DEMO_FRAMEWORK_DEFAULTS = {"moco": dict(lr=0.4, queue_size=0, max_steps=180),   # in-batch negatives only
                           "byol": dict(optimizer="lars", lr=5.0, warmup_epochs=0, max_steps=180)}
# What a resumed run may change: none alters the steps it repeats (a longer --epochs stretches the schedule).
ADJUSTABLE_ON_RESUME = ("epochs max_steps workers amp data val_data out log_every knn_every knn_final knn_samples demo "
                        "resume dist_timeout compile")
# What each numeric flag must be, checked before any work starts.
RULES = [("lr temperature jitter_alpha image_size crop_size crops batch_size epochs log_every knn_samples "
          "fake_size dist_timeout", lambda v: v > 0, "positive"),
         ("wd jitter warmup_epochs queue_size workers max_steps knn_every", lambda v: v >= 0, "at least 0"),
         ("ema mix_global_p mix_region_p mix_weight", lambda v: 0 <= v <= 1, "within [0, 1]")]


def parse_args(argv=None, saved: dict = None):
    """The flags (argv, default sys.argv) as a Namespace, every flag left unset filled in: from the framework's
    recipe (BYOL's ema from --epochs; the jitter from the mosaic's size), or, given saved (a run's args, its
    checkpoint's), from that run, so that a resume keeps the defaults the run derived."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["moco", "byol"], default="byol")
    p.add_argument("--views", choices=["mosaic", "multicrop", "two"], default="mosaic", help="local views (README)")
    data.add_data_args(p)
    p.add_argument("--arch", choices=models.ARCHS, default="resnet50")
    p.add_argument("--stem", choices=models.STEMS, default="imagenet")
    p.add_argument("--crop-size", type=int, default=112, help="small crops (px)")
    p.add_argument("--crops", type=int, default=4, help="M small crops per image, a perfect square")
    p.add_argument("--jitter", type=float, help="max mosaic shift (px), 0 = off; default 48 px per 224 px of mosaic")
    p.add_argument("--jitter-alpha", type=float, default=0.5, help="Beta(alpha, alpha) of the shift")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split across processes")
    for key, kind in (("epochs", int), ("lr", float), ("wd", float), ("warmup_epochs", float), ("ema", float)):
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"moco {FRAMEWORK_DEFAULTS['moco'][key]}, "
                                                                     f"byol {FRAMEWORK_DEFAULTS['byol'][key]}")
    p.add_argument("--optimizer", choices=["sgd", "lars"], help="moco sgd, byol lars")
    p.add_argument("--temperature", type=float, default=0.2, help="moco")
    p.add_argument("--queue-size", type=int, default=65536, help="moco negatives (0 = in-batch only)")
    p.add_argument("--mix", choices=models.MoCo.mixes, default="off", help="image mixture (README)")
    p.add_argument("--mix-global-p", type=float, default=0.5, help="flatten: share of images mixed globally")
    p.add_argument("--mix-region-p", type=float, default=0.25, help="flatten: share of images mixed by regions")
    p.add_argument("--mix-weight", type=float, default=0.5, help="cutmix: lambda, the weight of L_mixed")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="CPU: off; bf16 from compute capability 8, else fp16")
    p.add_argument("--out", default="runs/mosrep", help="folder for checkpoint.pth, backbone.pth, log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue --out's run if it holds one, else start it")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-timeout", type=float, default=30.0, help="minutes a process waits for a peer, then stops")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders (docs/performance.md)")
    p.add_argument("--log-every", type=int, default=50, help="steps")
    p.add_argument("--knn-every", type=int, default=0, help="k-NN monitor every N epochs (0 = off)")
    p.add_argument("--knn-final", action="store_true", help="at the end, k-NN of the backbone and of a random init")
    p.add_argument("--knn-samples", type=int, default=10000, help="images per split for the k-NN monitor")
    p.add_argument("--demo", action="store_true", help=f"CPU demo on CIFAR-10: {DEMO} and {DEMO_FRAMEWORK_DEFAULTS}")
    args = p.parse_args(argv)
    if args.demo:   # flags given explicitly still win over the demo's values
        p.set_defaults(**DEMO)
        p.set_defaults(**DEMO_FRAMEWORK_DEFAULTS[p.parse_args(argv).framework])
        args = p.parse_args(argv)
        if args.data is None:   # the ImageFolder copy if there, else torchvision's download
            found = os.path.isdir(os.path.join(data.DEMO_FOLDER, "train"))
            args.dataset, args.data = ("imagefolder", f"{data.DEMO_FOLDER}/train") if found else ("cifar10", "data")
    mosaic_size = math.isqrt(max(0, args.crops)) * args.crop_size   # (check_args refuses a negative --crops)
    recipe = saved or dict(FRAMEWORK_DEFAULTS[args.framework], jitter=default_jitter(mosaic_size),
                           **({"ema": 0.996} if args.framework == "byol" and (args.epochs or 0) > 300 else {}))
    # a flag not given (or dim, which has none) takes the recipe's value, or the saved run's
    vars(args).update({key: value for key, value in recipe.items() if getattr(args, key, None) is None})
    return args


def check_args(args, world: int):
    """Fail with a one-line fix on any flag, or combination of flags, that cannot train."""
    for name, test, need in ((name, test, need) for names, test, need in RULES for name in names.split()):
        if not test(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be {need}")
    g, local_batch = math.isqrt(args.crops), args.batch_size // world
    if g * g != args.crops:
        fail(f"--crops {args.crops} is not a perfect square; use 4 (2x2) or 9 (3x3)")
    if args.batch_size % world or local_batch < 2:   # BatchNorm cannot train on one sample
        fail(f"--batch-size {args.batch_size} must split evenly over {world} process(es), 2 images or more each")
    if args.views == "mosaic" and local_batch < args.crops:
        fail(f"per-process batch {local_batch} is smaller than --crops {args.crops}: a mosaic needs crops of "
             f"{args.crops} different images; raise --batch-size or lower --crops")
    if args.views == "mosaic" and args.jitter >= args.crop_size:
        fail(f"--jitter {args.jitter} must be smaller than --crop-size {args.crop_size}: a crop could leave the mosaic")
    if args.views == "mosaic" and g * args.crop_size != args.image_size:
        fail(f"a {g}x{g} mosaic of {args.crop_size} px crops is {g * args.crop_size} px but --image-size is "
             f"{args.image_size}; set --crop-size {args.image_size // g}")
    if args.mix == "cutmix" and args.framework != "moco":
        fail("--mix cutmix is defined for MoCo only (mix-ssl, Approach 1); use --framework moco or --mix flatten")
    if args.mix == "flatten" and (local_batch < 5 or args.mix_global_p + args.mix_region_p > 1):
        fail(f"--mix flatten needs 5 images or more per process (has {local_batch}: raise --batch-size) and "
             f"--mix-global-p + --mix-region-p <= 1 (is {args.mix_global_p + args.mix_region_p})")
    if args.framework == "moco" and 0 < args.queue_size < args.batch_size:
        fail(f"--queue-size {args.queue_size} is smaller than the global batch {args.batch_size}")
    if args.amp == "fp16" and not torch.cuda.is_available():
        fail("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")


def fail(message: str):
    """Stop with a one-line error (exit code 1): bad input is the user's to fix, not a traceback."""
    raise SystemExit(f"error: {message}")


def main(argv=None) -> int:
    """Parse, check, train: 0 when done; when stopped by a signal (checkpoint saved), 1 for SIGTERM or Ctrl-C and
    75 for SIGUSR1 (EX_TEMPFAIL: "requeue me"). --resume with no checkpoint in --out starts the run, so that a
    scheduler can rerun one command forever. Every exit path, an error included, lets the loader workers end,
    closes the log, leaves the process group and releases --out."""
    args = parse_args(argv)
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    try:   # rank 0 holds --out from before the first look at its files until the process ends
        with runtime.folder_lock(args.out) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext() \
                as unlocked:
            if unlocked:
                print(f"note: cannot lock --out {args.out} ({unlocked}); running unlocked: start no other run on "
                      f"this folder", flush=True)
            path, checkpoint = os.path.join(args.out, "checkpoint.pth"), None
            if os.path.exists(path) and not args.resume:
                fail(f"{args.out}/checkpoint.pth exists; pass --resume to continue it, or choose another --out")
            if os.path.exists(path):   # every rank reads it: all need its state
                try:
                    checkpoint = models.read_checkpoint(path)
                    args = parse_args(argv, checkpoint["args"])   # the flags not given are the run's
                except (ValueError, TypeError, KeyError, AttributeError) as error:   # not a train.py checkpoint
                    fail(f"--resume: {error if isinstance(error, ValueError) else f'{path} holds no run'}; point "
                         f"--out at the run's folder, or move {path} away")
            with runtime.distributed(args.dist_timeout) as device, runtime.stop_requests() as stop_signal:
                try:
                    return train(args, device, stop_signal, checkpoint)
                except RuntimeError as error:
                    say_lost_peers(error, args)
    except (runtime.RunError, ValueError) as error:   # what the libraries raise on bad input (data.py's data)
        fail(str(error))


def train(args, device, stop_signal: list, checkpoint: dict = None) -> int:
    """Build, resume from checkpoint (or start), then loop (step, log, epoch end), then finish. Returns main's exit
    status."""
    world, rank, amp = runtime.world_size(), runtime.rank(), args.amp or runtime.default_amp(device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    views = data.MultiViewTransform(args.framework, args.image_size, args.crop_size, args.crops * (args.views != "two"))
    dataset = data.build_dataset(args.dataset, args.data, True, views, args.image_size, args.fake_size, unlabeled=True)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{len(dataset)} images make no full batch of {args.batch_size}; lower --batch-size")
    learner, model = build_learner(args, device, world)
    peak_lr = args.lr * args.batch_size / 256   # the linear scaling rule, applied here and only here
    optimizer, scaler = build_optimizer(learner, args, peak_lr), torch.amp.GradScaler(enabled=amp == "fp16")
    step, logged = resume(args, checkpoint, learner, optimizer, scaler, steps_per_epoch) if checkpoint else (0, 0)
    if len(set(runtime.gather_all(torch.tensor([step], device=device)).tolist())) > 1:   # not one --out for all
        fail(f"the ranks found different checkpoints in --out {args.out}: put it on a file system every node shares")
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    log(f"{args.framework} + {args.views} views | {args.arch} ({args.stem} stem) | {len(dataset)} images | {world} "
        f"process(es) on {device.type} | batch {args.batch_size} | {steps_per_epoch} steps/epoch | peak lr "
        f"{peak_lr:.4g} | amp {amp} | out {args.out} from step {step}")
    with data.train_loader(dataset, args.batch_size // world, args.workers, args.seed, world, rank) as loader, \
            (open_outputs(args, world, step, logged) if rank == 0 else contextlib.nullcontext()) as log_file:
        meter, stop = {"since": time.time(), "waited": 0.0, "steps": 0}, False
        while step < last_step and not stop:
            epoch = step // steps_per_epoch
            loader.sampler.set_epoch(epoch, skip_batches=step % steps_per_epoch)
            fetched = time.time()
            for batch in loader:   # the rest of this epoch
                meter["waited"] += time.time() - fetched
                lr, ema = schedules(step, total_steps, round(args.warmup_epochs * steps_per_epoch), peak_lr, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses, stop = train_step(batch, model, optimizer, scaler, autocast, args, device, step, stop_signal)
                learner.update_target(ema)
                step, meter["steps"] = step + 1, meter["steps"] + 1
                if log_file and (step % args.log_every == 0 or step == last_step):
                    log_step(log_file, losses, meter, epoch, step, last_step, lr, ema, args)
                if stop or step == last_step:
                    break
                fetched = time.time()
            if rank == 0:   # at the epoch end, the last step or a stop signal
                save(args, learner, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                     steps_per_epoch=steps_per_epoch, world_size=world, log_bytes=log_file.tell())
            if args.knn_every and step % steps_per_epoch == 0 and (step // steps_per_epoch) % args.knn_every == 0:
                log(f"k-NN top-1 (k=20), epoch {epoch + 1}: {knn_report(learner.backbone, args, device, False)}")
        if stop:   # SIGUSR1 is a scheduler's "time limit near": 75 is EX_TEMPFAIL (sysexits.h), "try again later"
            requeue = "SIGUSR1" in stop_signal   # this rank's own signal (rank 0's is the one said)
            log(f"{'requeue me: ' * requeue}stopped by signal at step {step}; checkpoint saved, continue with --resume")
            return 75 if requeue else 1
        finish(learner, args, device, step, log_file)
    return 0


def build_learner(args, device, world: int):
    """(learner, model): the learner on device, and what the step calls (its DDP wrapper when world > 1)."""
    mixing = {key: getattr(args, key) for key in ("mix", "mix_global_p", "mix_region_p", "mix_weight")}
    if args.framework == "moco":
        learner = models.MoCo(args.arch, args.stem, args.dim, args.queue_size, args.temperature, **mixing)
    else:
        learner = models.BYOL(args.arch, args.stem, args.dim, **mixing)
    cuda = device.type == "cuda"
    if args.framework == "byol" and world > 1 and cuda:   # no negatives: BN statistics of the global batch matter
        # (MoCo has shuffle-BN instead.) torch's SyncBatchNorm costs 3 host syncs a forward, 834 a ResNet-50 mosaic
        # step: the estimate and the way out are in docs/performance.md.
        learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    learner = learner.to(device, memory_format=torch.channels_last)   # faster convolutions on CPUs too
    if args.compile and any(isinstance(module, torch.nn.SyncBatchNorm) for module in learner.modules()):
        log("note: --compile does not apply to SyncBatchNorm under DDP (an open torch failure); running eager")
    elif args.compile:   # compile the forward methods: the state_dict keys stay those of the modules
        for part in (part for encoder in (learner.online, learner.target) for part in (encoder.trunk, encoder.head)):
            part.forward = torch.compile(part.forward, dynamic=False)   # a few fixed shapes: static graphs
    # No buffer broadcast each step: the 32 MB queue is the same on every rank, and BN running statistics do not
    # affect training (rank 0's are exported; knn_report broadcasts them first). torch 2.13 renamed the argument
    # (its forward_sync_buffers=False still broadcasts once at the start: the same values, all ranks seeded alike).
    accepted = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    return learner, DistributedDataParallel(learner, device_ids=[device.index] if cuda else None,
                                            **{no_sync: False}) if world > 1 else learner


def build_optimizer(learner, args, lr: float):
    """SGD (momentum 0.9, wd on every parameter) or LARS (BN weights and biases excluded) over the online side."""
    params = [p for p in learner.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.wd, foreach=True)
    return LARS([{"params": [p for p in params if p.ndim > 1]},
                 {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}], lr, args.wd)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per tensor by trust * |w| / |g + wd * w| (You et al., 2017; BYOL's
    optimizer); a tensor with |w| = 0 or |g + wd * w| = 0 keeps the unscaled step. Groups with lars=False (BN
    parameters, biases) get plain SGD without weight decay. Each group steps in a few torch._foreach_* ops: no Python
    loop over tensors, no host sync."""
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates))
                ratio = torch.where((w_norm > 0) & (u_norm > 0), group["trust"] * w_norm / u_norm, 1.0)   # [tensors]
                torch._foreach_mul_(updates, ratio.unbind())
            for p in (p for p in params if "momentum" not in self.state[p]):   # at the first step only
                self.state[p]["momentum"] = torch.zeros_like(p)
            momenta = [self.state[p]["momentum"] for p in params]
            torch._foreach_mul_(momenta, group["momentum"])
            torch._foreach_add_(momenta, updates)
            torch._foreach_add_(params, momenta, alpha=-group["lr"])


def schedules(step: int, total: int, warmup: int, peak_lr: float, args):
    """(lr, ema) at a step: lr warms up linearly, then follows a cosine to 0; ema is constant (MoCo) or follows a
    cosine from args.ema to 1 (BYOL)."""
    cosine = lambda t: 0.5 * (1 + math.cos(math.pi * t))   # 1 at t = 0, 0 at t = 1
    lr = peak_lr * ((step + 1) / warmup if step < warmup else cosine((step - warmup) / max(1, total - warmup)))
    return lr, args.ema if args.framework == "moco" else 1 - (1 - args.ema) * cosine(step / total)


def resume(args, checkpoint: dict, learner, optimizer, scaler, steps_per_epoch: int):
    """Load --out's checkpoint (read by main) into the learner, optimizer and scaler; return its step and the size
    log.jsonl had at its save (unknown, inf, in checkpoints from before log_bytes). The checkpoint is emptied
    (main holds it too: the run keeps no second copy). Refused, naming the flags, when this command would not
    repeat the run; a note lists deliberate changes (a longer --epochs...) and another world size."""
    saved, step, logged = checkpoint["args"], checkpoint["step"], checkpoint.get("log_bytes", math.inf)
    changed = [key for key, value in vars(args).items() if saved.get(key, value) != value and key != "resume"]
    flags = lambda keys, source: " ".join(f"--{k.replace('_', '-')} {source.get(k)}" for k in keys)
    fixed = [key for key in changed if key not in ADJUSTABLE_ON_RESUME.split()]
    if fixed:
        fail(f"--resume: {args.out} holds a {flags(fixed, saved)} run but this one is {flags(fixed, vars(args))}; "
             f"resuming would not repeat the run: pass the same flags, or choose another --out")
    if checkpoint["steps_per_epoch"] != steps_per_epoch:
        fail(f"--resume: the data now makes {steps_per_epoch} steps per epoch, the run made "
             f"{checkpoint['steps_per_epoch']}; point --data at the run's images")
    if changed:
        log(f"note: resuming with {flags(changed, vars(args))} (was {flags(changed, saved)})")
    if checkpoint.get("world_size", runtime.world_size()) != runtime.world_size():   # the global batch stays
        log(f"note: resuming on {runtime.world_size()} process(es), not {checkpoint['world_size']}: new BN groups")
    for part, state in ((learner, checkpoint["learner"]), (optimizer, checkpoint["optimizer"]),
                        (scaler, checkpoint["scaler"] or scaler.state_dict())):   # a bf16/off run saved no scaler
        part.load_state_dict(state)
    checkpoint.clear()
    return step, logged


def train_step(batch, model, optimizer, scaler, autocast, args, device, step: int, stop_signal: list):
    """One optimisation step on a loader batch ((x1, x2, crops), labels: the labels are never used in
    pre-training); returns (losses, stop). Its one host sync is a small all-reduce: every rank learns whether any
    saw a non-finite loss or a stop signal, so all stop at the same step."""
    # Every random choice of the step (colour augmentation, mosaic grouping, jitter, shuffle-BN order) is a function of
    # (seed, step, rank), so a resumed run repeats an uninterrupted one.
    torch.manual_seed(args.seed * 1_000_003 + step * 1009 + runtime.rank())
    x1, x2, crops = (t.to(device, non_blocking=True) for t in batch[0])   # uint8; crops [B, M, 3, s, s]
    # The loader only cropped and flipped: colour, blur, solarize and normalisation run here, batched (augment.py).
    x1, x2 = augment(torch.cat([x1, x2]), args.framework, ("x1", "x2")).chunk(2)   # one call for both views
    if crops.shape[1]:
        crops = augment(crops.flatten(0, 1), args.framework, "crops").unflatten(0, crops.shape[:2])
    # The mosaic is built here, on the device: grouping crops across images needs the batch.
    local = make_mosaic(crops, args.jitter, args.jitter_alpha) if args.views == "mosaic" else \
        {"two": None, "multicrop": crops}[args.views]
    with autocast:
        losses = model(x1, x2, local)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    status = torch.stack([losses["loss"].detach().float(), torch.tensor(float(bool(stop_signal)), device=device)])
    if runtime.world_size() > 1:
        dist.all_reduce(status)
    loss_value, stop = status.tolist()
    if not math.isfinite(loss_value):
        fail(f"non-finite loss {loss_value} at step {step + 1}; {checkpoint_status(args.out)}. Lower --lr, or use "
             f"--amp bf16/off")
    return losses, bool(stop)


def open_outputs(args, world: int, step: int, logged: int):
    """Rank 0's start in --out, at step (0: a fresh start). Writes args.json: every flag, the torch and torchvision
    versions, the world size, the git commit of this code (-dirty when changed; null outside a git checkout or
    without git: the shell runs it, so a missing git is an empty answer) and step. Returns log.jsonl open for
    appending, first cut to its first logged bytes, its size at the checkpoint's save: a resumed run does not log
    twice the steps a crashed run logged after its last save, nor its final record; a fresh start (logged 0) drops
    the log of a run that saved no checkpoint."""
    commit = subprocess.run("git describe --always --dirty --abbrev=40 --exclude=*", shell=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True).stdout.strip()
    with open(os.path.join(args.out, "args.json"), "w") as file:
        json.dump(dict(args=vars(args), torch=torch.__version__, torchvision=torchvision.__version__,
                       world_size=world, git_commit=commit or None, start_step=step), file, indent=1)
    file = open(os.path.join(args.out, "log.jsonl"), "a")   # at its end: tell() is its size
    file.seek(file.truncate(min(logged, file.tell())))   # never longer: a lost log stays empty
    return file


def log_step(log_file, losses: dict, meter: dict, epoch: int, step: int, last_step: int, lr: float, ema: float, args):
    """Append one record to log.jsonl and print it, with throughput, data wait and ETA since the last one."""
    elapsed = time.time() - meter["since"]
    memory = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    record = {"epoch": epoch, "step": step, **{k: round(v.item(), 5) for k, v in losses.items()}, "lr": lr, "ema": ema,
              "images_per_s": round(meter["steps"] * args.batch_size / elapsed, 1),
              "data_wait": round(meter["waited"] / elapsed, 3), "max_memory_gb": memory}
    print(json.dumps(record), file=log_file, flush=True)
    print(f"ep {epoch} step {step}/{last_step} loss {record['loss']:.4f} (global {record['loss_global']:.4f} local "
          f"{record['loss_local']:.4f} mix {record['loss_mix']:.4f}) target-std {record['target_std']:.3f} lr {lr:.4g} "
          f"ema {ema:.5f} {record['images_per_s']:.0f} img/s data-wait {100 * record['data_wait']:.0f}% "
          f"eta {(last_step - step) * elapsed / meter['steps'] / 60:.1f} min", flush=True)
    meter.update(since=time.time(), waited=0.0, steps=0)


def save(args, learner, **training_state):
    """models.save_checkpoint into --out; a failed write (a full disk) stops the run in one line, the previous
    checkpoint intact."""
    try:
        models.save_checkpoint(args.out, learner, vars(args), **training_state)
    except (OSError, RuntimeError) as error:   # a full disk: an OSError, or torch.save's RuntimeError
        free = shutil.disk_usage(args.out).free >> 20
        fail(f"could not write the checkpoint to {args.out} ({type(error).__name__}, {free} MB free there); "
             f"{checkpoint_status(args.out)}: free space there and rerun")


def finish(learner, args, device, step: int, log_file):
    """Check that every rank holds the same weights, run the final k-NN, write the final record."""
    checksum = torch.stack([p.detach().double().sum() for p in learner.parameters()]).sum().reshape(1)
    sums = runtime.gather_all(checksum.to(device)).tolist()
    final = {"final": True, "step": step, "rank_checksums": sums, "ranks_identical": len(set(sums)) == 1}
    if args.knn_final:
        final["knn_top1"] = knn_report(learner.backbone, args, device, baseline=True)
        log("k-NN top-1 (k=20) on the val split: " + ", ".join(f"{k} {v:.2f}%" for k, v in final["knn_top1"].items()))
    if log_file:
        log_file.write(json.dumps(final) + "\n")
    log(f"done: {step} steps; weights identical on all {len(sums)} ranks: {final['ranks_identical']}; in {args.out}")


def knn_report(trunk, args, device, baseline: bool) -> dict:
    """k-NN top-1 % (k = 20) on the val split of the trunk, and of a random-init trunk when baseline. At most
    --knn-samples images per split (a fixed random subset) keep it to minutes."""
    from eval_knn import KNN_TEMPERATURE, knn_eval
    if runtime.world_size() > 1:   # without SyncBN each rank's BN statistics saw only its own shard
        for buffer in trunk.buffers():
            dist.broadcast(buffer, src=0)
    transform = data.eval_transform(args.image_size)
    try:
        *splits, num_classes = data.build_splits(args.dataset, args.data, args.val_data, transform, transform,
                                                 args.image_size, args.fake_size)
    except ValueError as error:
        log(f"k-NN skipped: {error}")
        return {}
    splits = [torch.utils.data.Subset(split, torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
                                      [:args.knn_samples].tolist()) for split in splits]
    nets = {"trained": trunk}
    if baseline:
        torch.manual_seed(args.seed)   # the same random-init baseline on every rank
        nets["random-init"] = models.Trunk(args.arch, args.stem).to(device)
    results = {name: knn_eval(net, *splits, [20], KNN_TEMPERATURE, num_classes, 256, args.workers, device,
                              f"k-NN {name}")[20]["top1"] for name, net in nets.items()}
    trunk.train()
    return results


def checkpoint_status(out: str) -> str:
    """What a failed run leaves behind in its --out, for its error message."""
    path = os.path.join(out, "checkpoint.pth")
    return f"the last checkpoint ({path}) is intact" if os.path.exists(path) else "no checkpoint was written yet"


def log(message: str):
    """Print on rank 0 only."""
    if runtime.rank() == 0:
        print(message, flush=True)


def say_lost_peers(error: RuntimeError, args):
    """A failed collective (a peer process exited, the network dropped, or a peer stalled beyond --dist-timeout)
    ends this rank with one line: what, which rank, what is kept, how to go on. Any other error is raised again."""
    if runtime.world_size() == 1 or not (isinstance(error, getattr(dist, "DistError", ())) or "gloo" in str(error)
                                         or "NCCL" in str(error)):   # gloo: a plain RuntimeError naming itself
        raise error
    reason = str(error).split("] ", 1)[-1].split(". ")[0][:120]   # drops gloo's source location
    # Printed now, while SIGTERM only requests a stop: once the handlers are restored torchrun's SIGTERM ends us.
    print(f"error: rank {runtime.rank()} lost its peers: a peer process exited, the network dropped or a peer "
          f"stalled over --dist-timeout {args.dist_timeout:g} min ({reason}); {checkpoint_status(args.out)}; rerun "
          f"the same command with --resume", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
