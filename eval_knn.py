"""k-NN evaluation of a frozen trunk, and the pieces that eval_linear.py and train.py share.

A test image's score for class c is the sum of exp(cos / T) over its k nearest training images of class c
(cosine similarity of pooled fp32 features; Wu et al. 2018, as in DINO). One extraction serves every k.

    python eval_knn.py --weights runs/mosrep/backbone.pth --data imagenet/train --val-data imagenet/val
    torchrun --nproc_per_node 8 eval_knn.py ...    # each process extracts a shard of the features
"""
import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from data import add_data_args, build_splits, eval_transform
from models import ARCHS, STEMS, gather_all, init_distributed, load_trunk, rank, world_size

KNN_TEMPERATURE = 0.07

def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags both evaluation scripts share (weights, network, data, loader, output); returns parser."""
    parser.add_argument("--weights", required=True, help="a backbone.pth, a train.py checkpoint.pth, or 'random'")
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    add_data_args(parser)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="also seeds the 'random' trunk, the same on every process")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser

def build_trunk(args, device) -> torch.nn.Module:
    """models.load_trunk(args.weights, args.arch, args.stem) in eval mode on device (channels_last on a GPU);
    'random' is seeded from args.seed, the same on every process. A bad --weights exits with one line."""
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        trunk = load_trunk(args.weights, args.arch, args.stem)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return trunk.to(device, memory_format=torch.channels_last if torch.device(device).type == "cuda"
                    else torch.contiguous_format).eval()

def shard_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """An unshuffled loader over this process's contiguous shard of dataset (rank r of W gets images
    [N*r/W, N*(r+1)/W)), so that gathering the shards in rank order restores the dataset's order."""
    n, world, r = len(dataset), world_size(), rank()
    shard = Subset(dataset, range(n * r // world, n * (r + 1) // world))
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available())

def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, ...] tensors of every process in rank order; n_r may differ between processes."""
    if world_size() == 1:
        return tensor
    sizes = gather_all(torch.tensor([len(tensor)], device=tensor.device)).tolist()
    # all_gather wants equal shapes: pad every part to the longest, trim after.
    padded = torch.cat([tensor, tensor.new_zeros(max(sizes) - len(tensor), *tensor.shape[1:])])
    return torch.cat([part[:n] for part, n in zip(gather_all(padded).split(max(sizes)), sizes)])

@torch.no_grad()
def extract_features(trunk, loader, device, name: str = "features"):
    """(features [N, C] fp32, labels [N] int64) on device: the pooled features of every image the loader
    yields, through the trunk in eval mode (BN statistics untouched), gathered over processes in rank order;
    not normalised (the probe wants them raw). Rank 0 prints its progress every 10 s."""
    trunk.eval()
    features, labels = [torch.zeros(0, trunk.out_channels, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    start = shown = time.time()
    for images, targets in loader:
        features.append(trunk.pooled(images.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(targets).to(device).long())
        if rank() == 0 and time.time() - shown > 10:
            shown = time.time()
            print(f"  {name}: {sum(map(len, labels))}/{len(loader.dataset)} images ({shown - start:.0f} s)", flush=True)
    return _gather(torch.cat(features)), _gather(torch.cat(labels))

def knn_scores(train_features, train_labels, test_features, ks, temperature: float, num_classes: int, chunk_size=256):
    """Yields, per chunk of n test rows, [class scores [n, num_classes] for each k in ks]: scores[i, c] = sum of
    exp(cos / T) over the k (clamped to N) nearest train rows of class c. Features are L2-normalised here; the
    max(ks) nearest are found once per chunk, and each k votes with the first k of them."""
    train, train_labels = F.normalize(train_features.float(), dim=1), train_labels.to(train_features.device)
    ks = [min(k, len(train)) for k in ks]
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        similarities, index = (chunk @ train.T).topk(max(ks), dim=1)   # of ties at the k-th place, topk's pick
        weights, labels = (similarities / temperature).exp(), train_labels[index]
        yield [torch.zeros(len(chunk), num_classes, device=chunk.device).scatter_add_(1, labels[:, :k], weights[:, :k])
               for k in ks]

def knn_predict(train_features, train_labels, test_features, k: int, temperature: float, num_classes: int,
                chunk_size: int = 256) -> torch.Tensor:
    """Class scores [M, num_classes] of test_features [M, C] for one k (see knn_scores)."""
    chunks = knn_scores(train_features, train_labels, test_features, [k], temperature, num_classes, chunk_size)
    return torch.cat([torch.zeros(0, num_classes, device=train_features.device)] + [scores[0] for scores in chunks])

def accuracy(scores: torch.Tensor, labels: torch.Tensor, percent: bool = True):
    """scores [N, K], labels [N] -> (top-1, top-5) in % (hit counts if not percent). Top-5 is top-K when
    K < 5; of tied scores the lower class ranks first; an empty set gives (0, 0)."""
    ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
    hits = ranked == labels[:, None].to(ranked.device)
    top1, top5 = int(hits[:, 0].sum()), int(hits.any(dim=1).sum())
    return (100.0 * top1 / max(len(labels), 1), 100.0 * top5 / max(len(labels), 1)) if percent else (top1, top5)

def evaluate_knn(train_features, train_labels, test_features, test_labels, ks, temperature: float,
                 num_classes: int, chunk_size: int = 256) -> dict:
    """{k: {"top1": %, "top5": %}} for every k in ks (a repeated k counts once), from one similarity pass."""
    ks = list(dict.fromkeys(ks))
    counts = {k: [0, 0] for k in ks}
    chunks = knn_scores(train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size)
    for scores, truth in zip(chunks, test_labels.split(chunk_size)):
        for k, k_scores in zip(ks, scores):
            counts[k] = [a + b for a, b in zip(counts[k], accuracy(k_scores, truth, percent=False))]
    n = max(len(test_labels), 1)
    return {k: {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n} for k, (top1, top5) in counts.items()}

def knn_eval(trunk, train_set, val_set, ks, temperature: float, num_classes: int, batch_size: int, workers: int,
             device, name: str = "k-NN") -> dict:
    """Extract both splits' features (each process a shard) and return evaluate_knn's results."""
    train_x, train_y = extract_features(trunk, shard_loader(train_set, batch_size, workers), device, f"{name} train")
    test_x, test_y = extract_features(trunk, shard_loader(val_set, batch_size, workers), device, f"{name} val")
    return evaluate_knn(train_x, train_y, test_x, test_y, ks, temperature, num_classes)

def main():
    parser = add_common_args(argparse.ArgumentParser(description="k-NN evaluation of a frozen trunk"))
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 20, 200])
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    args = parser.parse_args()
    if min(args.k) < 1 or args.temperature <= 0:
        parser.error("--k values and --temperature must be positive")
    device = init_distributed()
    try:
        trunk, start, transform = build_trunk(args, device), time.time(), eval_transform(args.image_size)
        train_set, val_set, classes = build_splits(args.dataset, args.data, args.val_data, transform, transform,
                                                   args.image_size, args.fake_size)
        results = knn_eval(trunk, train_set, val_set, args.k, args.temperature, classes, args.batch_size, args.workers, device)
        if rank() == 0:
            print(f"k-NN on {len(train_set)} train / {len(val_set)} test images, {classes} classes, T={args.temperature}, "
                  f"{time.time() - start:.0f}s\n{'k':>6} {'top-1':>7} {'top-5':>7}")
            for k, result in results.items():
                clamped = f"  (k clamped to {len(train_set)})" if k > len(train_set) else ""
                print(f"{k:>6} {result['top1']:7.2f} {result['top5']:7.2f}{clamped}")
            if args.out:
                with open(args.out, "w") as file:
                    json.dump({"args": vars(args), "num_train": len(train_set), "num_test": len(val_set),
                               "num_classes": classes, "knn": {str(k): r for k, r in results.items()}}, file, indent=2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
