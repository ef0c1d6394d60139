"""Linear-probing transfer of a frozen trunk to eight datasets (`python eval_transfer.py --weights backbone.pth --root
data/transfer`), the protocol of Kornblith et al. 2019 as SimCLR and BYOL run it: pooled fp32 features of resized,
centre-cropped images (no augmentation); an l2-regularised multinomial logistic regression fitted to convergence
(truncated Newton, warm-started) for each of 45 log-spaced lambdas in [1e-6, 1e5]; the lambda that scores best on a
val split is refitted on train + val and scored once on test. docs/transfer.md: the commands, where each dataset
goes, and the choices the papers leave open (objective scaling, held-out share, tolerance, standardisation).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from augment import MEAN, STD
from data import build_dataset
from eval_knn import add_common_args, build_trunk, extract_features, process_batch, shard_loader, write_json
from eval_linear import balanced_subset
from runtime import distributed, download_lock, rank

TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10", "food101": "Food101",
               "flowers102": "Flowers102", "dtd": "DTD", "pets": "OxfordIIITPet", "cars": "StanfordCars"}
OFFICIAL_VAL = ("flowers102", "dtd")    # the others hold VAL_SHARE of train out
PER_CLASS = ("pets", "flowers102")      # scored by mean per-class accuracy, the others by top-1 (the papers' choice)
PAPER = {"MosRep MoCo (paper)": (91.5, 74.5, 97.1, 74.3, 84.5, 71.3, 84.5, 44.8),
         "MosRep BYOL (paper)": (93.7, 78.2, 97.8, 77.3, 90.9, 72.5, 91.2, 63.0)}   # in TORCHVISION's order
LAMBDAS = torch.logspace(-6, 5, 45, dtype=torch.float64).tolist()
VAL_SHARE, TOLERANCE, MAX_ITER = 0.2, 1e-5, 1000
CARS = ("StanfordCars' download is broken upstream: put devkit/ (cars_meta.mat, cars_train_annos.mat), cars_train/, "
        "cars_test/ and cars_test_annos_withlabels.mat in {root}/stanford_cars")


def transfer_transform(image_size: int) -> v2.Compose:
    """PIL image -> normalised float [3, S, S]: shorter side resized to S (bicubic), centre crop; no augmentation."""
    return v2.Compose([v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(image_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def build_split(name: str, root: str, split: str, transform):
    """torchvision's dataset `name` (a TORCHVISION key), split "train", "val" (flowers102, dtd) or "test",
    downloaded into root when missing (cars excepted)."""
    kind, train = getattr(torchvision.datasets, TORCHVISION[name]), split == "train"
    how = {"cifar10": {"train": train}, "cifar100": {"train": train}, "dtd": {"split": split, "partition": 1},
           "pets": {"split": "trainval" if train else split, "target_types": "category"}}.get(name, {"split": split})
    with download_lock(root):   # one process of the machine at a time: the first downloads, the others wait
        return kind(root, transform=transform, download=name != "cars", **how)


def load_splits(name: str, args, transform) -> dict:
    """{"train", "val", "test"} datasets of `name` (val None: held out of train later); one-line SystemExit."""
    if name == "imagefolder":
        if not args.test_data:
            raise SystemExit("error: imagefolder: pass --data (train), --test-data and, if it has one, --val-data")
        paths = {"train": args.data, "val": args.val_data, "test": args.test_data}
        splits = {split: build_dataset("imagefolder", path, True, transform) if path else None
                  for split, path in paths.items()}
        if any(split is not None and split.classes != splits["train"].classes for split in splits.values()):
            raise SystemExit("error: imagefolder: --data, --val-data and --test-data need the same class folders")
        return splits
    try:
        return {split: build_split(name, args.root, split, transform) if split != "val" or name in OFFICIAL_VAL
                else None for split in ("train", "val", "test")}
    except Exception as error:   # no internet, a partial download, a missing scipy (flowers102, cars)
        fix = (CARS.format(root=args.root) if name == "cars" else
               f"without internet, put torchvision's copy in {args.root} by hand")
        raise SystemExit(f"error: {name} could not be loaded ({type(error).__name__}: "
                         f"{(str(error).splitlines() or [''])[0]}); {fix}") from None


def held_out(labels: torch.Tensor, seed: int, name: str = "the dataset"):
    """labels [N] -> (train indices, val indices): VAL_SHARE of every class (rounded half up), drawn from seed;
    ValueError naming the dataset `name` when a class is too small to hold any out."""
    val, everything = balanced_subset(labels.cpu(), VAL_SHARE, seed, f"{name}'s val share"), torch.arange(len(labels))
    return everything[~torch.isin(everything, val)], val


_PROBLEM = {}   # of the last features and labels fit_logistic saw (a sweep fits the same ones 45 times): the fp32
#                features, the eigenbasis of their Gram matrix, the tolerance's reference; that fit's (Newton steps,
#                Hessian products)
logits = lambda x, theta: (x @ theta[:-1].to(x)).to(theta) + theta[-1]   # theta = [W; b], [D + 1, K]; x W in x's
#                precision, the bias added in theta's: with fp32 x and fp64 theta, a bias that dwarfs x W (strong
#                lambda) leaves x W's differences between classes, which fp32 would round away next to it
adjoint = lambda x, R: torch.cat([(R.to(x).T @ x).T.to(R), R.sum(0, keepdim=True)])   # R [N, K] -> [x, 1]^T R,
#                [D + 1, K]; likewise x^T R in x's precision, the bias's sum in R's: exact sums keep the bias where
#                it belongs at strong lambda, where its slightest error moves predictions more than x W does
penalised = lambda theta: torch.cat([theta[:-1], torch.zeros_like(theta[-1:])])   # W's rows, the bias as 0


def _newton_direction(problem, P, lam: float, gradient, target: float, budget: int):
    """Preconditioned conjugate gradient on H d = -gradient, d [D + 1, K] and H the Hessian at the softmax
    probabilities P [N, K], in fp32 (a direction needs no more: the gradient decides convergence), on
    problem's (_PROBLEM's) x32 and basis. The preconditioner c X^T X / N + lam (bias: c), c the mean curvature of
    one logit, applied through the eigenbasis, undoes the features' correlations (and off their span, where N < D,
    it is H itself). Stops when every entry of the model's gradient H d + gradient is at most target, or after
    budget products. Returns (d in fp64, products)."""
    x32, (U, S), P = problem["x32"], problem["basis"], P.float()
    c = max(float((1 - P.square().sum(1)).mean()) / max(P.shape[1] - 1, 1), 1e-12)
    precondition = lambda r: torch.cat([U @ (U.T @ r[:-1] / (c * S + lam)[:, None]), r[-1:] / c])
    residual = -gradient.float()
    direction, search = torch.zeros_like(residual), precondition(residual)
    rz = float((residual * search).sum())
    for step in range(1, budget + 1):
        Z = logits(x32, search)   # H search: two products with the features
        H_search = adjoint(x32, P * (Z - (P * Z).sum(1, keepdim=True))) / len(P) + lam * penalised(search)
        alpha = rz / float((search * H_search).sum())
        direction, residual = direction + alpha * search, residual - alpha * H_search
        if float(residual.abs().max()) <= target:
            break
        z = precondition(residual)
        rz, previous = float((residual * z).sum()), rz
        search = z + rz / previous * search
    return direction.double(), step


def fit_logistic(features, labels, num_classes: int, lam: float, init=None, tolerance: float = TOLERANCE,
                 max_iter: int = MAX_ITER):
    """Minimise mean_i CE(x_i W + b, y_i) + lam / 2 ||W||^2 (the bias unpenalised) over W [D, K] and b [K] by
    truncated Newton (Lin, Weng and Keerthi 2008): each step solves the Newton system by preconditioned conjugate
    gradient (_newton_direction), then a line search on the objective. From init = (W, b), else from W = 0 and
    b = log class counts (the optimum at W = 0). features [N, D] float64, labels [N]. Every pass over the features
    runs in fp32 (half the bytes of fp64, and fast where fp64 is slow: most GPUs), every sum over N x K logits in
    fp64. It stops when every entry of the gradient is at most 0.9 x tolerance times the largest one at W = 0,
    b = 0 (the fp32 gradient is good to well under a tenth of the tolerance: measured 5e-7 of that largest entry at
    50,000 x 2,048, where fp64 finds every fit of the sweep converged), or after max_iter Hessian products. Returns
    (W, b, that relative gradient); _PROBLEM["steps"] = (Newton steps, products)."""
    targets = F.one_hot(labels, num_classes).to(features)
    if _PROBLEM.get("features") is not features or _PROBLEM["labels"] is not labels:   # once per sweep
        x32 = features.float()   # the preconditioner's eigenbasis; the tolerance's reference: the gradient at 0
        eigenvalues, eigenvectors = torch.linalg.eigh(x32.T @ x32 / len(x32))
        reference = float(adjoint(features, 1 / num_classes - targets).abs().max()) / len(features)
        _PROBLEM.update(features=features, labels=labels, x32=x32, basis=(eigenvectors, eigenvalues.clamp_min(0)),
                        reference=max(reference, 1e-300))
    reference, x32 = _PROBLEM["reference"], _PROBLEM["x32"]
    if init is None:
        counts = torch.bincount(labels, minlength=num_classes).to(features)
        init = features.new_zeros(features.shape[1], num_classes), counts.clamp_min(1).log()
    theta, newton, products = torch.cat([init[0], init[1][None]]), 0, 0
    Z = logits(x32, theta)   # [N, K] fp64 from an fp32 pass
    while True:
        P = Z.softmax(1)
        gradient = adjoint(x32, P - targets) / len(Z) + lam * penalised(theta)
        relative = float(gradient.abs().max()) / reference
        if relative <= 0.9 * tolerance or products >= max_iter:   # 0.9: room for the fp32 gradient's rounding
            break
        target = max(0.5 * tolerance, 0.01 * relative) * reference
        d, steps = _newton_direction(_PROBLEM, P, lam, gradient, target, max_iter - products)
        Zd, newton, products = logits(x32, d), newton + 1, products + steps

        def line(t):   # the objective at theta + t d and its slope along d
            at, Zt = penalised(theta + t * d), Z + t * Zd
            return (float(F.cross_entropy(Zt, labels) + lam / 2 * at.square().sum()),
                    float(((Zt.softmax(1) - targets) * Zd).sum() / len(Z) + lam * (at * d).sum()))

        t, (start, slope) = 1.0, line(0.0)
        while (point := line(t))[0] > start + 1e-4 * t * slope and point[1] > 0 and t > 1e-10:   # Armijo or downhill
            t /= 2
        theta, Z = theta + t * d, Z + t * Zd
    _PROBLEM["steps"] = (newton, products)
    return theta[:-1], theta[-1], relative


def extrapolate(path, lam: float):
    """The start [W, b] of the fit at lam from path = [[lambda, val, [W, b]], ...], the sweep's fits so far (at
    least one): the polynomial through the last three (with one fit: that fit; with two: the line through them),
    over lambda, log lambda or 1 / lambda, whichever predicted the last fit best from the three before it (log
    lambda until there are four). The optimum moves smoothly with lambda, and in a known way at both ends: at strong
    lambda W ~ g / lambda (a series in 1 / lambda), near lambda = 0 (where the unregularised optimum is finite) it
    tends to that optimum linearly in lambda; in between log lambda fits it best. A start closer to the optimum
    needs fewer conjugate-gradient products to reach the tolerance (on the bench's 50,000 x 2,048 x 10 sweep, 231
    against 487 from the previous fit alone); it never changes where the fit ends."""
    def through(points, at, scale):   # Lagrange's quadratic through points' [W, b] over scale(lambda), at lambda at
        weights = [math.prod((scale(at) - scale(other[0])) / (scale(point[0]) - scale(other[0]))
                             for other in points if other is not point) for point in points]
        return [sum(weight * point[2][part] for weight, point in zip(weights, points)) for part in (0, 1)]

    miss = lambda scale: float((through(path[-4:-1], path[-1][0], scale)[0] - path[-1][2][0]).abs().max())
    scale = min([lambda value: value, math.log, lambda value: 1 / value], key=miss) if len(path) > 3 else math.log
    return through(path[-3:], lam, scale)


def score(logits, labels, per_class: bool = False) -> float:
    """Top-1 % of logits [N, K] for labels [N]; with per_class, the mean over the classes present of their top-1 %."""
    hits = (logits.argmax(dim=1) == labels).double()
    if not per_class:
        return 100.0 * float(hits.mean())
    counts = torch.bincount(labels)
    return 100.0 * float((torch.bincount(labels, weights=hits, minlength=len(counts)) / counts)[counts > 0].mean())


def standardiser(features):
    """A function x -> (x - mean) / std with the per-column statistics of features [N, D] (constant columns -> 0)."""
    mean = features.mean(dim=0)   # the std by hand: torch.std over dim 0 is several times slower on CPUs
    std = ((features - mean).square().sum(0) / max(len(features) - 1, 1)).sqrt().clamp_min(1e-12)
    return lambda x: (x - mean).div_(std)


def transfer_fit(train, val, test, per_class: bool = False) -> dict:
    """train, val, test: (features [N, D], labels [N]) -> {test, best_lambda, val_curve [[lambda, val], ...] in
    ascending lambda, relative_gradient (the largest of the 46 fits), fits [[lambda, Newton steps, Hessian products,
    seconds, relative gradient], ...] (the sweep in ascending lambda, then the refit)}: the sweep on train, scored on
    val, then the best lambda (of ties the largest) refitted on train + val and scored on test. Features
    standardised with the statistics of the split fitted, in float64. One progress line per fit."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = ((x.double(), y) for x, y in (train, val, test))
    num_classes = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    normalise = standardiser(train_x)
    x, vx = normalise(train_x), normalise(val_x)
    curve, fits, began = [], [], time.time()

    def fit(features, labels, lam, init, scored, split):   # and print a line: an hour's sweep must not look hung
        start, (W, b, relative) = time.time(), fit_logistic(features, labels, num_classes, lam, init)
        fits.append([lam, *_PROBLEM["steps"], time.time() - start, relative])
        value, left = score(scored[0] @ W + b, scored[1], per_class), len(LAMBDAS) + 1 - len(fits)
        if rank() == 0:
            print(f"  lambda {lam:.3g}: {split} {value:.2f} %, {fits[-1][1]} Newton steps ({fits[-1][2]} Hessian "
                  f"products), {fits[-1][3]:.1f} s, relative gradient {relative:.1e}, ETA "
                  f"{left * (time.time() - began) / len(fits):.0f} s", flush=True)
        return [W, b], value

    for lam in reversed(LAMBDAS):   # from the most regularised: each fit starts where the path of solutions leads
        params, value = fit(x, train_y, lam, extrapolate(curve, lam) if curve else None, (vx, val_y),
                            f"val ({len(fits) + 1} of {len(LAMBDAS)})")
        curve.append([lam, value, params])
    best_lambda, _, best_params = max(curve, key=lambda point: point[1])   # of ties the first met: the largest lambda
    all_x, all_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    normalise = standardiser(all_x)
    _, test = fit(normalise(all_x), all_y, best_lambda, best_params, (normalise(test_x), test_y), "refit, test")
    _PROBLEM.clear()   # the features' copies and eigenbasis: not kept past the dataset
    return {"test": test, "best_lambda": best_lambda, "val_curve": [point[:2] for point in curve[::-1]],
            "relative_gradient": max(entry[-1] for entry in fits), "fits": fits[-2::-1] + fits[-1:]}


