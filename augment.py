"""The photometric half of the view recipes, batched on the device, with per-sample random parameters.

The loader's workers only decode, RandomResizedCrop and flip, and hand over uint8 tensors (a worker then feeds
about 10x more JPEGs per core-second than with the whole recipe in PIL: 9.7x in docs/results.md, 9.5-11.9x in
docs/loader.md's runs). The training step calls `augment` on each view of the batch: colour jitter, grayscale,
Gaussian blur, solarize, normalisation, as batched tensor ops with no Python loop over the samples and no host sync.
Imports only torch.

The contract:
- `VIEW_RECIPES` is the one table of the recipes: each view's RandomResizedCrop scale (read by the loader,
  data.py) and its blur and solarize probabilities (read here). MoCo-v2's two global views are alike;
  BYOL's are asymmetric (blur 1.0 / 0.1, solarize 0 / 0.2). Views under 64 px get no blur.
- Every draw (factors, op order, which sample gets which op) comes from torch's global RNG on the
  images' device: seed it per step (train.py does, from seed, step and rank) and a run is reproducible.
- Each op equals torchvision.transforms.v2.functional's op on each image alone, in fp32 on [0, 1]
  images (the tests pin it to 1e-5): adjust_brightness / contrast / saturation (`blend`), adjust_hue,
  rgb_to_grayscale, gaussian_blur (its kernel, reflect padding) and solarize. Colour jitter draws torchvision
  ColorJitter's factor ranges and applies the four ops in a random order per sample, as ColorJitter does per image.
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet statistics, used for every dataset


# One view's recipe: RandomResizedCrop scale range, blur probability, solarize probability.
View = NamedTuple("View", [("scale", tuple), ("blur", float), ("solarize", float)])


VIEW_RECIPES = {"moco": {"x1": View((0.2, 1.0), 0.5, 0.0), "x2": View((0.2, 1.0), 0.5, 0.0),
                         "crops": View((0.1, 0.6), 0.5, 0.0)},
                "byol": {"x1": View((0.08, 1.0), 1.0, 0.0), "x2": View((0.08, 1.0), 0.1, 0.2),
                         "crops": View((0.1, 0.6), 0.5, 0.0)}}
# ColorJitter strengths (brightness, contrast, saturation, hue), applied with p = 0.8; grayscale p = 0.2.
COLOUR_JITTER = {"moco": (0.4, 0.4, 0.4, 0.1), "byol": (0.4, 0.4, 0.2, 0.1)}
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _per_sample(values: torch.Tensor) -> torch.Tensor:   # [N] -> [N, 1, 1, 1], to broadcast over images
    return values.reshape(-1, 1, 1, 1)


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: torch.tensor at every step would be a host-to-device copy."""
    return torch.tensor(values, device=device)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> luma [N, 1, H, W] with torchvision's (ITU-R 601) weights, as one 1x1 convolution."""
    return F.conv2d(images, _constant(((((0.2989,),), ((0.587,),), ((0.114,),)),), images.device).to(images.dtype))


def blend(images: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness, adjust_contrast or adjust_saturation, each image the one ops names (BRIGHTNESS,
    CONTRAST or SATURATION): images [N, 3, H, W] in [0, 1]; ops and factors [N, 1, 1, 1], per image. Each is the blend
    clamp(f * image + (1 - f) * reference, 0, 1) towards its own reference: 0 (brightness), the mean of the image's
    grey (contrast) or its grey (saturation). A factor of 1 leaves an image as it is, whatever its op."""
    grey = grayscale(images)                                                            # [N, 1, H, W]
    reference = torch.where(ops == SATURATION, grey, (ops == CONTRAST) * grey.mean(dim=(1, 2, 3), keepdim=True))
    return torch.lerp(reference, images, factors).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by shifts [N] (in turns, within [-0.5, 0.5]): to HSV, shift, back to RGB."""
    r, g, b = images.split(1, dim=1)                                                  # [N, 1, H, W] each
    value, low = images.amax(dim=1, keepdim=True), images.amin(dim=1, keepdim=True)
    chroma = value - low
    # Hue in sextants, [-1, 5): which channel is the largest picks the sextant pair (torchvision's precedence).
    red_max, green_max = value == r, value == g
    difference = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    sextant = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    hue = sextant + difference / torch.where(chroma > 0, chroma, 1.0)                # grey pixels: any hue
    # HSV -> RGB in closed form: channel n (5, 3, 1 for R, G, B) is value - chroma * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + hue + 6 shift) mod 6 (chroma = value * saturation).
    k = torch.remainder(hue.add(shifts.reshape(-1, 1, 1, 1), alpha=6) + _constant((((5.0,),), ((3.0,),), ((1.0,),)),
                                                                                 images.device), 6)   # [N, 3, H, W]
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma (sigmas [N]): torchvision's kernel (a normalised Gaussian sampled at
    integer offsets) and reflect padding, as two 1-D passes, one conv group per image (channels as the batch)."""
    N, k = images.shape[0], kernel_size
    squares = _constant(tuple((i - (k - 1) / 2) ** 2 for i in range(k)), images.device).to(images.dtype)   # [k]
    kernels = torch.exp(squares * (-0.5 * sigmas.reshape(N, 1) ** -2))              # [N, k]
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).reshape(N, 1, 1, k)
    x = F.pad(images.transpose(0, 1), (k // 2,) * 4, mode="reflect")               # [C, N, H + k - 1, W + k - 1]
    x = F.conv2d(x, kernels, groups=N)                                              # along the width
    return F.conv2d(x, kernels.transpose(2, 3), groups=N).transpose(0, 1)          # along the height


def solarize(images: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert every pixel at or above threshold (128 of 255 by default, as RandomSolarize(128) on uint8)."""
    return torch.where(images >= threshold, 1 - images, images)


