"""k-NN evaluation of a frozen trunk (`torchrun --nproc_per_node 8 eval_knn.py --weights backbone.pth --data
imagenet/train`), and the pieces that eval_linear.py and train.py share. A test image's score for class c is the
sum of exp(cos / T) over its k nearest training images of class c (cosine similarity of pooled fp32 features;
Wu et al. 2018, as in DINO). One feature extraction, each process a shard, serves every k.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from data import add_data_args, build_splits, eval_transform
from models import ARCHS, STEMS, distributed, gather_all, load_trunk, rank, world_size

KNN_TEMPERATURE = 0.07


def add_common_args(parser: argparse.ArgumentParser, data_args=add_data_args) -> argparse.ArgumentParser:
    """Add the flags the evaluation scripts share (weights, network, data_args(parser), loader, output)."""
    parser.add_argument("--weights", required=True, help="a backbone.pth, a train.py checkpoint.pth, or 'random'")
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    data_args(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch, split across processes")
    parser.add_argument("--seed", type=int, default=0, help="also seeds the 'random' trunk, the same on every process")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser


def build_trunk(args, device) -> torch.nn.Module:
    """models.load_trunk in eval mode on device ('random' seeded from args.seed); a bad --weights exits in one line."""
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        trunk = load_trunk(args.weights, args.arch, args.stem)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return trunk.to(device, memory_format=torch.channels_last if torch.device(device).type == "cuda"
                    else torch.contiguous_format).eval()


def shard_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """An unshuffled loader of this process's batch_size: images r, r + W, r + 2W... of dataset, rank r of W."""
    sampler = DistributedSampler(dataset, world_size(), rank(), shuffle=False) if world_size() > 1 else None
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def extract_features(trunk, loader, device, name: str = "features"):
    """(features [N, C] fp32, labels [N] int64) on device: pooled, not normalised, through the trunk in eval mode
    (BN statistics untouched), of every image, gathered over processes. Rank 0 prints progress every 10 s."""
    trunk.eval()
    features = [torch.zeros(0, trunk.out_channels, device=device)]
    labels = [torch.zeros(0, dtype=torch.long, device=device)]
    start = shown = time.time()
    for images, batch_labels in loader:
        features.append(trunk.pooled(images.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(batch_labels).to(device).long())
        if rank() == 0 and time.time() - shown > 10:
            shown = time.time()
            done = sum(map(len, labels)) * world_size()
            print(f"  {name}: {done}/{len(loader.dataset)} images ({shown - start:.0f} s)", flush=True)
    count = len(loader.dataset)   # the shards' last images are padded with repeats: dropped
    return gather_shards(torch.cat(features))[:count], gather_shards(torch.cat(labels))[:count]


def knn_scores(train_features, train_labels, test_features, ks, temperature: float, num_classes: int,
               chunk_size: int = 256) -> list:
    """train_features [N, C], train_labels [N], test_features [M, C] -> per k, scores [M, classes]: sum of exp(cos / T)
    over the k (<= N) nearest train rows of each class. fp32, normalised here; one pass serves every k."""
    train, labels = F.normalize(train_features.float(), dim=1), train_labels.to(train_features.device)
    ks, scores = [min(k, len(train)) for k in ks], [[torch.zeros(0, num_classes, device=train.device)] for _ in ks]
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        similarities, index = (chunk @ train.T).topk(max(ks), dim=1)   # of ties at the k-th place, topk's pick
        weights, votes = (similarities / temperature).exp(), labels[index]
        for k, per_k in zip(ks, scores):
            per_k.append(chunk.new_zeros(len(chunk), num_classes).scatter_add_(1, votes[:, :k], weights[:, :k]))
    return [torch.cat(per_k) for per_k in scores]


def accuracy(scores: torch.Tensor, labels: torch.Tensor):
    """scores [N, K], labels [N] -> (top-1 %, top-5 %). Top-5 is top-K when K < 5; of tied scores the lower class
    ranks first; an empty set gives (0, 0)."""
    hits = scores.sort(dim=1, descending=True, stable=True).indices[:, :5] == labels[:, None].to(scores.device)
    return 100.0 * int(hits[:, 0].sum()) / max(len(labels), 1), 100.0 * int(hits.any(dim=1).sum()) / max(len(labels), 1)


def evaluate_knn(train_features, train_labels, test_features, test_labels, ks, temperature: float,
                 num_classes: int, chunk_size: int = 256) -> dict:
    """{k: {"top1": %, "top5": %}} for every k in ks (a repeated k counts once); shapes as knn_scores."""
    ks = list(dict.fromkeys(ks))
    scores = knn_scores(train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size)
    return {k: dict(zip(("top1", "top5"), accuracy(per_k, test_labels))) for k, per_k in zip(ks, scores)}


def knn_eval(trunk, train_set, val_set, ks, temperature: float, num_classes: int, batch_size: int, workers: int,
             device, name: str = "k-NN") -> dict:
    """Extract both splits' features (each process a shard, batch_size images a batch) and return evaluate_knn's
    results."""
    train_x, train_y = extract_features(trunk, shard_loader(train_set, batch_size, workers), device, f"{name} train")
    test_x, test_y = extract_features(trunk, shard_loader(val_set, batch_size, workers), device, f"{name} val")
    return evaluate_knn(train_x, train_y, test_x, test_y, ks, temperature, num_classes)


def process_batch(batch_size: int) -> int:
    """--batch-size (the global batch, over torchrun's WORLD_SIZE processes) -> this process's share; SystemExit in
    one line when it does not split evenly."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if batch_size < 1 or batch_size % world:
        raise SystemExit(f"error: --batch-size {batch_size} is the global batch: it must split evenly over the {world} "
                         f"process(es); pass a positive multiple of {world}")
    return batch_size // world


def gather_shards(tensor: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each process, process r of W holding rows r, r + W, r + 2W... of a whole -> that whole [n*W, ...]
    in its own order (what a DistributedSampler's shards and EpochSampler's batches hold)."""
    return gather_all(tensor).unflatten(0, (world_size(), -1)).transpose(0, 1).flatten(0, 1)


def main():
    parser = add_common_args(argparse.ArgumentParser(description="k-NN evaluation of a frozen trunk"))
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 20, 200])
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    args = parser.parse_args()
    if min(args.k) < 1 or args.temperature <= 0:
        parser.error("--k values and --temperature must be positive")
    batch = process_batch(args.batch_size)
    with distributed() as device:
        trunk, start, transform = build_trunk(args, device), time.time(), eval_transform(args.image_size)
        train_set, val_set, classes = build_splits(args.dataset, args.data, args.val_data, transform, transform,
                                                   args.image_size, args.fake_size)
        results = knn_eval(trunk, train_set, val_set, args.k, args.temperature, classes, batch, args.workers, device)
        if rank() == 0:
            print(f"k-NN on {len(train_set)} train / {len(val_set)} test images, {classes} classes, "
                  f"T={args.temperature}, {time.time() - start:.0f}s\n{'k':>6} {'top-1':>7} {'top-5':>7}")
            for k, result in results.items():
                clamped = f"  (k clamped to {len(train_set)})" if k > len(train_set) else ""
                print(f"{k:>6} {result['top1']:7.2f} {result['top5']:7.2f}{clamped}")
            if args.out:
                with open(args.out, "w") as file:
                    json.dump({"args": vars(args), "num_train": len(train_set), "num_test": len(val_set),
                               "num_classes": classes, "knn": {str(k): r for k, r in results.items()}}, file, indent=2)


if __name__ == "__main__":
    main()
