"""The mosaic view of MosRep: group small crops across the batch, tile them, jitter the tiles.

Everything runs as batched tensor ops on the crops' device, inside the training step. Imports only
torch. What a caller must know (the contracts):

- Crops should be normalised (mean-subtracted): the pixels that the jitter uncovers are 0, which
  is the mean colour only for normalised crops; on [0, 1] images it is black.
- `Mosaic.rois` feed torchvision's roi_align as
  `roi_align(feature_map.float(), rois.float(), output_size=7, spatial_scale=1 / stride,
  sampling_ratio=2, aligned=True)`, with stride the backbone's (32 for an ImageNet ResNet).
  Boxes are half-open pixel tiles [x1, x2) x [y1, y2) in continuous coordinates, which is the
  convention of aligned=True. Keep the rois in fp32: bf16 holds integers only up to 256, so batch
  indices and pixel corners beyond that would snap to another mosaic or pixel.
- `Mosaic.sources` index the *local* batch. Under DDP, where the positives are the keys of the
  global batch gathered in rank order, add rank * B.
"""
import math
from typing import NamedTuple

import torch


def default_jitter(mosaic_size: int) -> int:
    """The paper's max shift, 48 px for a 224 px mosaic, scaled to mosaic_size px (any M)."""
    return round(48 * mosaic_size / 224)


class Mosaic(NamedTuple):
    """A batch of mosaic views and where each crop sits in them.

    images  [B, C, H, W]  the jittered mosaics.
    rois    [B*M, 5]      (batch index, x1, y1, x2, y2) in mosaic pixels; row b*M + j is slot j of mosaic b.
    sources [B*M]         index, in the local batch, of the image each crop was cut from.
    weights [B*M]         sqrt(visible area / original area) of each crop after the jitter.
    """
    images: torch.Tensor
    rois: torch.Tensor
    sources: torch.Tensor
    weights: torch.Tensor


def group_crops(batch_size: int, num_crops: int, device=None) -> torch.Tensor:
    """Decide which image's crop fills each slot of each mosaic: sources [B, M] (long), sources[b, j] being the
    image whose j-th small crop fills slot j of mosaic b. Every column is a permutation of range(B), so each
    crop is used exactly once; every row holds M different images, so no mosaic shows an image twice.

    Construction: column j is one random ordering `perm` rotated by an offset o_j, with M distinct offsets.
    Distinct offsets make a row's entries distinct, and a rotated permutation is a permutation; a final row
    shuffle hides the structure. Exact, with no rejection loop.
    """
    if batch_size < num_crops:
        raise ValueError(f"a mosaic needs crops of {num_crops} different images but the batch holds only {batch_size}; "
                         f"use a per-process batch of at least {num_crops} images (batch_size={batch_size})")
    perm = torch.randperm(batch_size, device=device)                                   # [B]
    offsets = torch.randperm(batch_size, device=device)[:num_crops]                    # [M]
    rows = torch.randperm(batch_size, device=device)                                   # [B]
    return perm[(rows[:, None] + offsets[None, :]) % batch_size]                       # [B, M]


def compose(crops: torch.Tensor, sources: torch.Tensor):
    """Tile crops [B, M, C, s, s] (M = g*g) into mosaics [B, C, g*s, g*s] as sources [B, M] says: slot j (grid row
    j // g, column j % g) of mosaic b holds crops[sources[b, j], j]. Also returns boxes [B, M, 4], float (x1, y1,
    x2, y2): slot j covers [x1, x2) x [y1, y2)."""
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


def jitter(mosaics: torch.Tensor, boxes: torch.Tensor, max_shift: float, alpha: float = 0.5):
    """Translate every mosaic by its own random integer offset; uncovered pixels become 0.

    mosaics [B, C, H, W], boxes [B, M, 4]. Offsets dx, dy = round(max_shift * (2u - 1)), u ~ Beta(alpha,
    alpha), independent per mosaic and axis; alpha = 0.5 is U-shaped, so large shifts are likelier
    than small ones. Boxes move with the content and are clipped to the canvas. Returns (mosaics
    [B, C, H, W] same dtype, boxes [B, M, 4], visible [B, M] = clipped / original area).
    """
    B, C, H, W = mosaics.shape
    if max_shift <= 0:
        return mosaics, boxes, torch.ones(boxes.shape[:2], device=boxes.device)
    if alpha <= 0:
        raise ValueError(f"jitter alpha must be positive, got {alpha}")
    device = mosaics.device
    # Sampled on the device and not validated: a host-side check would wait for the GPU at every step.
    concentration = torch.full((2, B), float(alpha), device=device)
    u = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()   # [2, B]
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
    moved_boxes = boxes + torch.stack([dx, dy, dx, dy], dim=1).to(boxes.dtype)[:, None, :]
    xs, ys = moved_boxes[..., 0::2].clamp(0, W), moved_boxes[..., 1::2].clamp(0, H)   # scalars: no host copy
    clipped = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)     # [B, M, 4]
    area = lambda b: (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)   # [B, M]
    return moved, clipped, area(clipped) / area(boxes)


def make_mosaic(crops: torch.Tensor, max_shift: float, alpha: float = 0.5) -> Mosaic:
    """Small crops [B, M, C, s, s] -> Mosaic: group, compose, jitter, weight (see the module docstring)."""
    B, M = crops.shape[:2]
    sources = group_crops(B, M, crops.device)                               # [B, M]
    mosaics, boxes = compose(crops, sources)                                # [B, C, H, W], [B, M, 4]
    mosaics, boxes, visible = jitter(mosaics, boxes, max_shift, alpha)
    batch_index = torch.arange(B, device=crops.device, dtype=boxes.dtype).repeat_interleave(M)
    rois = torch.cat([batch_index[:, None], boxes.reshape(B * M, 4)], dim=1)  # [B*M, 5]
    # As in the released code, a crop's loss counts sqrt of its visible share: a crop pushed half
    # off the canvas still counts, but less.
    return Mosaic(mosaics, rois, sources.reshape(B * M), visible.reshape(B * M).sqrt())