def draw_colour_jitter(n: int, strengths, p: float = 0.8, device=None):
    """torchvision ColorJitter's random parameters for n images: factors [n, 4] (brightness, contrast, saturation
    uniform in [1 - s, 1 + s], hue shift in [-s, s]), order [n, 4] (a random permutation of the four ops per
    image, op indices BRIGHTNESS..HUE) and applied [n] (bool, probability p)."""
    low = _constant(tuple(1.0 - s if op != HUE else -s for op, s in enumerate(strengths)), device)   # [4]
    u = torch.rand(n, 9, device=device)
    factors = torch.addcmul(low, u[:, :4], _constant(tuple(2 * s for s in strengths), device))   # low + U[0, 1) 2s
    return factors, u[:, 4:8].argsort(dim=1), u[:, 8] < p


def apply_colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, applied: torch.Tensor):
    """torchvision's ColorJitter on each image alone, with draw_colour_jitter's parameters: images [N, 3, H, W] in
    [0, 1] go through the four ops in their own order (order [N, 4]: the op at each position), each op with its factor
    (factors [N, 4], per op), where applied [N]. The hue is the costly op, so the batch runs it once, in the middle:
    before it, each image's blends that its order puts before its hue (positions 0-2 at most); after it, those after
    its hue (positions 1-3 at most). Where an image has no blend to do at a position, its factor is 1, the identity."""
    factor_at = torch.where(applied[:, None], factors.gather(1, order), 1.0)       # [N, 4]: the factor at each position
    hue_at = order.argsort(dim=1)[:, HUE:HUE + 1]          # [N, 1]: its hue's position (argsort inverts a permutation)
    position = _constant((0, 1, 2, 3), images.device)
    before, after = torch.where(position < hue_at, factor_at, 1.0), torch.where(position > hue_at, factor_at, 1.0)
    # Each [N, 4] as its four columns, one per position, shaped [N, 1, 1, 1] to broadcast over an image's pixels.
    ops, before, after = (table.reshape(-1, 4, 1, 1, 1).unbind(1) for table in (order, before, after))
    for p in range(3):
        images = blend(images, ops[p], before[p])
    images = torch.where(_per_sample(applied), adjust_hue(images, factors[:, HUE]), images)
    for p in range(1, 4):
        images = blend(images, ops[p], after[p])
    return images


def draw_augment(n: int, framework: str, views, size: int, device=None) -> dict:
    """The random parameters of n images under VIEW_RECIPES[framework][view], size px: one view name, or a tuple of
    them for a batch of equal consecutive parts, one per view (x1 and x2 in one call). The colour jitter's (p 0.8), and
    which images get grayscale (p 0.2), blur (the view's p, never under 64 px; sigma ~ U[0.1, 2]) and solarize (the
    view's p): bool [n] each, sigma [n]."""
    views = (views,) if isinstance(views, str) else tuple(views)
    # At 32 px a 3x3 kernel erases the little detail there is: small views get no blur.
    recipes = [VIEW_RECIPES[framework][view] for view in views]
    rates = _constant(tuple((0.2, r.blur * (size >= 64), r.solarize) for r in recipes), device)   # [views, 3]
    u = torch.rand(n, 4, device=device)
    grey, blur, solarize = (u[:, :3].reshape(len(views), -1, 3) < rates[:, None]).reshape(n, 3).unbind(1)
    jitter = draw_colour_jitter(n, COLOUR_JITTER[framework], 0.8, device)
    return dict(jitter=jitter, grey=grey, blur=blur, sigma=0.1 + 1.9 * u[:, 3], solarize=solarize)


def apply_augment(images: torch.Tensor, params: dict) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W]: colour jitter, grayscale, blur (kernel ~10 % of the side),
    solarize, as params (draw_augment) say per image, then normalisation with MEAN and STD."""
    x, size = apply_colour_jitter(images / 255, *params["jitter"]), images.shape[-1]
    x = torch.where(_per_sample(params["grey"]), grayscale(x), x)
    if size >= 64:   # the op costs time even where no image is picked
        x = torch.where(_per_sample(params["blur"]), gaussian_blur(x, params["sigma"], 2 * (size // 20) + 1), x)
    x = torch.where(_per_sample(params["solarize"]), solarize(x), x)
    # Constants made once per device: a mean/std tensor built at every step would be a host-to-device copy.
    return (x - _constant(tuple(((m,),) for m in MEAN), x.device)) / _constant(tuple(((s,),) for s in STD), x.device)


def augment(images: torch.Tensor, framework: str, views) -> torch.Tensor:
    """The photometric recipe for a batch: uint8 [N, 3, H, W] -> normalised float32 [N, 3, H, W], with per-image
    random parameters drawn on the images' device. views: one view name, or a tuple of them for a batch of equal
    consecutive parts, one per view (x1 and x2 in one call: torch.cat([x1, x2]), ("x1", "x2"))."""
    return apply_augment(images, draw_augment(images.shape[0], framework, views, images.shape[-1], images.device))
