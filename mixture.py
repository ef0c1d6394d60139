"""Image mixtures of two other self-supervised methods, for comparison with the mosaic. Imports only torch.

- Un-Mix's "flatten" (Shen et al., Rethinking Image Mixture for Unsupervised Visual Representation Learning,
  sections 3.3-3.4): `flatten` replaces each image, with some probability, by a global mixture (an iterative mixup of
  n images, eq. 3: `global_mixture`) or by a region mixture (iterative CutMix whose first context is decayed by
  lambda_decay, eq. 4-5: `region_mixture`).
- CutMix between the two views of each image (mix-ssl, Approach 1): `cutmix` pastes a box of x2 into x1 and the
  same box of x1 into x2; `box_means` reads a feature map's mean inside the box (local) and outside it (global).

What a caller must know (the contracts):
- The row itself is every mixture's *main* image, the one mixed in last: in flatten's draws it keeps at least half
  of the weight (global mixture) or of the pixels, at full intensity (region mixture). A mixed row's positive is
  therefore still its own image's key. Its n - 1 other images come from the local batch (`partners`): all
  different from the row and from each other, so a mixture never holds an image twice.
- Images should be normalised (mean-subtracted): the decay pulls pixels towards 0, the mean colour only then.
- Boxes are [N, 4] fp32 (x1, y1, x2, y2) in pixels, half-open: [x1, x2) x [y1, y2), mosaic.py's convention.
  `random_boxes` gives integer corners, so a box is exactly a set of pixels; `box_means` takes any corners.
- Random draws come from torch's global RNG on the images' device, per sample and batched; nothing waits for the
  device (no .item(), no data-dependent shapes), and a seeded step repeats exactly. The loops run over the n
  mixture steps, never over the batch.
"""
import torch


def partners(batch_size: int, n: int, device=None) -> torch.Tensor:
    """The other n - 1 images of each row's mixture: [n-1, B] long, partners[k, b] != b and distinct down each
    column; each row is a permutation of range(B). Construction: the batch on a random ring; row k holds the image
    o_k places further on, with n - 1 distinct offsets o_k in 1..B-1. Exact, with no rejection loop."""
    if batch_size < n:
        raise ValueError(f"a mixture of {n} images needs a per-process batch of at least {n}, got {batch_size}")
    ring, offsets = torch.randperm(batch_size, device=device), torch.randperm(batch_size - 1, device=device)[:n - 1] + 1
    return ring[(torch.argsort(ring)[None, :] + offsets[:, None]) % batch_size]   # argsort: each image's place


