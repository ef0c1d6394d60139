"""The photometric half of the view recipes, batched on the device, with per-sample random parameters.

The loader's workers only decode, RandomResizedCrop and flip, and hand over uint8 tensors (a worker
then feeds 5-6x more images per core-second than with the whole recipe in PIL). The training step calls
`augment` on each view of the batch: colour jitter, grayscale, Gaussian blur, solarize, normalisation,
as batched tensor ops with no Python loop over the samples and no host sync. Imports only torch.

The contract:
- `RECIPES` is the one table of the recipes: each view's RandomResizedCrop scale (read by the loader,
  data.py) and its blur and solarize probabilities (read here). MoCo-v2's two global views are alike;
  BYOL's are asymmetric (blur 1.0 / 0.1, solarize 0 / 0.2). Views under 64 px get no blur.
- Every draw (factors, op order, which sample gets which op) comes from torch's global RNG on the
  images' device: seed it per step (train.py does, from seed, step and rank) and a run is reproducible.
- Each op equals torchvision.transforms.v2.functional's op on each image alone, in fp32 on [0, 1]
  images (the tests pin it to 1e-5): adjust_brightness / contrast / saturation / hue, rgb_to_grayscale,
  gaussian_blur (its kernel, reflect padding) and solarize. Colour jitter draws torchvision ColorJitter's
  factor ranges and applies the four ops in a random order per sample, as ColorJitter does per image.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet statistics, used for every dataset


# One view's recipe: RandomResizedCrop scale range, blur probability, solarize probability.
View = NamedTuple("View", [("scale", tuple), ("blur", float), ("solarize", float)])


RECIPES = {"moco": {"x1": View((0.2, 1.0), 0.5, 0.0), "x2": View((0.2, 1.0), 0.5, 0.0),
                    "crops": View((0.1, 0.6), 0.5, 0.0)},
           "byol": {"x1": View((0.08, 1.0), 1.0, 0.0), "x2": View((0.08, 1.0), 0.1, 0.2),
                    "crops": View((0.1, 0.6), 0.5, 0.0)}}
# ColorJitter strengths (brightness, contrast, saturation, hue), applied with p = 0.8; grayscale p = 0.2.
COLOUR_JITTER = {"moco": (0.4, 0.4, 0.4, 0.1), "byol": (0.4, 0.4, 0.2, 0.1)}
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _per_sample(values: torch.Tensor) -> torch.Tensor:   # [N] -> [N, 1, 1, 1], to broadcast over images
    return values.reshape(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> luma [N, 1, H, W] with torchvision's (ITU-R 601) weights."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(images: torch.Tensor, factors: torch.Tensor, reference) -> torch.Tensor:
    """clamp(f * image + (1 - f) * reference, 0, 1) per sample: factors [N]; reference broadcasts to images.
    Brightness, contrast and saturation are this blend with another reference each."""
    reference = torch.as_tensor(reference, dtype=images.dtype, device=images.device)
    return torch.lerp(reference, images, _per_sample(factors)).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return blend(images, factors, 0.0)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return blend(images, factors, grayscale(images).mean(dim=(1, 2, 3), keepdim=True))


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return blend(images, factors, grayscale(images))


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by shifts [N] (in turns, within [-0.5, 0.5]): to HSV, shift, back to RGB."""
    r, g, b = images.unbind(dim=1)
    value, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)   # [N, H, W]
    chroma = value - low
    # Hue in sextants, [-1, 5): which channel is the largest picks the sextant pair (torchvision's precedence).
    red_max, green_max = value == r, value == g
    difference = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    sextant = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    hue = sextant + difference / torch.where(chroma > 0, chroma, 1.0)             # grey pixels: any hue
    hue6 = torch.remainder(hue + 6 * shifts.reshape(-1, 1, 1), 6).unsqueeze(1)     # [N, 1, H, W] in [0, 6)
    # HSV -> RGB in closed form: channel n (5, 3, 1 for R, G, B) is value - chroma * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + hue6) mod 6 (chroma = value * saturation).
    k = torch.remainder(torch.cat([hue6 + 5, hue6 + 3, hue6 + 1], dim=1), 6)        # [N, 3, H, W]
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma (sigmas [N]): torchvision's kernel (a normalised Gaussian sampled at
    integer offsets) and reflect padding, as two 1-D passes, one conv group per image channel."""
    N, C, H, W = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - (kernel_size - 1) / 2
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)          # [N, k]
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(C, 0)  # [N*C, k]
    x = F.pad(images.reshape(1, N * C, H, W), (kernel_size // 2,) * 4, mode="reflect")
    x = F.conv2d(x, kernels[:, None, None, :], groups=N * C)                       # along the width
    x = F.conv2d(x, kernels[:, None, :, None], groups=N * C)                       # along the height
    return x.reshape(N, C, H, W)


def solarize(images: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert every pixel at or above threshold (128 of 255 by default, as RandomSolarize(128) on uint8)."""
    return torch.where(images >= threshold, 1 - images, images)


