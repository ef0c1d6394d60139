"""Linear probe of a frozen trunk (`torchrun --nproc_per_node 8 eval_linear.py --weights backbone.pth --data
imagenet/train --augment`): a non-affine BatchNorm + linear layer on pooled features, SGD, cosine schedule, no
AMP; one head per --lr, trained at once, the best picked on the val split it is reported on (as in the papers).
Cached centre-crop features by default; --augment is the paper's protocol (RandomResizedCrop + flip through the
trunk every epoch); --label-list keeps the train images a file names (SimCLR's 1percent.txt / 10percent.txt: the
papers' 1 % / 10 % rows), --label-fraction a class-balanced random share where no list exists.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from data import build_splits, eval_transform
from eval_knn import accuracy, add_common_args, build_trunk, extract_features, one_line_errors, shard_loader
from runtime import distributed, rank, world_size


def balanced_subset(labels, fraction: float, seed: int) -> torch.Tensor:
    """labels [N] -> sorted LongTensor of kept indices: round(fraction * n_c) (half up) random images of
    every class c, drawn from seed. ValueError when fraction is not in (0, 1] or a class keeps none."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        count = math.floor(fraction * len(members) + 0.5)
        if count == 0:
            raise ValueError(f"--label-fraction {fraction} keeps no image of class {c} ({len(members)} images); "
                             f"it needs at least {0.5 / len(members):.3g}")
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(kept).sort().values


def listed_subset(samples, classes, list_path: str) -> list:
    """Indices of the (path, class index) samples whose file name list_path lists, one per line (SimCLR's
    n04235860_14959.JPEG...). Names of classes not in `classes` (the synset before "_") are ignored, so that
    ImageNet-100 takes ImageNet's lists. ValueError naming the count and an example when listed files of the
    dataset's classes are missing, or when the file cannot be read."""
    try:
        with open(list_path) as file:
            listed = {line.strip() for line in file if line.strip()}
    except OSError as error:
        raise ValueError(f"cannot read --label-list {list_path} ({error.strerror})") from None
    synsets = set(classes)
    listed = {name for name in listed if name.split("_")[0] in synsets}
    if not listed:
        raise ValueError(f"--label-list {list_path} names no file of the {len(synsets)} classes under --data")
    kept = [i for i, (path, _) in enumerate(samples) if os.path.basename(path) in listed]
    missing = sorted(listed - {os.path.basename(samples[i][0]) for i in kept})
    if missing:
        raise ValueError(f"{len(missing)} of the {len(listed)} files that {list_path} lists are not under --data "
                         f"(e.g. {missing[0]}); point --data at the train split")
    return kept


def label_subset(args, train_set):
    """train_set restricted to the files of --label-list, or to a class-balanced --label-fraction; SystemExit."""
    try:
        if args.label_list:
            if not hasattr(train_set, "samples"):
                raise ValueError("--label-list needs an ImageFolder --data (--dataset imagefolder or imagenet100)")
            return Subset(train_set, listed_subset(train_set.samples, train_set.classes, args.label_list))
        # .targets / .labels spare decoding every image; FakeData has neither
        labels = getattr(train_set, "targets", getattr(train_set, "labels", None))
        labels = [train_set[i][1] for i in range(len(train_set))] if labels is None else labels
        return Subset(train_set, balanced_subset(labels, args.label_fraction, args.seed).tolist())
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


class ProbeHeads(nn.Module):
    """One non-affine BatchNorm1d shared by num_heads linear layers: features [B, C] -> logits [H, B, K].
    The BN has no parameters, so sharing it leaves the heads independent."""
    def __init__(self, num_features: int, num_classes: int, num_heads: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False)
        self.linears = nn.ModuleList(nn.Linear(num_features, num_classes) for _ in range(num_heads))
        for linear in self.linears:
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normalised = self.norm(features)   # once: BN statistics are updated once per batch
        return torch.stack([linear(normalised) for linear in self.linears])


