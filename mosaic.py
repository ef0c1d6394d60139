"""The mosaic view of MosRep: group small crops across the batch, tile them, jitter the tiles.

Everything here runs on whatever device the crops live on, as batched tensor ops, inside the
training step. The module imports only torch, so it can be copied into another project as is;
`python mosaic.py --out mosaic.png [--data DIR]` draws a few mosaics (that part uses torchvision).
"""
import math
from typing import NamedTuple, Optional

import torch


class Mosaic(NamedTuple):
    """A batch of mosaic views and where each crop sits in them.

    images  [B, C, H, W]  the jittered mosaics.
    rois    [B*M, 5]      (batch index, x1, y1, x2, y2) in mosaic pixels, ready for roi_align;
                          row b*M + j is slot j of mosaic b.
    targets [B*M]         index (in the local batch) of the image each roi was cropped from.
    weights [B*M]         sqrt(visible area / original area) of each crop after jitter.
    """
    images: torch.Tensor
    rois: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def group_crops(batch_size: int, num_crops: int, generator: Optional[torch.Generator] = None,
                device=None) -> torch.Tensor:
    """Decide which image's crop fills each slot of each mosaic.

    Returns sources [B, M] (long): sources[b, j] is the image whose j-th small crop goes into slot j
    of mosaic b. Every column is a permutation of range(B), so each crop is used exactly once, and
    every row holds M different images, so no mosaic shows the same image twice.

    Construction: take a random ordering `perm` of the images and M distinct random offsets o_j;
    column j is `perm` rotated by o_j. Distinct offsets modulo B make a row's entries distinct,
    and a rotation of a permutation is a permutation. A final row shuffle hides the structure.
    """
    if batch_size < num_crops:
        raise ValueError(f"a mosaic needs crops of {num_crops} different images but the batch holds "
                         f"only {batch_size}; use a per-process batch of at least {num_crops} images "
                         f"(batch_size={batch_size}, num_crops={num_crops})")
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    perm = torch.randperm(batch_size, generator=generator, device=gen_device)            # [B]
    offsets = torch.randperm(batch_size, generator=generator, device=gen_device)[:num_crops]  # [M]
    rows = torch.randperm(batch_size, generator=generator, device=gen_device)            # [B]
    slots = (rows[:, None] + offsets[None, :]) % batch_size                             # [B, M]
    return perm[slots].to(device if device is not None else gen_device)


def compose(crops: torch.Tensor, sources: torch.Tensor):
    """Tile crops into g x g mosaics.

    crops [B, M, C, s, s] with M = g*g; sources [B, M] from group_crops.
    Returns mosaics [B, C, g*s, g*s], slot j at grid row j // g and column j % g holding
    crops[sources[b, j], j], and boxes [B, M, 4] float = (x1, y1, x2, y2): slot j covers the pixels
    [x1, x2) x [y1, y2), i.e. continuous coordinates as roi_align(aligned=True) reads them.
    """
    B, M, C, s, s2 = crops.shape
    g = math.isqrt(M)
    if g * g != M or s != s2:
        raise ValueError(f"compose needs a square number of square crops, got M={M} crops of {s}x{s2}")
    slot = torch.arange(M, device=crops.device)
    tiles = crops[sources, slot[None, :]]                                   # [B, M, C, s, s]
    mosaics = (tiles.view(B, g, g, C, s, s)                                 # [B, row, col, C, y, x]
               .permute(0, 3, 1, 4, 2, 5)                                   # [B, C, row, y, col, x]
               .reshape(B, C, g * s, g * s))
    x1 = (slot % g).float() * s
    y1 = torch.div(slot, g, rounding_mode="floor").float() * s
    boxes = torch.stack([x1, y1, x1 + s, y1 + s], dim=1)                    # [M, 4]
    return mosaics, boxes.unsqueeze(0).expand(B, M, 4).contiguous()


def sample_beta(alpha: float, n: int, generator: Optional[torch.Generator] = None, device=None):
    """n draws of Beta(alpha, alpha) that honour `generator` (torch.distributions cannot).

    Beta(a, a) = X / (X + Y) with X, Y ~ Gamma(a). Gamma uses Marsaglia-Tsang on shape a + 1
    (acceptance > 95 %), vectorised over 16 proposals per draw, then the boost U^(1/a).
    """
    if alpha <= 0:
        raise ValueError(f"jitter alpha must be positive, got {alpha}")
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")

    def log_gamma(count):
        d = alpha + 1.0 - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        z = torch.randn(count, 16, generator=generator, device=gen_device)
        u = torch.rand(count, 16, generator=generator, device=gen_device)
        v = (1 + c * z).clamp_min(1e-6) ** 3
        accepted = (1 + c * z > 0) & (torch.log(u) < 0.5 * z ** 2 + d - d * v + d * torch.log(v))
        # The first accepted proposal of each row, with fixed shapes and no data-dependent loop, so
        # a GPU never waits for the host. All 16 rejected has probability < 0.05^16.
        first = accepted.float().argmax(dim=1, keepdim=True)
        gamma = (d * v).gather(1, first).squeeze(1)
        # log space: for small alpha, U^(1/alpha) underflows to 0 and X / (X + Y) would be 0/0.
        boost = torch.rand(count, generator=generator, device=gen_device).clamp_min(1e-38).log() / alpha
        return gamma.log() + boost

    # X / (X + Y) = sigmoid(log X - log Y)
    return torch.sigmoid(log_gamma(n) - log_gamma(n)).to(device or gen_device)


