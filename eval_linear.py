"""Linear probe of a frozen trunk (`torchrun --nproc_per_node 8 eval_linear.py --weights backbone.pth --data
imagenet/train --augment`): a non-affine BatchNorm + linear layer on pooled features, SGD, cosine schedule, no
AMP; one head per --lr, trained at once, the best lr and epoch picked on the val split it is reported on (as MoCo
and DINO do), or with --holdout on a class-balanced part of train, then refitted and scored once. Cached centre-crop
features by default; --augment is the paper's protocol (RandomResizedCrop + flip through the trunk every epoch);
--label-list keeps the train images a file names (SimCLR's 1percent.txt / 10percent.txt: the papers' 1 % / 10 %
rows), --label-fraction a class-balanced random share where no list exists. --batch-size is the global batch: each
process extracts its share of each batch, and every process trains the heads on the whole of it, so that the result
does not depend on the number of processes.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from data import EpochSampler, SeededViews, build_dataset, eval_transform
from eval_knn import (accuracy, add_common_args, build_trunk, eval_splits, extract_features, gather_shards,
                      one_line_errors, process_batch, shard_loader, write_json)
from runtime import distributed, rank, world_size


def balanced_subset(labels, fraction: float, seed: int, flag: str = "--label-fraction") -> torch.Tensor:
    """labels [N] -> sorted LongTensor of kept indices: round(fraction * n_c) (half up) random images of
    every class c, drawn from seed. ValueError naming flag when fraction is not in (0, 1] or a class keeps none."""
    if not 0 < fraction <= 1:
        raise ValueError(f"{flag} must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        count = math.floor(fraction * len(members) + 0.5)
        if count == 0:
            raise ValueError(f"{flag} {fraction} keeps no image of class {c} ({len(members)} images); "
                             f"it needs at least {0.5 / len(members):.3g}")
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(kept).sort().values


def listed_subset(samples, classes, list_path: str) -> list:
    """Indices of the (path, class index) samples whose file name list_path lists, one per line (SimCLR's
    n04235860_14959.JPEG...). Names of classes not in `classes` (the synset before "_") are ignored, so that
    ImageNet-100 takes ImageNet's lists. ValueError naming the count and an example when listed files of the
    dataset's classes are missing, or when the file cannot be read."""
    synsets = set(classes)
    try:
        with open(list_path) as file:   # blank lines fall out too: "" names no synset
            listed = {name for name in map(str.strip, file) if name.split("_")[0] in synsets}
    except OSError as error:
        raise ValueError(f"cannot read --label-list {list_path} ({error.strerror})") from None
    if not listed:
        raise ValueError(f"--label-list {list_path} names no file of the {len(synsets)} classes under --data")
    kept = [i for i, (path, _) in enumerate(samples) if os.path.basename(path) in listed]
    missing = sorted(listed - {os.path.basename(samples[i][0]) for i in kept})
    if missing:
        raise ValueError(f"{len(missing)} of the {len(listed)} files that {list_path} lists are not under --data "
                         f"(e.g. {missing[0]}); point --data at the train split")
    return kept


def labels_of(dataset) -> torch.Tensor:
    """The labels [N] of a dataset or a Subset: .targets / .labels spare decoding every image (FakeData has neither)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[list(dataset.indices)]
    labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    return torch.as_tensor([dataset[i][1] for i in range(len(dataset))] if labels is None else labels).long()


def add_label_args(parser: argparse.ArgumentParser):
    """--label-fraction and --label-list, which exclude each other (eval_linear.py and eval_finetune.py)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--label-fraction", type=float, default=1.0, help="class-balanced subset of the train labels")
    group.add_argument("--label-list", help="keep only the train files it names, one per line (SimCLR's 1 / 10 %%)")


def label_subset(args, train_set):
    """train_set restricted to the files of --label-list, or to a class-balanced --label-fraction (the whole of it
    when neither is given); ValueError with the fix (the scripts' one_line_errors turn it into one line)."""
    if args.label_list:
        if not hasattr(train_set, "samples"):
            raise ValueError("--label-list needs an ImageFolder --data (--dataset imagefolder or imagenet100)")
        return Subset(train_set, listed_subset(train_set.samples, train_set.classes, args.label_list))
    if args.label_fraction == 1:
        return train_set
    return Subset(train_set, balanced_subset(labels_of(train_set), args.label_fraction, args.seed).tolist())