def global_mixture(images: torch.Tensor, others: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Eq. 3, iterative mixup: I_m^1 = a_1 I_2 + (1 - a_1) I_1, then I_m^k = a_k I_{k+1} + (1 - a_k) I_m^{k-1}, where
    I_1..I_{n-1} = images[others[0..n-2]] and I_n = images, the main image. images [B, C, H, W]; others [n-1, B]
    long; shares [n-1, B], a_k the share of the image mixed in at step k (the main image's is shares[-1]).
    Returns [B, C, H, W], images' dtype."""
    mixed = images[others[0]]
    for image, share in zip([images[row] for row in others[1:]] + [images], shares.to(images.dtype)):
        mixed = torch.lerp(mixed, image, share[:, None, None, None])           # share * image + (1 - share) * mixed
    return mixed


def coverage(boxes: torch.Tensor, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """boxes [..., 4] -> [..., height, width]: the pixel area of each stride x stride cell that the box covers. At
    stride 1 with integer corners, the box's pixel mask: 1 on x1 <= x < x2, y1 <= y < y2, else 0."""
    def span(axis, cells):   # [..., cells]: the length of the box's [lo, hi) on this axis inside each cell
        start = torch.arange(cells, device=boxes.device, dtype=boxes.dtype) * stride
        return torch.diff(boxes[..., axis::2, None].clamp(start, start + stride), dim=-2)[..., 0, :]
    return span(1, height)[..., :, None] * span(0, width)[..., None, :]


def region_mixture(images: torch.Tensor, others: torch.Tensor, boxes: torch.Tensor, decay: float = 0.2):
    """Eq. 4-5, iterative CutMix with context decay: I_m^1 = M_1 I_1 + decay (1 - M_1) I_2, then
    I_m^k = M_k I_{k+1} + (1 - M_k) I_m^{k-1}, M_k the mask of boxes[k-1]; I_1..I_{n-1} = images[others] and
    I_n = images, the main image, pasted last, at full intensity, in boxes[-1] (so n >= 3). images [B, C, H, W];
    others [n-1, B] long; boxes [n-1, B, 4] integer corners. Returns [B, C, H, W], images' dtype."""
    sequence, masks = [images[row] for row in others] + [images], coverage(boxes, *images.shape[2:]).unsqueeze(2) > 0
    mixed = torch.where(masks[0], sequence[0], decay * sequence[1])            # masks [n-1, B, 1, H, W]
    for mask, image in zip(masks[1:], sequence[2:]):
        mixed = torch.where(mask, image, mixed)
    return mixed


def random_boxes(count: int, height: int, width: int, low: float, high: float, device=None) -> torch.Tensor:
    """count boxes [count, 4] fp32 with integer corners, inside the image, of the image's aspect ratio, at a
    uniform position, covering an area fraction ~ U[low, high] (sides rounded up to whole pixels: never less
    than low)."""
    side = (low + (high - low) * torch.rand(count, device=device)).sqrt()      # [count], a fraction of each side
    w, h = (side * width).ceil().clamp(max=width), (side * height).ceil().clamp(max=height)
    x1, y1 = (torch.rand(2, count, device=device) * torch.stack([width - w + 1, height - h + 1])).floor()
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def flatten(images, p_global=0.5, p_region=0.25, n_global=4, n_region=5, decay=0.2):
    """Un-Mix's flattened view: each row independently becomes its global mixture (probability p_global), its region
    mixture (p_region) or stays as it is (the rest; p_global + p_region <= 1). images [B, C, H, W] (B >=
    max(n_global, n_region); n_global >= 2, n_region >= 3) -> [B, C, H, W], same dtype. Draws: mixup's share
    a ~ U[0, 1] for each image mixed in before the main one, and U[0.5, 1] for the main image; CutMix's box area
    ~ U[0, 1] for the context images, U[0.5, 1] for the main image's box. The defaults n_global = 4, n_region = 5,
    decay = 0.2 are the seed's best (its Tables 1-3, MoCo on ImageNet-100)."""
    (B, _, H, W), device = images.shape, images.device
    others = partners(B, max(n_global, n_region), device)
    shares = torch.cat([torch.rand(n_global - 2, B, device=device), 0.5 + 0.5 * torch.rand(1, B, device=device)])
    boxes = torch.cat([random_boxes((n_region - 2) * B, H, W, 0.0, 1.0, device).view(n_region - 2, B, 4),
                       random_boxes(B, H, W, 0.5, 1.0, device)[None]])
    choice = torch.rand(B, device=device)[:, None, None, None]                 # one draw picks the row's mixture
    mixed = torch.where(choice < p_global, global_mixture(images, others[:n_global - 1], shares),
                        region_mixture(images, others[:n_region - 1], boxes, decay))
    return torch.where(choice < p_global + p_region, mixed, images)


def cutmix(x1: torch.Tensor, x2: torch.Tensor, boxes: torch.Tensor):
    """Mixing between branches: x1m = x1 with the box's pixels from x2, x2m = x2 with the same pixels from x1.
    x1, x2 [B, C, H, W] (two views of the same images), boxes [B, 4] integer corners -> (x1m, x2m)."""
    inside = coverage(boxes, *x1.shape[2:]).unsqueeze(1) > 0                    # [B, 1, H, W]
    return torch.where(inside, x2, x1), torch.where(inside, x1, x2)


def box_means(feature_map: torch.Tensor, boxes: torch.Tensor, stride: int):
    """Mean of a feature map over each box and over the rest of the image: feature_map [N, C, h, w], boxes [N, 4]
    in image pixels (the image being h*stride x w*stride) -> (inside [N, C], outside [N, C]), feature_map's dtype.

    Exactly the mask means of the map upsampled to the image by nearest ("box") interpolation, each cell covering
    its stride x stride pixels, computed without upsampling: each cell weighs by the pixel area of it inside the
    box, or outside it. This stands in for mix-ssl's bilinear-upsampled map. Both regions must be non-empty."""
    inside = coverage(boxes, *feature_map.shape[2:], stride)                    # [N, h, w]
    weights = torch.stack([inside, stride * stride - inside], dim=1)           # [N, 2, h, w]
    # A product and a sum, which autocast leaves in fp32: it would run a contraction (einsum, matmul) in fp16, whose
    # sums (pixel areas of up to stride^2 per cell, over every cell) pass fp16's 65,504 for features of a few units.
    sums = (feature_map.float()[:, None] * weights[:, :, None]).sum(dim=(3, 4))   # [N, 2, C]
    return (sums / weights.sum(dim=(2, 3))[..., None]).to(feature_map.dtype).unbind(1)
