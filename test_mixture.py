"""Specifications of mixture.py (Un-Mix's flatten, CutMix between branches, box features) and of the --mix modes
of the learners and train.py. Run: python -m pytest -q test_mixture.py"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import losses
import mixture
import models
import train


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The CPU cores are shared: one intra-op thread runs tiny convolutions fastest. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _constant_images(values, C=1, size=8):
    """Row b a constant image of values[b]: [B, C, size, size] fp32."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, C, size, size).clone()


def _one_hot_images(B, size=8):
    """Row b has 1 in channel b and 0 elsewhere: a mixture's channel j is then where, and how much, image j shows."""
    return torch.eye(B)[:, :, None, None].expand(B, B, size, size).clone()


def _box_mask(box, H, W):
    """The pixel mask [H, W] of one integer box (x1, y1, x2, y2), half-open, by slicing."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = True
    return mask


# ---- partners, boxes

@pytest.mark.parametrize("B,n", [(5, 5), (8, 4), (33, 5), (2, 2)])
def test_partners_are_other_images_distinct_per_row_and_permutations(B, n):
    """partners [n-1, B]: never the row itself, distinct within a row's mixture, each of the n-1 a permutation."""
    for seed in range(5):
        torch.manual_seed(seed)
        others = mixture.partners(B, n)
        assert others.shape == (n - 1, B) and others.dtype == torch.long
        assert not (others == torch.arange(B)).any()
        for b in range(B):
            assert len(set(others[:, b].tolist())) == n - 1
        for row in others:
            assert sorted(row.tolist()) == list(range(B))


def test_partners_batch_smaller_than_mixture_raises_naming_both():
    """A mixture of n images on a batch of fewer than n is a ValueError naming both numbers."""
    with pytest.raises(ValueError, match="at least 5, got 4"):
        mixture.partners(4, 5)


@pytest.mark.parametrize("low,high", [(0.25, 0.75), (0.5, 1.0), (0.0, 1.0)])
def test_random_boxes_are_integer_inside_the_image_with_the_area_law(low, high):
    """random_boxes: fp32 integer corners inside the image, its aspect up to a pixel, area fraction >= low and
    ~ U[low, high] (sides rounded up to whole pixels)."""
    torch.manual_seed(0)
    for H, W in ((16, 32), (1024, 1024)):
        boxes = mixture.random_boxes(4000, H, W, low, high)
        assert boxes.shape == (4000, 4) and boxes.dtype == torch.float32 and torch.equal(boxes, boxes.round())
        x1, y1, x2, y2 = boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
        w, h = x2 - x1, y2 - y1
        area = w * h / (H * W)
        assert (area >= low - 1e-6).all() and ((w / W - h / H).abs() < 1 / H).all()
    # 1024 px: rounding is negligible, and the area fraction is uniform on [low, high]
    assert abs(area.mean().item() - (low + high) / 2) < 0.01 and area.max() <= high + 0.01
    assert abs((area < (low + high) / 2).float().mean().item() - 0.5) < 0.03


def test_cutmix_boxes_leave_inside_and_outside_non_empty():
    """The cutmix boxes (area U[0.25, 0.75]) on 16 px and 224 px views keep pixels inside and outside."""
    torch.manual_seed(0)
    for size in (16, 224):
        boxes = mixture.random_boxes(2000, size, size, 0.25, 0.75)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert (area > 0).all() and (area < size * size).all()


# ---- the global mixture

