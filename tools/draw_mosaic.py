"""Draw a few jittered MosRep mosaics with their boxes, as in the README's figure:

    python tools/draw_mosaic.py --data data/cifar10-jpg/test --crop-size 112 --out docs/mosaic.png

Without --data, striped synthetic images (a distinct colour each) show the grouping.
"""
import argparse
import os
import sys

import torch
import torchvision
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root: its modules
from mosaic import default_jitter, make_mosaic  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="Draw a few MosRep mosaic views.")
    parser.add_argument("--out", default="mosaic.png", help="PNG file to write")
    parser.add_argument("--data", help="an ImageFolder root; default: synthetic striped images")
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--crops", type=int, default=4, help="M, a perfect square")
    parser.add_argument("--jitter", type=float, help="max shift (px); default 48 px per 224 px of mosaic")
    parser.add_argument("--mosaics", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    n, M, s = args.mosaics, args.crops, args.crop_size
    crop = v2.Compose([v2.RandomResizedCrop(s, scale=(0.1, 0.6), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    if args.data:
        folder = torchvision.datasets.ImageFolder(args.data)
        if len(folder) < n:
            raise SystemExit(f"error: --data {args.data} holds {len(folder)} images; need at least {n}")
        picks = torch.randperm(len(folder), generator=generator)[:n].tolist()
        images = [v2.functional.to_image(folder[i][0]) for i in picks]
    else:
        images = []
        for i in range(n):
            colour = torch.rand(3, 1, 1, generator=generator)
            stripes = (torch.arange(2 * s) // (8 + 4 * i) % 2).float()[None, None, :]
            images.append(((0.3 + 0.7 * stripes) * colour * 255).expand(3, 2 * s, 2 * s).to(torch.uint8))
    crops = torch.stack([torch.stack([crop(img) for _ in range(M)]) for img in images])  # [n, M, 3, s, s]
    max_shift = args.jitter if args.jitter is not None else default_jitter(s * int(M ** 0.5))
    mosaic = make_mosaic(crops, max_shift)   # grouping and jitter draw from the seeded global RNG
    drawn = []
    for b in range(n):
        rows = slice(b * M, (b + 1) * M)
        labels = [f"img {i} w={w:.2f}" for i, w in zip(mosaic.sources[rows].tolist(), mosaic.weights[rows].tolist())]
        boxes = mosaic.rois[rows, 1:].clone()
        boxes[:, 2:] -= 1   # draw_bounding_boxes takes inclusive pixel corners
        picture = (mosaic.images[b] * 255).to(torch.uint8)
        drawn.append(torchvision.utils.draw_bounding_boxes(picture, boxes, labels, colors="yellow", width=2))
    torchvision.utils.save_image(torch.stack(drawn).float() / 255, args.out, nrow=4, padding=4, pad_value=1.0)
    print(f"wrote {args.out}: {n} mosaics of {M} crops of {s}px, max shift {max_shift}px")


if __name__ == "__main__":
    main()