def run_dataset(name: str, args, trunk, transform, batch: int, device):
    """Extract the splits' features (each process a shard, batch images a batch; every process then holds them all),
    fit and, on rank 0, print a summary line: the JSON entry. Every process fits, the same sweep on the same features:
    a rank that skipped it would wait for rank 0 in the next dataset's collectives, and a long fit (fp64 on a GPU
    with little of it) would pass the process group's timeout."""
    splits, start = load_splits(name, args, transform), time.time()
    features = {split: extract_features(trunk, shard_loader(dataset, batch, args.workers), device,
                                        f"{name} {split}") for split, dataset in splits.items() if dataset is not None}
    extracted = time.time()
    if "val" not in features:   # CPU indices select on any device; a class too small: one line in main
        x, y = features["train"]
        features["train"], features["val"] = ((x[index], y[index]) for index in held_out(y, args.seed, name))
    result = transfer_fit(features["train"], features["val"], features["test"], name in PER_CLASS)
    result = {"metric": "mean_per_class" if name in PER_CLASS else "top1", **result,
              **{f"num_{split}": len(features[split][1]) for split in ("train", "val", "test")},
              "feature_seconds": extracted - start, "seconds": time.time() - start}
    if rank() == 0:
        print(f"{name}: test {result['metric']} {result['test']:.2f} %, lambda {result['best_lambda']:.3g}, "
              f"{result['num_train']} / {result['num_val']} / {result['num_test']} train / val / test, features "
              f"{result['feature_seconds']:.0f} s, fit {result['seconds'] - result['feature_seconds']:.0f} s",
              flush=True)
    if rank() == 0 and result["relative_gradient"] > TOLERANCE:
        print(f"  note: a fit stopped after {MAX_ITER} Hessian products at relative gradient "
              f"{result['relative_gradient']:.1e}", flush=True)
    return result