def test_global_mixture_of_constant_images_has_the_expected_pixel_values():
    """Eq. 3 on constant images: I_m^1 = a_1 I_2 + (1 - a_1) I_1, I_m^k = a_k I_{k+1} + (1 - a_k) I_m^{k-1}, I_n the row."""
    values = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    images = _constant_images(values, C=2)
    others = torch.tensor([[1, 2, 3, 4, 0], [2, 3, 4, 0, 1], [3, 4, 0, 1, 2]])      # [n-1 = 3, B = 5]
    shares = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.25, 0.5, 0.75, 1.0, 0.0], [0.5, 0.6, 0.7, 0.8, 1.0]])
    mixed = mixture.global_mixture(images, others, shares)
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    for b in range(5):
        sequence = [values[others[k, b]] for k in range(3)] + [values[b]]        # I_1 .. I_4
        expected = sequence[0]
        for k in range(3):
            expected = shares[k, b].item() * sequence[k + 1] + (1 - shares[k, b].item()) * expected
        torch.testing.assert_close(mixed[b], torch.full((2, 8, 8), expected), rtol=1e-6, atol=1e-6)
    # e.g. row 0: ((0.9 * 10 + 0.1 * 100) * 0.75 + 0.25 * 1000) * 0.5 + 0.5 * 1 = 132.625
    torch.testing.assert_close(mixed[0, 0, 0, 0], torch.tensor(132.625))


def test_global_mixture_main_image_share_is_the_last_coefficient():
    """On one-hot images the main image's weight is exactly shares[-1], every weight >= 0 and they sum to 1."""
    B, n = 6, 4
    torch.manual_seed(1)
    others, shares = mixture.partners(B, n), torch.rand(n - 1, B)
    mixed = mixture.global_mixture(_one_hot_images(B), others, shares)[:, :, 0, 0]      # [B, B]: weight of image j
    torch.testing.assert_close(mixed.diagonal(), shares[-1])
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(B))
    assert (mixed >= 0).all() and ((mixed > 0).sum(dim=1) <= n).all()


# ---- the region mixture

def test_region_mixture_pastes_exactly_its_masks_and_decays_the_first_context_by_lambda():
    """Eq. 4-5: I_1 in box 1, decay * I_2 around it, then I_3.. and the row (last) pasted in their boxes, exactly."""
    torch.manual_seed(2)
    B, n, H, W, decay = 5, 4, 8, 12, 0.2
    images = torch.randn(B, 3, H, W)
    others = mixture.partners(B, n)
    boxes = torch.tensor([[[0, 0, 6, 8]] * B, [[5, 2, 9, 6]] * B, [[8, 1, 12, 7]] * B], dtype=torch.float32)
    boxes[:, 1] += torch.tensor([0.0, 1, 0, 1])                                   # row 1's boxes shifted by 1 px
    mixed = mixture.region_mixture(images, others, boxes, decay)
    for b in range(B):
        sequence = [images[others[k, b]] for k in range(n - 1)] + [images[b]]
        expected = decay * sequence[1]                                             # the first context, decayed
        for k in range(n - 1):
            mask = _box_mask(boxes[k, b], H, W)
            expected = torch.where(mask, sequence[0] if k == 0 else sequence[k + 1], expected)
        assert torch.equal(mixed[b], expected)
        outside_all = ~torch.stack([_box_mask(boxes[k, b], H, W) for k in range(n - 1)]).any(0)
        assert outside_all.any() and torch.equal(mixed[b][:, outside_all], decay * images[others[1, b]][:, outside_all])
        main = _box_mask(boxes[-1, b], H, W)
        assert torch.equal(mixed[b][:, main], images[b][:, main])                 # the main image at full intensity


def test_region_mixture_of_constant_images_has_the_expected_pixel_values():
    """Constant images (n = 3, decay 0.2): a pixel row reads I_1, I_1 (box 1), 0.2 I_2 (context), the row's own value."""
    images = _constant_images([1.0, 2.0, 3.0, 4.0], size=4)
    others = torch.tensor([[1, 2, 3, 0], [2, 3, 0, 1]])                          # row b: I_1 = b+1, I_2 = b+2 (mod 4)
    boxes = torch.tensor([[[0, 0, 2, 4]] * 4, [[3, 0, 4, 4]] * 4], dtype=torch.float32)
    mixed = mixture.region_mixture(images, others, boxes, 0.2)[:, 0, 0]           # [B, 4]: one row of pixels
    for b in range(4):
        i1, i2, main = float(others[0, b] + 1), float(others[1, b] + 1), float(b + 1)
        assert mixed[b].tolist() == [i1, i1, (0.2 * torch.tensor(i2)).item(), main]