def frozen_features(trunk, loader, device):
    """Yield (pooled features [B, C] fp32, labels [B]) on device per loader batch, through the frozen trunk."""
    trunk.eval()
    for images, labels in loader:
        with torch.no_grad():   # not around the yield: the caller's head training needs gradients
            features = trunk.pooled(images.to(device, non_blocking=True)).float()
        yield features, labels.to(device)


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Yield shuffled minibatches (features [b, C], labels [b]) of cached features [N, C], labels [N]."""
    for index in torch.randperm(len(labels), generator=generator).to(features.device).split(batch_size):
        yield features[index], labels[index]


def train_probe(make_batches, steps_per_epoch: int, val_features, val_labels, num_features: int, num_classes: int,
                lrs, epochs: int, wd: float = 0.0, ddp: bool = False) -> list:
    """Train a ProbeHeads head per lr for `epochs` epochs on the (features [B, C], labels [B]) of make_batches(epoch),
    epochs counted from 1, evaluating all on val_features [N, C], val_labels [N] after each; ddp averages gradients
    over processes. Returns per lr {lr, best_epoch, best_top1, best_top5, last_top1, last_top5}."""
    device = val_features.device
    heads = ProbeHeads(num_features, num_classes, len(lrs)).to(device)
    model = nn.parallel.DistributedDataParallel(heads, [device] if device.type == "cuda" else None) if ddp else heads
    optimizer = torch.optim.SGD([{"params": linear.parameters(), "lr": lr} for linear, lr in zip(heads.linears, lrs)],
                                lr=lrs[0], momentum=0.9, weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps_per_epoch, 1))
    results = [{"lr": lr, "best_epoch": 0, "best_top1": -1.0, "best_top5": 0.0} for lr in lrs]
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, steps = 0.0, 0
        for features, labels in make_batches(epoch):
            if len(labels) < 2:   # BatchNorm cannot train on a single sample
                continue
            # summed over heads, so each head's gradient is its own loss's, whatever the number of heads
            loss = sum(F.cross_entropy(head_logits, labels) for head_logits in model(features))   # [H, B, K]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1
        heads.eval()
        with torch.no_grad():
            logits = torch.cat([heads(chunk) for chunk in val_features.split(4096)], dim=1)   # [H, N, K]
        for result, head_logits in zip(results, logits):
            top1, top5 = accuracy(head_logits, val_labels)
            if top1 > result["best_top1"]:
                result.update(best_epoch=epoch, best_top1=top1, best_top5=top5)
            result.update(last_top1=top1, last_top5=top5)
        if rank() == 0 and (epoch == epochs or epoch % max(1, epochs // 20) == 0):
            print(f"epoch {epoch}/{epochs}  loss {float(loss_sum) / max(steps, 1) / len(lrs):.3f}  val top-1 per lr: "
                + " ".join(f"{r['lr']:g}:{r['last_top1']:.1f}" for r in results))
    return results


def probe_batches(args, trunk, train_set, device):
    """(make_batches(epoch), steps per epoch): features extracted once and shuffled each epoch (every process
    holds them all), or with --augment fresh views through the frozen trunk, each process its own shard."""
    if not args.augment:
        features, labels = extract_features(trunk, shard_loader(train_set, args.batch_size, args.workers), device)
        generator, steps = torch.Generator().manual_seed(args.seed), math.ceil(len(labels) / args.batch_size)
        return (lambda epoch: cached_batches(features, labels, args.batch_size, generator)), steps
    sampler = (DistributedSampler(train_set, seed=args.seed) if world_size() > 1
               else RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    set_epoch = getattr(sampler, "set_epoch", lambda epoch: None)
    return (lambda epoch: set_epoch(epoch) or frozen_features(trunk, loader, device)), len(loader)


def main():
    parser = add_common_args(argparse.ArgumentParser(description="linear probe of a frozen trunk"))
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--epochs", type=int, help="default 100 (cached features) or 90 (--augment)")
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true", help="RandomResizedCrop + flip through the trunk every epoch")
    parser.add_argument("--label-fraction", type=float, default=1.0, help="class-balanced subset of the train labels")
    parser.add_argument("--label-list", help="keep only the train files it names, one per line (SimCLR's 1 / 10 %%)")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (90 if args.augment else 100)
    if args.epochs < 1 or min(args.lr) <= 0:
        parser.error("--epochs and --lr must be positive")
    if args.label_list and args.label_fraction != 1:
        parser.error("--label-list and --label-fraction each choose the labelled images: pass one")
    with distributed() as device, one_line_errors():
        trunk, start = build_trunk(args, device), time.time()
        torch.manual_seed(args.seed)   # the heads' initialisation
        train_set, val_set, num_classes = build_splits(args.dataset, args.data, args.val_data, eval_transform(
            args.image_size, random_crop=args.augment), eval_transform(args.image_size), args.image_size, args.fake_size)
        if args.label_list or args.label_fraction != 1:
            train_set = label_subset(args, train_set)
        # the trunk is frozen: the val features are the same every epoch, in both modes
        val_x, val_y = extract_features(trunk, shard_loader(val_set, args.batch_size, args.workers), device, "val")
        make_batches, steps = probe_batches(args, trunk, train_set, device)
        if args.augment or rank() == 0:   # cached mode: rank 0 holds every feature and trains alone
            results = train_probe(make_batches, steps, val_x, val_y, trunk.out_channels, num_classes, args.lr,
                                  args.epochs, args.wd, ddp=args.augment and world_size() > 1)
        if rank() == 0:
            best = max(results, key=lambda r: r["best_top1"])
            print(f"linear probe, {len(train_set)} train / {len(val_y)} val images, {num_classes} classes, "
                  f"{'augmented' if args.augment else 'cached'} mode, {args.epochs} epochs, {time.time() - start:.0f}s"
                  "\n      lr best ep best top-1 best top-5 last top-1 last top-5")
            for r in results:
                print(f"{r['lr']:>8g} {r['best_epoch']:>7} {r['best_top1']:10.2f} {r['best_top5']:10.2f} "
                      f"{r['last_top1']:10.2f} {r['last_top5']:10.2f}{'  <- best' if r is best else ''}")
            if args.out:
                with open(args.out, "w") as file:
                    json.dump({"args": vars(args), "epochs": args.epochs, "num_train": len(train_set), "num_val":
                               len(val_y), "num_classes": num_classes, "heads": results, "best": best}, file, indent=2)


if __name__ == "__main__":
    main()
