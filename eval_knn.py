"""k-NN evaluation of a frozen trunk (`torchrun --nproc_per_node 8 eval_knn.py --weights backbone.pth --data
imagenet/train`), and the pieces that eval_linear.py and train.py share. A test image's score for class c is the
sum of exp(cos / T) over its k nearest training images of class c (cosine similarity of pooled fp32 features;
Wu et al. 2018, as in DINO). One feature extraction, each process a shard, serves every k.
"""
import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data import add_data_args, build_splits, eval_transform
from models import ARCHS, STEMS, load_trunk
from runtime import distributed, gather_all, rank, world_size

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


@contextlib.contextmanager
def one_line_errors():
    """Bad input found by the libraries (their ValueError: a missing split, a wrong --weights) ends the script with
    one line, `error: ...`, instead of a traceback."""
    try:
        yield
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def write_json(args, **fields):
    """Write {"args": vars(args), **fields} as indented JSON to --out, when it is given."""
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"args": vars(args), **fields}, file, indent=2)


def build_trunk(args, device) -> torch.nn.Module:
    """models.load_trunk in eval mode on device ('random' seeded from args.seed); a bad --weights exits in one line."""
    torch.manual_seed(getattr(args, "seed", 0))
    with one_line_errors():
        trunk = load_trunk(args.weights, args.arch, args.stem)
    return trunk.to(device, memory_format=torch.channels_last if torch.device(device).type == "cuda"
                    else torch.contiguous_format).eval()


def eval_splits(args, random_crop: bool = False):
    """data.build_splits of the common flags: (train, val, number of classes), val resized and centre-cropped, train
    too, or with random_crop RandomResizedCrop + flip (eval_linear --augment, eval_finetune)."""
    return build_splits(args.dataset, args.data, args.val_data, eval_transform(args.image_size, random_crop),
                        eval_transform(args.image_size), args.image_size, args.fake_size)


def shard_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """An unshuffled loader over this process's shard of dataset: block r of W consecutive blocks of ceil(N / W)
    images (the last ones shorter, or empty), so that the blocks in rank order are the dataset in its order."""
    rows = -(-len(dataset) // world_size())
    return DataLoader(dataset, batch_size, sampler=range(rank() * rows, min(len(dataset), (rank() + 1) * rows)),
                      num_workers=workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def extract_features(trunk, loader, device, name: str = "features"):
    """(features [N, C] fp32, labels [N] int64) on device: pooled, not normalised, through the trunk in eval mode
    (BN statistics untouched), of every image of shard_loader's shards, gathered in dataset order; each process
    holds them once (1.28M x 2048 fp32: 10.5 GB for ImageNet), beside its own block. Rank 0 prints progress every
    10 s."""
    trunk.eval()
    rows = -(-len(loader.dataset) // world_size())   # this process's block, zero-padded to the others' length
    features = torch.zeros(rows, trunk.out_channels, device=device)
    labels, done = torch.zeros(rows, dtype=torch.long, device=device), 0
    start = shown = time.time()
    for images, batch_labels in loader:
        features[done:done + len(images)] = trunk.pooled(images.to(device, non_blocking=True))
        labels[done:done + len(images)] = torch.as_tensor(batch_labels)
        done += len(images)
        if rank() == 0 and time.time() - shown > 10:
            shown = time.time()
            print(f"  {name}: {done * world_size()}/{len(loader.dataset)} images ({shown - start:.0f} s)", flush=True)
    return gather_all(features)[:len(loader.dataset)], gather_all(labels)[:len(loader.dataset)]   # padding dropped


def knn_scores(train_features, train_labels, test_features, ks, temperature: float, num_classes: int,
               chunk_size: int = 256) -> list:
    """train_features [N, C], train_labels [N], test_features [M, C] -> per k, scores [M, classes]: sum of exp(cos / T)
    over the k (<= N) nearest train rows of each class. fp32, normalised here; one pass serves every k. The train
    rows' inverse norms scale each chunk's dot products: no normalised copy of train_features (10.5 GB for ImageNet)."""
    train, labels = train_features.float(), train_labels.to(train_features.device)
    inverse_norms = 1 / train.norm(dim=1).clamp_min(1e-12)                   # [N], as F.normalize divides
    ks, scores = [min(k, len(train)) for k in ks], [[torch.zeros(0, num_classes, device=train.device)] for _ in ks]
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        # cosine similarities [chunk, N]; of ties at the k-th place, topk's pick
        similarities, index = (chunk @ train.T).mul_(inverse_norms).topk(max(ks), dim=1)
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
    with distributed() as device, one_line_errors():
        trunk, start = build_trunk(args, device), time.time()
        train_set, val_set, classes = eval_splits(args)
        results = knn_eval(trunk, train_set, val_set, args.k, args.temperature, classes, batch, args.workers, device)
        if rank() == 0:
            print(f"k-NN on {len(train_set)} train / {len(val_set)} test images, {classes} classes, "
                  f"T={args.temperature}, {time.time() - start:.0f}s\n{'k':>6} {'top-1':>7} {'top-5':>7}")
            for k, result in results.items():
                clamped = f"  (k clamped to {len(train_set)})" if k > len(train_set) else ""
                print(f"{k:>6} {result['top1']:7.2f} {result['top5']:7.2f}{clamped}")
            write_json(args, num_train=len(train_set), num_test=len(val_set), num_classes=classes,
                       knn={str(k): r for k, r in results.items()})


if __name__ == "__main__":
    main()