def epoch_loader(dataset, batch: int, args, device) -> DataLoader:
    """This process's loader of reproducible views (data.EpochSampler + SeededViews), batch images a batch, full
    batches only (SystemExit in one line when there is none); set_epoch(epoch) on its sampler. Process r's batch k
    holds images r, r + W... of the global batch k, which is the same whatever the number of processes W."""
    sampler = EpochSampler(dataset, batch, args.seed, world_size(), rank())
    if sampler.batches_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} train images make no full batch of --batch-size {args.batch_size}; "
                         "lower it")
    return DataLoader(SeededViews(dataset, args.seed), batch, sampler=sampler, num_workers=args.workers,
                      pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)


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
    """Yield (pooled features [B, C] fp32, labels [B]) on device per global batch, through the frozen trunk: each
    process's batch, gathered in gather_shards' order (of one process: its batch)."""
    trunk.eval()
    for images, labels in loader:
        with torch.no_grad():   # not around the yield: the caller's head training needs gradients
            features = trunk.pooled(images.to(device, non_blocking=True)).float()
        yield gather_shards(features), gather_shards(labels.to(device))


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                   index=None):
    """Yield shuffled minibatches (features [b, C], labels [b]) of cached features [N, C], labels [N]: of their rows
    index [n] (default: all)."""
    index = torch.arange(len(labels)) if index is None else index
    for rows in index[torch.randperm(len(index), generator=generator)].to(features.device).split(batch_size):
        yield features[rows], labels[rows]


