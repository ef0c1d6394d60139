import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import augment
import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n=5, h=19, w=23, seed=0):
    """Random [0, 1] images with a grey patch and saturated pixels (the HSV conversion's edge cases)."""
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    images[:, :, :3, :3] = 0.5
    images[:, 0, -2:, -2:], images[:, 1:, -2:, -2:] = 1.0, 0.0
    return images


OPS = [("adjust_brightness", lambda x, p: TF.adjust_brightness(x, p), lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("adjust_contrast", lambda x, p: TF.adjust_contrast(x, p), lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("adjust_saturation", lambda x, p: TF.adjust_saturation(x, p), lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("adjust_hue", lambda x, p: TF.adjust_hue(x, p), lambda n: torch.rand(n) - 0.5)]


@pytest.mark.parametrize("name, reference, draw", OPS, ids=[op[0] for op in OPS])
def test_batched_colour_op_equals_torchvision_per_image(name, reference, draw):
    """augment.<op>(images, per-sample factors) equals torchvision.transforms.v2.functional.<op> on each image
    alone, within 1e-5 in fp32."""
    torch.manual_seed(1)
    images, factors = _images(), draw(5)
    batched = getattr(augment, name)(images, factors)
    for image, factor, mine in zip(images, factors, batched):
        assert torch.allclose(mine, reference(image, factor.item()), atol=1e-5, rtol=0)


def test_grayscale_and_solarize_equal_torchvision():
    """grayscale (replicated to 3 channels) equals rgb_to_grayscale(num_output_channels=3); solarize with
    threshold 128/255 equals v2.functional.solarize, i.e. RandomSolarize(128) of the uint8 image."""
    images = _images()
    for image, grey, solar in zip(images, augment.grayscale(images).expand_as(images), augment.solarize(images)):
        assert torch.allclose(grey, TF.rgb_to_grayscale(image, num_output_channels=3), atol=1e-5, rtol=0)
        assert torch.equal(solar, TF.solarize(image, 128 / 255))
    uint8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal((augment.solarize(uint8.float() / 255) * 255).round().to(torch.uint8), TF.solarize(uint8, 128))


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_gaussian_blur_equals_torchvision_per_image(kernel_size):
    """gaussian_blur(images, sigmas [N], k) equals v2.functional.gaussian_blur(image, [k, k], sigma) per image
    (torchvision's kernel, reflect padding), within 1e-5."""
    images, sigmas = _images(h=29, w=31), torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for image, sigma, mine in zip(images, sigmas, augment.gaussian_blur(images, sigmas, kernel_size)):
        assert torch.allclose(mine, TF.gaussian_blur(image, [kernel_size] * 2, [sigma.item()] * 2), atol=1e-5, rtol=0)


def test_colour_jitter_applies_each_images_ops_in_its_own_order():
    """apply_colour_jitter equals torchvision's four ops applied one image at a time in that image's order (24
    images: every order of the four ops once); a non-applied image is returned unchanged."""
    import itertools
    orders = torch.tensor(list(itertools.permutations(range(4))))                   # [24, 4]
    n = len(orders)
    images, factors = _images(n=n), torch.stack([0.6 + 0.8 * torch.rand(n), 0.6 + 0.8 * torch.rand(n),
                                                 0.6 + 0.8 * torch.rand(n), 0.2 * torch.rand(n) - 0.1], dim=1)
    applied = torch.arange(n) != 5
    out = augment.apply_colour_jitter(images, factors, orders, applied)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        expected = images[i]
        for op in orders[i].tolist() if applied[i] else []:
            expected = ops[op](expected, factors[i, op].item())
        assert torch.allclose(out[i], expected, atol=1e-5, rtol=0), i
    assert torch.equal(out[5], images[5])


def test_draw_colour_jitter_ranges_orders_and_rate():
    """draw_colour_jitter: factors within ColorJitter's ranges ([1 - s, 1 + s], hue [-s, s]), different for two
    images of a batch; each image's order is a permutation and the orders vary across the batch (all 24 appear
    among 4000 draws); applied at rate p within 4 standard deviations."""
    torch.manual_seed(0)
    n, strengths = 4000, (0.4, 0.3, 0.2, 0.1)
    factors, order, applied = augment.draw_colour_jitter(n, strengths, 0.8)
    low = torch.tensor([0.6, 0.7, 0.8, -0.1])
    assert ((factors >= low) & (factors <= low + 2 * torch.tensor(strengths))).all()
    assert (factors[0] != factors[1]).all()
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    assert len({tuple(row) for row in order.tolist()}) == 24
    assert abs(applied.float().mean().item() - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)


@pytest.mark.parametrize("framework, view", [("moco", "x1"), ("byol", "x1"), ("byol", "x2"), ("byol", "crops")])
def test_draw_augment_probabilities_hit_their_rates(framework, view):
    """Over 4000 images each random op is drawn at its rate (grayscale 0.2, the view's blur and solarize), within
    4 standard deviations (a rate off by 0.05 fails); sigma ~ U[0.1, 2]; views under 64 px draw no blur."""
    torch.manual_seed(0)
    n, recipe = 4000, augment.RECIPES[framework][view]
    params = augment.draw_augment(n, framework, view, 64)
    for name, p in (("grey", 0.2), ("blur", recipe.blur), ("solarize", recipe.solarize)):
        assert abs(params[name].float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, name
    assert 0.1 <= params["sigma"].min() and params["sigma"].max() <= 2.0 and params["sigma"].std() > 0.5
    assert not augment.draw_augment(n, framework, view, 63)["blur"].any()


def test_apply_augment_follows_its_parameters_and_normalises():
    """apply_augment: an image drawn for grayscale comes out grey; an image with nothing drawn comes out as the
    uint8 image / 255, normalised with MEAN and STD; a solarized one is inverted above 128; a blurred one equals
    gaussian_blur with its sigma and a kernel of 2 * (size // 20) + 1."""
    n, size = 4, 64
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(n, dtype=torch.bool)
    params = dict(jitter=(torch.ones(n, 4), torch.arange(4).repeat(n, 1), none), grey=torch.tensor([1, 0, 0, 0]) > 0,
                  blur=torch.tensor([0, 0, 0, 1]) > 0, sigma=torch.full((n,), 1.5), solarize=torch.tensor([0, 0, 1, 0]) > 0)
    mean, std = torch.tensor(augment.MEAN).reshape(3, 1, 1), torch.tensor(augment.STD).reshape(3, 1, 1)
    out = augment.apply_augment(images, params) * std + mean                        # back to [0, 1]
    x = images.float() / 255
    assert torch.allclose(out[0], augment.grayscale(x[:1])[0].expand(3, size, size), atol=1e-5)
    assert torch.allclose(out[1], x[1], atol=1e-5)
    assert torch.allclose(out[2], augment.solarize(x[2]), atol=1e-5)
    assert torch.allclose(out[3], TF.gaussian_blur(x[3], [7, 7], [1.5, 1.5]), atol=1e-5)


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_augment_is_a_function_of_the_torch_seed_and_differs_per_image(framework):
    """augment draws from torch's global RNG: the same seed gives the same batch; two copies of one image in a
    batch come out different (their own parameters)."""
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = image.expand(8, 3, 64, 64)
    torch.manual_seed(3)
    a = augment.augment(batch, framework, "x1")
    torch.manual_seed(3)
    assert torch.equal(a, augment.augment(batch, framework, "x1"))
    assert not torch.allclose(a[0], a[1]) and a.dtype == torch.float32


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("views", ["two", "multicrop", "mosaic"])
def test_train_step_from_uint8_batch_under_bf16_autocast(framework, views):
    """train.train_step takes the loader's uint8 batch, augments it on the device and steps, under bf16 autocast,
    for each framework x view mode: finite losses, the weights move."""
    args = train.parse_args(["--framework", framework, "--views", views, "--arch", "resnet18", "--image-size", "64",
                             "--crop-size", "32", "--batch-size", "4", "--queue-size", "0", "--lr", "0.1"])
    learner, model = train.build_learner(args, torch.device("cpu"), 1)
    optimizer = train.build_optimizer(learner, args, 0.1)
    scaler = torch.amp.GradScaler(enabled=False)
    autocast = torch.autocast("cpu", torch.bfloat16)
    M = 0 if views == "two" else 4
    g = torch.Generator().manual_seed(0)
    batch = ((torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (4, M, 3, 32, 32), dtype=torch.uint8, generator=g)), torch.zeros(4))
    before = learner.backbone.conv1.weight.detach().clone()
    losses, stop = train.train_step(batch, model, optimizer, scaler, autocast, args, torch.device("cpu"), 0, [])
    assert not stop and math.isfinite(losses["loss"].item())
    assert (losses["loss_local"] > 0) == (views != "two")
    assert not torch.equal(before, learner.backbone.conv1.weight)