# ---- flatten

def _classify(values, mixed):
    """Per row of constant images: 'none' (unchanged), 'global' (constant, changed) or 'region' (not constant)."""
    flat = mixed.flatten(1)
    constant = (flat == flat[:, :1]).all(dim=1)
    unchanged = (flat == values[:, None]).all(dim=1)
    return unchanged, constant & ~unchanged, ~constant


def test_flatten_mixes_each_row_with_the_right_rates():
    """flatten: P(global) = p_global, P(region) = p_region, else unchanged; 4-sigma bounds that a wrong rate fails."""
    torch.manual_seed(3)
    B, H, p_global, p_region = 3000, 16, 0.4, 0.3
    values = torch.randperm(B).float() + 1
    images = _constant_images(values.tolist(), size=H)
    unchanged, mixed_global, mixed_region = _classify(values, mixture.flatten(images, p_global, p_region))
    # A region mixture whose main box covers the whole image is the image itself: count those as 'none'.
    boxes = mixture.random_boxes(200000, H, H, 0.5, 1.0)
    full = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) == H * H).float().mean().item()
    for observed, rate in ((mixed_global, p_global), (mixed_region, p_region * (1 - full)),
                           (unchanged, 1 - p_global - p_region * (1 - full))):
        assert abs(observed.float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / B)


@pytest.mark.parametrize("p_global,p_region", [(1.0, 0.0), (0.0, 1.0)])
def test_flatten_keeps_the_row_as_the_main_image(p_global, p_region):
    """Every flattened row holds its own image as the main one: global weight >= 0.5, or >= half the pixels at full
    intensity and never decayed (region); the other images are n - 1 others, never the row itself."""
    B, size = 8, 8
    for seed in range(4):
        torch.manual_seed(seed)
        mixed = mixture.flatten(_one_hot_images(B, size), p_global, p_region)   # channel j: where image j shows
        assert mixed.shape == (B, B, size, size)
        for b in range(B):
            own, shown = mixed[b, b], (mixed[b] > 0).flatten(1).any(dim=1)
            if p_global:
                assert own.min() >= 0.5 and int(shown.sum()) == 4
                torch.testing.assert_close(mixed[b].sum(dim=0), torch.ones(size, size))
            else:
                assert (own == 1).float().mean() >= 0.5 and not ((own > 0) & (own < 1)).any()
                assert int(shown.sum()) <= 5 and set(mixed[b].unique().tolist()) <= {0.0, 1.0, torch.tensor(0.2).item()}


def test_flatten_cutmix_and_box_means_read_no_value_on_the_host():
    """The mixtures run on the meta device, which has no values: no .item(), bool-mask index or data-dependent shape."""
    images = torch.randn(8, 3, 16, 16, device="meta")
    assert mixture.flatten(images).shape == images.shape
    boxes = mixture.random_boxes(8, 16, 16, 0.25, 0.75, "meta")
    assert all(x.shape == images.shape for x in mixture.cutmix(images, images, boxes))
    assert all(m.shape == (8, 5) for m in mixture.box_means(torch.randn(8, 5, 4, 4, device="meta"), boxes, 4))


def test_flatten_is_reproducible_from_the_torch_seed_and_keeps_dtype():
    """The same torch seed gives the same flattened batch; bf16 in, bf16 out."""
    images = torch.randn(6, 3, 8, 8)
    torch.manual_seed(5)
    first = mixture.flatten(images)
    torch.manual_seed(5)
    assert torch.equal(first, mixture.flatten(images)) and not torch.equal(first, images)
    assert mixture.flatten(images.bfloat16()).dtype == torch.bfloat16


# ---- CutMix between branches, box features

def test_cutmix_swaps_the_same_box_between_the_two_views():
    """x1m = x1 with the box's pixels from x2, x2m = x2 with the same pixels from x1, exactly."""
    torch.manual_seed(6)
    x1, x2 = torch.randn(3, 2, 8, 10), torch.randn(3, 2, 8, 10)
    boxes = torch.tensor([[0, 0, 5, 4], [3, 2, 10, 8], [1, 1, 2, 2]], dtype=torch.float32)
    x1m, x2m = mixture.cutmix(x1, x2, boxes)
    for b in range(3):
        mask = _box_mask(boxes[b], 8, 10)
        assert torch.equal(x1m[b], torch.where(mask, x2[b], x1[b]))
        assert torch.equal(x2m[b], torch.where(mask, x1[b], x2[b]))