def markdown_table(results: dict, label: str) -> str:
    """The paper's MosRep rows and this run's (label) over the eight datasets, and imagefolder if it ran."""
    names = list(TORCHVISION) + [name for name in results if name not in TORCHVISION]
    rows = [[row, *(f"{value:.1f}" for value in values), *["-"] * (len(names) - len(values))]
            for row, values in PAPER.items()]
    rows.append([label, *(f"{results[name]['test']:.1f}" if name in results else "-" for name in names)])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def add_transfer_data_args(parser: argparse.ArgumentParser):
    """eval_transfer.py's data and loader flags, in place of data.add_data_args."""
    parser.add_argument("--datasets", nargs="+", default=list(TORCHVISION), choices=[*TORCHVISION, "imagefolder"])
    parser.add_argument("--root", default=os.path.join("data", "transfer"), help="torchvision's datasets (downloaded)")
    parser.add_argument("--data", help="imagefolder: the train split, one folder per class")
    parser.add_argument("--val-data", help=f"imagefolder: its val split (default: {VAL_SHARE * 100:.0f} %% of --data "
                        "held out)")
    parser.add_argument("--test-data", help="imagefolder: its test split")
    parser.add_argument("--image-size", type=int, default=224, help="resize (bicubic) + centre crop to it (px)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")


def main():
    parser = argparse.ArgumentParser(description="linear-probing transfer of a frozen trunk")
    args = add_common_args(parser, add_transfer_data_args).parse_args()
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):   # now, not after the fits
        parser.error(f"--out {args.out}: its folder does not exist; create it or choose another --out")
    batch = process_batch(args.batch_size)   # this process's share of the global batch; refused now, not later
    results, failed = {}, []
    with distributed() as device:
        trunk, transform = build_trunk(args, device), transfer_transform(args.image_size)
        for name in dict.fromkeys(args.datasets):
            try:
                results[name] = run_dataset(name, args, trunk, transform, batch, device)
            except (SystemExit, ValueError) as error:   # one line, and the other datasets still run
                failed.append(name)
                if rank() == 0:
                    print(error if isinstance(error, SystemExit) else f"error: {error}", file=sys.stderr, flush=True)
        if rank() == 0:
            print(markdown_table(results, f"this run ({args.weights})"))
            write_json(args, datasets=results, failed=failed)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(dict.fromkeys(args.datasets))} datasets did not run: "
                         f"{' '.join(failed)}")


if __name__ == "__main__":
    main()