def train_probe(make_batches, steps_per_epoch: int, val_features, val_labels, num_features: int, num_classes: int,
                lrs, epochs: int, wd: float = 0.0, final_only: bool = False, name: str = "val") -> list:
    """Train a ProbeHeads head per lr for `epochs` epochs on the (features [B, C], labels [B]) of make_batches(epoch),
    epochs counted from 1, evaluating all on val_features [N, C], val_labels [N] after each (final_only: after the
    last only). Every process trains the same heads on the same global batches. Returns per lr {lr, best_epoch,
    best_top1, best_top5, last_top1, last_top5, last_loss: the last epoch's mean training loss}."""
    heads = ProbeHeads(num_features, num_classes, len(lrs)).to(val_features.device)
    optimizer = torch.optim.SGD([{"params": linear.parameters(), "lr": lr} for linear, lr in zip(heads.linears, lrs)],
                                lr=lrs[0], momentum=0.9, weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps_per_epoch, 1))
    results = [{"lr": lr, "best_epoch": 0, "best_top1": -1.0, "best_top5": 0.0} for lr in lrs]
    for epoch in range(1, epochs + 1):
        heads.train()
        loss_sum, steps = torch.zeros(len(lrs), device=val_features.device), 0
        for features, labels in make_batches(epoch):
            if len(labels) < 2:   # BatchNorm cannot train on a single sample
                continue
            losses = torch.stack([F.cross_entropy(head_logits, labels) for head_logits in heads(features)])   # [H]
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()   # summed: each head's gradient is its own loss's, whatever the number of heads
            optimizer.step()
            scheduler.step()
            loss_sum, steps = loss_sum + losses.detach(), steps + 1
        if final_only and epoch < epochs:
            continue
        heads.eval()
        with torch.no_grad():
            logits = torch.cat([heads(chunk) for chunk in val_features.split(4096)], dim=1)   # [H, N, K]
        mean_losses = (loss_sum / max(steps, 1)).tolist()
        for result, head_logits, head_loss in zip(results, logits, mean_losses):
            top1, top5 = accuracy(head_logits, val_labels)
            if top1 > result["best_top1"]:
                result.update(best_epoch=epoch, best_top1=top1, best_top5=top5)
            result.update(last_top1=top1, last_top5=top5, last_loss=head_loss)
        if rank() == 0 and (epoch == epochs or epoch % max(1, epochs // 20) == 0):
            print(f"epoch {epoch}/{epochs}  loss {sum(mean_losses) / len(lrs):.3f}  {name} top-1 per "
                  "lr: " + " ".join(f"{r['lr']:g}:{r['last_top1']:.1f}" for r in results), flush=True)
    return results


def probe_source(args, trunk, train_set, device):
    """A function index [n] -> (make_batches(epoch), steps per epoch) over those train images, in global batches of
    --batch-size: their cached features (all extracted once, each process a shard) shuffled each epoch, or with
    --augment fresh views through the frozen trunk (each process its share of each batch)."""
    batch = process_batch(args.batch_size)
    if args.augment:
        def source(index):
            loader = epoch_loader(Subset(train_set, index.tolist()), batch, args, device)
            make_batches = lambda epoch: loader.sampler.set_epoch(epoch) or frozen_features(trunk, loader, device)
            return make_batches, len(loader)
        return source
    features, labels = extract_features(trunk, shard_loader(train_set, batch, args.workers), device, "train")
    generator = torch.Generator().manual_seed(args.seed)
    return lambda index: ((lambda epoch: cached_batches(features, labels, args.batch_size, generator, index)),
                          math.ceil(len(index) / args.batch_size))


def probe(args, trunk, train_set, val, num_classes: int, device):
    """(heads, the best head, val top-1, val top-5, selection): the sweep over --lr on val = (features, labels), the
    best on it; or with --holdout the sweep on the rest of train scored on a class-balanced --holdout share of it,
    then the chosen lr and epochs refitted on all train images and val scored once."""
    source, everything = probe_source(args, trunk, train_set, device), torch.arange(len(train_set))

    def fit(index, scored, lrs, epochs, **how):
        torch.manual_seed(args.seed)   # the heads' initialisation: the same on every process, whatever ran before
        return train_probe(*source(index), *scored, trunk.out_channels, num_classes, lrs, epochs, args.wd, **how)
    if not args.holdout:
        heads = fit(everything, val, args.lr, args.epochs)
        best = max(heads, key=lambda r: r["best_top1"])
        return heads, best, best["best_top1"], best["best_top5"], "the best lr and epoch on the val split it reports"
    held = balanced_subset(labels_of(train_set), args.holdout, args.seed, "--holdout")   # main: one_line_errors
    plain = label_subset(args, build_dataset(args.dataset, args.data, True, eval_transform(args.image_size),
                                             args.image_size, args.fake_size)) if args.augment else train_set
    held_out = extract_features(trunk, shard_loader(Subset(plain, held.tolist()), process_batch(args.batch_size),
                                                    args.workers), device, "held-out")   # centre crops
    heads = fit(everything[~torch.isin(everything, held)], held_out, args.lr, args.epochs, name="held-out")
    best = max(heads, key=lambda r: r["best_top1"])
    final, = fit(everything, val, [best["lr"]], best["best_epoch"], final_only=True)
    return heads, best, final["last_top1"], final["last_top5"], (
        f"lr {best['lr']:g} and {best['best_epoch']} epochs chosen on a held-out {100 * args.holdout:g} % of train "
        f"({len(held)} images), refitted on all {len(train_set)}, val scored once")


def main():
    parser = add_common_args(argparse.ArgumentParser(description="linear probe of a frozen trunk"))
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                        help="one head per lr, for the global --batch-size (no scaling)")
    parser.add_argument("--epochs", type=int, help="default 100 (cached features) or 90 (--augment)")
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true", help="RandomResizedCrop + flip through the trunk every epoch")
    parser.add_argument("--holdout", type=float, default=0.0, help="choose lr and epochs on this class-balanced share "
                        "of the train images, refit on all, score val once (default 0: choose on val)")
    add_label_args(parser)
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (90 if args.augment else 100)
    if args.epochs < 1 or min(args.lr) <= 0 or not 0 <= args.holdout < 1:
        parser.error("--epochs and --lr must be positive, --holdout in [0, 1)")
    batch = process_batch(args.batch_size)
    with distributed() as device, one_line_errors():
        trunk, start = build_trunk(args, device), time.time()
        train_set, val_set, num_classes = eval_splits(args, random_crop=args.augment)
        train_set = label_subset(args, train_set)
        # the trunk is frozen: the val features are the same every epoch, in both modes
        val = extract_features(trunk, shard_loader(val_set, batch, args.workers), device, "val")
        heads, best, top1, top5, selection = probe(args, trunk, train_set, val, num_classes, device)
        if rank() == 0:
            print(f"linear probe, {len(train_set)} train / {len(val[1])} val images, {num_classes} classes, "
                  f"{'augmented' if args.augment else 'cached'} mode, {args.epochs} epochs, {time.time() - start:.0f}s"
                  f"\n{'held-out' if args.holdout else 'val'} split:"
                  "\n      lr best ep best top-1 best top-5 last top-1 last top-5")
            for r in heads:
                print(f"{r['lr']:>8g} {r['best_epoch']:>7} {r['best_top1']:10.2f} {r['best_top5']:10.2f} "
                      f"{r['last_top1']:10.2f} {r['last_top5']:10.2f}{'  <- best' if r is best else ''}")
            print(f"val top-1 {top1:.2f} %, top-5 {top5:.2f} %; selection: {selection}")
            write_json(args, epochs=args.epochs, num_train=len(train_set), num_val=len(val[1]), num_classes=num_classes,
                       heads=heads, best=best, val={"top1": top1, "top5": top5}, selection=selection)


if __name__ == "__main__":
    main()