def _upsampled_means(feature_map, boxes, factor):
    """The reference: nearest-upsample the map by factor, then mean over the box's pixel mask and its complement."""
    big = F.interpolate(feature_map, scale_factor=factor, mode="nearest")
    masks = torch.stack([_box_mask(box, *big.shape[2:]) for box in boxes])[:, None]
    inside = (big * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3))
    outside = (big * ~masks).sum(dim=(2, 3)) / (~masks).sum(dim=(2, 3))
    return inside, outside


@pytest.mark.parametrize("fractional", [False, True])
def test_box_means_equal_the_mask_means_of_the_nearest_upsampled_map(fractional):
    """box_means = mean over the box and over the rest of the map nearest-upsampled by stride; fractional corners too."""
    torch.manual_seed(7)
    N, C, h, w, stride = 6, 5, 4, 3, 8
    feature_map = torch.randn(N, C, h, w)
    boxes = mixture.random_boxes(N, h * stride, w * stride, 0.25, 0.75)
    if fractional:   # half-pixel corners: the reference upsamples twice as far, where they are whole pixels
        boxes = boxes + torch.tensor([0.5, 0.5, -0.5, -0.5]) * (torch.arange(N) % 2)[:, None]
    inside, outside = mixture.box_means(feature_map, boxes, stride)
    factor = 2 if fractional else 1
    expected = _upsampled_means(feature_map, boxes * factor, stride * factor)
    torch.testing.assert_close(inside, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outside, expected[1], rtol=1e-5, atol=1e-6)


def test_box_means_of_a_box_on_whole_cells_is_the_plain_mean_of_those_cells():
    """A box covering exactly cells (0..1, 1) of a 2x3 map reads their plain mean; the rest, the other 4 cells'."""
    feature_map = torch.arange(6.0).view(1, 1, 2, 3)                              # [[0, 1, 2], [3, 4, 5]]
    inside, outside = mixture.box_means(feature_map, torch.tensor([[4.0, 0, 8, 8]]), 4)
    assert inside.item() == (1 + 4) / 2 and outside.item() == (0 + 2 + 3 + 5) / 4


# ---- the learners

def _eval_learner(framework, **kwargs):
    """A tiny learner in eval mode (BN on running statistics, so hand computations see the same BN)."""
    torch.manual_seed(0)
    if framework == "moco":
        learner = models.MoCo("resnet18", "cifar", dim=8, **{"queue_size": 0, **kwargs})
    else:
        learner = models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16, **kwargs)
    return learner.eval()


def _views(B=6, size=16, seed=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g), torch.randn(B, 3, size, size, generator=g)