def jitter(mosaics: torch.Tensor, boxes: torch.Tensor, max_shift: float, alpha: float = 0.5,
           generator: Optional[torch.Generator] = None):
    """Translate every mosaic by its own random integer offset, filling uncovered pixels with 0.

    mosaics [B, C, H, W], boxes [B, M, 4]. Offsets dx, dy = round(max_shift * (2u - 1)) with
    u ~ Beta(alpha, alpha), independently per mosaic and axis; alpha = 0.5 is U-shaped, so large
    shifts are likelier than small ones. Boxes move with the content and are clipped to the canvas.
    Returns (mosaics [B, C, H, W] same dtype, boxes [B, M, 4], visible [B, M] = clipped / original
    area). max_shift = 0 returns the input unchanged with visible = 1.
    """
    B, C, H, W = mosaics.shape
    if max_shift <= 0:
        return mosaics, boxes, torch.ones(boxes.shape[:2], device=boxes.device)
    device = mosaics.device
    u = sample_beta(alpha, 2 * B, generator, device).view(2, B)
    dx, dy = torch.round(max_shift * (2 * u - 1)).long()                    # [B] each
    # Output pixel (y, x) reads input pixel (y - dy, x - dx); reads from outside the canvas give 0.
    src_y = torch.arange(H, device=device)[None, :] - dy[:, None]           # [B, H]
    src_x = torch.arange(W, device=device)[None, :] - dx[:, None]           # [B, W]
    index_y = src_y.clamp(0, H - 1)[:, None, :, None].expand(B, C, H, W)
    index_x = src_x.clamp(0, W - 1)[:, None, None, :].expand(B, C, H, W)
    moved = mosaics.gather(2, index_y).gather(3, index_x)
    inside = (((src_y >= 0) & (src_y < H))[:, None, :, None]
              & ((src_x >= 0) & (src_x < W))[:, None, None, :])              # [B, 1, H, W]
    moved = moved * inside.to(moved.dtype)

    shift = torch.stack([dx, dy, dx, dy], dim=1).to(boxes.dtype)            # [B, 4]
    moved_boxes = boxes + shift[:, None, :]
    xs, ys = moved_boxes[..., 0::2].clamp(0, W), moved_boxes[..., 1::2].clamp(0, H)   # scalars: no host copy
    clipped = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)     # [B, M, 4]
    visible = _area(clipped) / _area(boxes)
    return moved, clipped, visible


def _area(boxes):
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def make_mosaic(crops: torch.Tensor, max_shift: float, alpha: float = 0.5,
                generator: Optional[torch.Generator] = None) -> Mosaic:
    """Small crops [B, M, C, s, s] -> Mosaic (group, compose, jitter, weight); see Mosaic."""
    B, M = crops.shape[:2]
    sources = group_crops(B, M, generator, device=crops.device)             # [B, M]
    mosaics, boxes = compose(crops, sources)                                # [B, C, H, W], [B, M, 4]
    mosaics, boxes, visible = jitter(mosaics, boxes, max_shift, alpha, generator)
    batch_index = torch.arange(B, device=crops.device, dtype=boxes.dtype).repeat_interleave(M)
    rois = torch.cat([batch_index[:, None], boxes.reshape(B * M, 4)], dim=1)  # [B*M, 5]
    # The released code weights each crop's loss by sqrt of its visible share: a crop pushed half
    # off the canvas still counts, but less.
    return Mosaic(mosaics, rois, sources.reshape(B * M), visible.reshape(B * M).sqrt())


def _demo():
    """Write a picture of jittered mosaics with their boxes drawn (needs torchvision)."""
    import argparse
    import torchvision
    from torchvision.transforms import v2

    parser = argparse.ArgumentParser(description="Draw a few MosRep mosaic views.")
    parser.add_argument("--out", default="mosaic.png", help="PNG file to write")
    parser.add_argument("--data", default=None, help="an image folder (ImageFolder layout); "
                        "without it, synthetic striped images are used")
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--crops", type=int, default=4, help="M, a perfect square")
    parser.add_argument("--jitter", type=float, default=None, help="max shift, default 48/112 of crop size")
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
            raise SystemExit(f"--data {args.data} holds {len(folder)} images; need at least {n}")
        picks = torch.randperm(len(folder), generator=generator)[:n].tolist()
        images = [v2.functional.to_image(folder[i][0]) for i in picks]
    else:   # stripes of a distinct colour per image, so the grouping is visible
        images = []
        for i in range(n):
            colour = torch.rand(3, 1, 1, generator=generator)
            stripes = (torch.arange(2 * s) // (8 + 4 * i) % 2).float()[None, None, :]
            images.append(((0.3 + 0.7 * stripes) * colour * 255).expand(3, 2 * s, 2 * s).to(torch.uint8))
    crops = torch.stack([torch.stack([crop(img) for _ in range(M)]) for img in images])  # [n, M, 3, s, s]
    max_shift = args.jitter if args.jitter is not None else round(s * 48 / 112)
    mosaic = make_mosaic(crops, max_shift, generator=generator)
    drawn = []
    for b in range(n):
        rows = mosaic.rois[b * M:(b + 1) * M]
        labels = [f"img {t} w={w:.2f}" for t, w in zip(mosaic.targets[b * M:(b + 1) * M].tolist(),
                                                     mosaic.weights[b * M:(b + 1) * M].tolist())]
        picture = (mosaic.images[b] * 255).to(torch.uint8)
        boxes = rows[:, 1:].clone()
        boxes[:, 2:] -= 1   # draw_bounding_boxes takes inclusive pixel corners
        drawn.append(torchvision.utils.draw_bounding_boxes(picture, boxes, labels, colors="yellow", width=2))
    torchvision.utils.save_image(torch.stack(drawn).float() / 255, args.out, nrow=4, padding=4, pad_value=1.0)
    print(f"wrote {args.out}: {n} mosaics of {M} crops of {s}px, max shift {max_shift}px")


if __name__ == "__main__":
    _demo()