def draw_colour_jitter(n: int, strengths, p: float = 0.8, device=None):
    """torchvision ColorJitter's random parameters for n images: factors [n, 4] (brightness, contrast, saturation
    uniform in [1 - s, 1 + s], hue shift in [-s, s]), order [n, 4] (a random permutation of the four ops per
    image, op indices BRIGHTNESS..HUE) and applied [n] (bool, probability p)."""
    u = 2 * torch.rand(n, 4, device=device) - 1                                     # [n, 4] in [-1, 1)
    factors = torch.stack([1 + s * u[:, op] for op, s in enumerate(strengths)], dim=1)   # no host-to-device copy
    factors[:, HUE] -= 1
    order = torch.rand(n, 4, device=device).argsort(dim=1)                          # [n, 4]
    return factors, order, torch.rand(n, device=device) < p


def apply_colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, applied: torch.Tensor):
    """Each image through the four ops in its own order, as draw_colour_jitter's parameters say; images [N, 3, H, W].
    A random order of four ops is a random order of the three blends with hue inserted at a random slot, so the
    batch runs the blends before its hue, hue once, then the blends after it (one hue pass instead of four)."""
    hue_slot = (order == HUE).long().argmax(dim=1)                                   # [N] blends before hue
    blend_order = order.gather(1, (order == HUE).long().argsort(dim=1, stable=True)[:, :3])   # [N, 3]
    for after_hue in (False, True):
        if after_hue:
            hued = adjust_hue(images, torch.where(applied, factors[:, HUE], 0.0))
            images = torch.where(_per_sample(applied), hued, images)
        for slot in range(3):
            op = blend_order[:, slot]                                                # [N]
            active = applied & ((slot >= hue_slot) if after_hue else (slot < hue_slot))
            grey = grayscale(images)
            reference = torch.where(_per_sample(op == SATURATION), grey, torch.where(
                _per_sample(op == CONTRAST), grey.mean(dim=(1, 2, 3), keepdim=True), 0.0))
            images = blend(images, torch.where(active, factors.gather(1, op[:, None]).squeeze(1), 1.0), reference)
    return images


def draw_augment(n: int, framework: str, view: str, size: int, device=None) -> dict:
    """The random parameters of n images of one view (size px) under RECIPES[framework][view]: the colour jitter's
    (p 0.8), and which images get grayscale (p 0.2), blur (the view's p, never under 64 px; sigma ~ U[0.1, 2])
    and solarize (the view's p): bool [n] each, sigma [n]."""
    recipe, rand = RECIPES[framework][view], lambda: torch.rand(n, device=device)
    jitter = draw_colour_jitter(n, COLOUR_JITTER[framework], 0.8, device)
    # At 32 px a 3x3 kernel erases the little detail there is: small views get no blur.
    return dict(jitter=jitter, grey=rand() < 0.2, blur=rand() < (recipe.blur if size >= 64 else 0.0),
                sigma=0.1 + 1.9 * rand(), solarize=rand() < recipe.solarize)


def apply_augment(images: torch.Tensor, params: dict) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W]: colour jitter, grayscale, blur (kernel ~10 % of the side),
    solarize, as params (draw_augment) say per image, then normalisation with MEAN and STD."""
    x, size = apply_colour_jitter(images.float() / 255, *params["jitter"]), images.shape[-1]
    x = torch.where(_per_sample(params["grey"]), grayscale(x).expand_as(x), x)
    if size >= 64:   # the op costs time even where no image is picked
        x = torch.where(_per_sample(params["blur"]), gaussian_blur(x, params["sigma"], 2 * (size // 20) + 1), x)
    x = torch.where(_per_sample(params["solarize"]), solarize(x), x)
    # Per channel with Python scalars: a mean/std tensor would be a host-to-device copy at every step.
    return torch.stack([(channel - m) / s for channel, m, s in zip(x.unbind(1), MEAN, STD)], dim=1)


def augment(images: torch.Tensor, framework: str, view: str) -> torch.Tensor:
    """The photometric recipe of one view for a batch: uint8 [N, 3, H, W] -> normalised float32 [N, 3, H, W], with
    per-image random parameters drawn on the images' device."""
    return apply_augment(images, draw_augment(images.shape[0], framework, view, images.shape[-1], images.device))