def test_moco_flatten_loss_is_info_nce_of_the_flattened_query_against_unmixed_keys():
    """MoCo --mix flatten: loss_global = info_nce(online(flatten(x1)), keys of the unmixed x2, own index, queue)."""
    learner = _eval_learner("moco", queue_size=12, mix="flatten", mix_global_p=0.5, mix_region_p=0.5)
    x1, x2 = _views()
    queue = learner.queue.clone()
    with torch.no_grad():
        torch.manual_seed(11)
        out = learner(x1, x2)
        torch.manual_seed(11)
        query = mixture.flatten(x1, 0.5, 0.5)
        keys = F.normalize(learner.target(x2), dim=1)
        expected = losses.info_nce(learner.online(query), keys, torch.arange(6), queue=queue, temperature=0.2)
    assert not torch.equal(query, x1)
    torch.testing.assert_close(out["loss_global"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert out["loss_mix"] == 0 and out["loss_local"] == 0


def test_byol_flatten_loss_uses_flattened_online_views_and_unmixed_targets():
    """BYOL --mix flatten: l(pred(online(flat x1)), target(x2)) + l(pred(online(flat x2)), target(x1))."""
    learner = _eval_learner("byol", mix="flatten")
    x1, x2 = _views()
    own = torch.arange(6)
    with torch.no_grad():
        torch.manual_seed(12)
        out = learner(x1, x2)
        torch.manual_seed(12)
        v1, v2 = mixture.flatten(x1), mixture.flatten(x2)
        p1, p2 = learner.predictor(learner.online(v1)), learner.predictor(learner.online(v2))
        z1, z2 = learner.target(x1), learner.target(x2)
        expected = losses.byol_loss(p1, z2, own) + losses.byol_loss(p2, z1, own)
    torch.testing.assert_close(out["loss_global"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert out["loss_mix"] == 0


def _hand_box_embeddings(encoder, images, boxes):
    """(whole, inside, outside) embeddings by hand: head conv-BN-ReLU map, nearest-upsampled mask means, MLP."""
    feature_map = encoder.head[:3](encoder.trunk(images))
    inside, outside = _upsampled_means(feature_map, boxes, encoder.trunk.stride)
    return encoder(images), encoder.head[-1](inside), encoder.head[-1](outside)


def _record_boxes(monkeypatch):
    """Record what mixture.random_boxes returns (the cutmix boxes of a forward)."""
    drawn, original = [], mixture.random_boxes
    monkeypatch.setattr(mixture, "random_boxes", lambda *args: drawn.append(original(*args)) or drawn[-1])
    return drawn


def test_moco_cutmix_loss_is_the_four_terms_by_hand_and_fills_the_three_queues(monkeypatch):
    """MoCo --mix cutmix: loss_mix = lam L_mixed + (1 - lam)(L_L<->G + L_L<->L + L_G<->G), loss = L_original + loss_mix;
    then the keys, k^L and k^G fill queue, queue_local and queue_global at the same slots."""
    B, lam, T = 6, 0.3, 0.2
    learner = _eval_learner("moco", queue_size=12, mix="cutmix", mix_weight=lam)
    drawn = _record_boxes(monkeypatch)
    x1, x2 = _views(B)
    queues = [learner.queue.clone(), learner.queue_local.clone(), learner.queue_global.clone()]
    with torch.no_grad():
        out = learner(x1, x2)
        (boxes,) = drawn
        masks = torch.stack([_box_mask(box, 16, 16) for box in boxes])[:, None]
        x1m, x2m = torch.where(masks, x2, x1), torch.where(masks, x1, x2)
        q_mixed, q_local, q_global = _hand_box_embeddings(learner.online, x1m, boxes)
        _, k_local, k_global = (F.normalize(k, dim=1) for k in _hand_box_embeddings(learner.target, x2m, boxes))
        keys = F.normalize(learner.target(x2), dim=1)
        nce = lambda q, k, queue: losses.info_nce(q, k, torch.arange(B), queue=queue, temperature=T)
        original = nce(learner.online(x1), keys, queues[0])
        mixed = nce(q_mixed, keys, queues[0])
        local_global, local_local = nce(q_local, k_global, queues[2]), nce(q_local, k_local, queues[1])
        global_global = nce(q_global, k_global, queues[2])
    expected_mix = lam * mixed + (1 - lam) * (local_global + local_local + global_global)
    torch.testing.assert_close(out["loss_global"], original, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_mix"], expected_mix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], original + expected_mix, rtol=1e-5, atol=1e-5)
    for queue, before, written in zip((learner.queue, learner.queue_local, learner.queue_global), queues,
                                      (keys, k_local, k_global)):
        torch.testing.assert_close(queue[:B], written, rtol=1e-5, atol=1e-6)
        assert torch.equal(queue[B:], before[B:])
    assert int(learner.queue_ptr) == B


def test_moco_cutmix_queues_wrap_together(monkeypatch):
    """Three steps of 6 keys into queues of 8: each queue holds the last keys at (ptr + i) mod 8; one pointer."""
    learner = _eval_learner("moco", queue_size=8, mix="cutmix")
    written, original = [], learner.enqueue
    monkeypatch.setattr(learner, "enqueue", lambda *keys: written.append(keys) or original(*keys))
    with torch.no_grad():
        for step in range(3):
            learner(*_views(6, seed=step))
    assert int(learner.queue_ptr) == 18 % 8 and all(len(keys) == 3 for keys in written)
    slots = [(6 * step + i) % 8 for step in range(3) for i in range(6)]           # later writes win
    for q, name in enumerate(learner.queues):
        expected = {slot: written[n // 6][q][n % 6] for n, slot in enumerate(slots)}
        for slot, row in expected.items():
            assert torch.equal(getattr(learner, name)[slot], row)


def test_mix_modes_register_queues_only_for_cutmix_and_byol_refuses_cutmix():
    """Only --mix cutmix adds queue_local and queue_global; BYOL(mix='cutmix') and unknown modes are ValueErrors."""
    names = lambda learner: sorted(name for name, _ in learner.named_buffers() if name.startswith("queue"))
    assert names(_eval_learner("moco", queue_size=8)) == ["queue", "queue_ptr"]
    assert names(_eval_learner("moco", queue_size=8, mix="flatten")) == ["queue", "queue_ptr"]
    assert names(_eval_learner("moco", queue_size=8, mix="cutmix")) == ["queue", "queue_global", "queue_local",
                                                                         "queue_ptr"]
    with pytest.raises(ValueError, match="cutmix"):
        models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16, mix="cutmix")
    with pytest.raises(ValueError, match="mixup"):
        models.MoCo("resnet18", "cifar", dim=8, queue_size=0, mix="mixup")


# ---- train.py

TINY = ["--dataset", "fake", "--fake-size", "32", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16",
        "--crop-size", "8", "--jitter", "2", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--queue-size", "32"]   # 4 steps per epoch


def _read_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if not r.get("final")]


@pytest.mark.parametrize("framework,mix", [("moco", "cutmix"), ("byol", "flatten")])
def test_resume_with_a_mixture_repeats_the_uninterrupted_run(tmp_path, framework, mix):
    """With --mix (and mosaic views), stopping after 1 step and resuming gives the same losses at steps 2-3."""
    flags = TINY + ["--framework", framework, "--mix", mix]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(flags + ["--max-steps", "3", "--out", straight])
    train.main(flags + ["--max-steps", "1", "--out", split])
    train.main(flags + ["--max-steps", "3", "--out", split, "--resume"])
    expected, got = _read_steps(straight), _read_steps(split)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all((r["loss_mix"] > 0) == (mix == "cutmix") for r in got)
    for a, b in zip(expected, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["loss_mix"] == pytest.approx(b["loss_mix"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("extra,fragment", [
    (["--framework", "byol", "--mix", "cutmix"], "--mix cutmix is defined for MoCo only"),
    (["--mix", "flatten", "--batch-size", "4"], "--mix flatten needs 5 images or more per process (has 4"),
    (["--mix", "flatten", "--mix-global-p", "0.6", "--mix-region-p", "0.5"], "--mix-global-p + --mix-region-p <= 1"),
    (["--mix", "flatten", "--mix-region-p", "-0.1"], "--mix-region-p -0.1 must be within [0, 1]"),
    (["--mix", "cutmix", "--framework", "moco", "--mix-weight", "2"], "--mix-weight 2.0 must be within [0, 1]"),
], ids=["byol-cutmix", "flatten-small-batch", "flatten-p-sum", "negative-p", "weight-above-1"])
def test_bad_mixture_flags_are_one_line_errors_before_any_step(tmp_path, monkeypatch, extra, fragment):
    """Bad --mix combinations stop train.main with one 'error: ...' line naming the fix, before any step."""
    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran")
    monkeypatch.setattr(models.MoCo, "forward", no_step)
    monkeypatch.setattr(models.BYOL, "forward", no_step)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--views", "two", "--out", str(tmp_path / "run")] + extra)
    message = str(error.value.code)
    assert message.startswith("error:") and "\n" not in message and fragment in message, message
