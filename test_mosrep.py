"""Tests of the MosRep reference implementation (CPU, small): the core modules, the evaluation
scripts and train.py end to end. Run: python -m pytest -q"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import roi_align

import losses
import models
import train
from eval_knn import accuracy, build_trunk, evaluate_knn, extract_features, knn_predict
from eval_linear import balanced_subset, cached_batches, frozen_features, train_probe
from models import Trunk
from mosaic import Mosaic, compose, group_crops, jitter, make_mosaic

HERE = os.path.dirname(os.path.abspath(__file__))


# ==================================================================================================
# mosaic.py, losses.py, models.py
# ==================================================================================================

# ----------------------------------------------------------------------------------------------
# helpers

@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The 2 CPU cores are shared with other jobs: intra-op threads then spin against each other and
    tiny convolutions run 2-3x slower than on one thread. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_crops(B, M, C=3, s=8, seed=0, dtype=torch.float32):
    return torch.rand(B, M, C, s, s, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _constant_crops(B, M, C=2, s=8):
    """crops[b, j] is filled with the distinct non-zero value 1 + b*M + j (all channels)."""
    values = 1.0 + torch.arange(B * M, dtype=torch.float32).view(B, M, 1, 1, 1)
    return values.expand(B, M, C, s, s).contiguous()


def _offsets_from_boxes(boxes_after, s):
    """(dx, dy) per mosaic from the moved slot-0 box, whose corner (s, s) is never clipped when
    |offset| <= s and the grid is at least 2 x 2."""
    dx = boxes_after[:, 0, 2] - s
    dy = boxes_after[:, 0, 3] - s
    return dx, dy


def _hand_shift(images, dx, dy):
    """Reference translation: out[b, :, y, x] = images[b, :, y - dy, x - dx], 0 outside."""
    out = torch.zeros_like(images)
    H, W = images.shape[-2:]
    for b in range(images.shape[0]):
        ox, oy = int(dx[b]), int(dy[b])
        ys, yd = max(0, -oy), max(0, oy)
        xs, xd = max(0, -ox), max(0, ox)
        h, w = H - abs(oy), W - abs(ox)
        if h > 0 and w > 0:
            out[b, :, yd:yd + h, xd:xd + w] = images[b, :, ys:ys + h, xs:xs + w]
    return out


def _jitter_offsets(n, max_shift, alpha, seed, s=16):
    """n mosaics' (dx, dy) from one jitter call on a blank 2x2 grid of s px slots."""
    _, boxes = compose(torch.zeros(1, 4, 1, s, s), torch.zeros(1, 4, dtype=torch.long))
    boxes = boxes.expand(n, 4, 4).contiguous()
    images = torch.zeros(n, 1, 2 * s, 2 * s)
    _, moved_boxes, _ = jitter(images, boxes, max_shift, alpha, generator=torch.Generator().manual_seed(seed))
    dx, dy = _offsets_from_boxes(moved_boxes, s)
    return torch.cat([dx, dy])


# ----------------------------------------------------------------------------------------------
# mosaic.group_crops

@pytest.mark.parametrize("B,M", [(4, 4), (5, 4), (8, 4), (9, 9), (16, 9), (3, 1), (64, 4)])
def test_group_crops_columns_are_permutations_and_rows_distinct(B, M):
    """Over 200 draws: shape [B, M], long, every column a permutation of range(B) (each crop used
    exactly once), every row M distinct images (no image twice in one mosaic)."""
    for _ in range(200):
        sources = group_crops(B, M)
        assert sources.shape == (B, M) and sources.dtype == torch.long
        assert torch.equal(sources.sort(dim=0).values, torch.arange(B)[:, None].expand(B, M))
        assert all(len(set(row)) == M for row in sources.tolist())


def test_group_crops_is_random_at_each_call():
    """Without a generator, repeated calls give different arrangements, and every image shows up
    in every slot of mosaic 0 over many draws."""
    draws = [group_crops(8, 4) for _ in range(50)]
    assert len({tuple(d.flatten().tolist()) for d in draws}) >= 45
    seen = torch.stack(draws)[:, 0, :]                        # [50, M]
    for j in range(4):
        assert len(set(seen[:, j].tolist())) >= 6


def test_group_crops_generator_reproducible_and_independent_of_global_rng():
    """The same generator seed gives the same arrangement whatever the global RNG state;
    different seeds give different arrangements."""
    torch.manual_seed(1)
    a = group_crops(16, 4, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(2)
    b = group_crops(16, 4, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    others = {tuple(group_crops(16, 4, generator=torch.Generator().manual_seed(s)).flatten().tolist())
              for s in range(10)}
    assert len(others) == 10


def test_group_crops_device_argument():
    """device= places the result there (CPU here), dtype long."""
    sources = group_crops(6, 4, device=torch.device("cpu"))
    assert sources.device.type == "cpu" and sources.dtype == torch.long


def test_group_crops_batch_smaller_than_crops_raises_with_both_numbers():
    """B < M is impossible (a mosaic needs M different images): ValueError naming B and M."""
    with pytest.raises(ValueError) as error:
        group_crops(3, 4)
    message = str(error.value)
    assert "3" in message and "4" in message
    with pytest.raises(ValueError) as error:
        group_crops(7, 9)
    message = str(error.value)
    assert "7" in message and "9" in message


# ----------------------------------------------------------------------------------------------
# mosaic.compose

@pytest.mark.parametrize("B,M,s", [(4, 4, 5), (10, 9, 3), (2, 1, 4)])
def test_compose_places_crops_pixel_exactly(B, M, s):
    """Slot j of mosaic b sits at grid row j // g, column j % g and holds crops[sources[b, j], j]."""
    g = math.isqrt(M)
    crops = _random_crops(B, M, C=3, s=s, seed=B * M)
    sources = group_crops(B, M, generator=torch.Generator().manual_seed(0))
    mosaics, _ = compose(crops, sources)
    assert mosaics.shape == (B, 3, g * s, g * s) and mosaics.dtype == crops.dtype
    for b in range(B):
        for j in range(M):
            r, c = divmod(j, g)
            tile = mosaics[b, :, r * s:(r + 1) * s, c * s:(c + 1) * s]
            assert torch.equal(tile, crops[sources[b, j], j])


def test_compose_boxes_exact():
    """boxes [B, M, 4] float = (x1, y1, x2, y2) with slot j covering [x1, x2) x [y1, y2):
    slot 0 is (0, 0, s, s); identical for every mosaic."""
    B, M, s = 10, 9, 4
    crops = _random_crops(B, M, C=1, s=s)
    _, boxes = compose(crops, group_crops(B, M))
    assert boxes.shape == (B, M, 4) and boxes.is_floating_point()
    expected = torch.tensor([[(j % 3) * s, (j // 3) * s, (j % 3 + 1) * s, (j // 3 + 1) * s]
                             for j in range(M)], dtype=boxes.dtype)
    for b in range(B):
        assert torch.equal(boxes[b], expected)
    assert boxes[0, 0].tolist() == [0.0, 0.0, float(s), float(s)]


def test_roi_align_reproduces_each_crop_from_unjittered_mosaic():
    """roi_align(output s, spatial_scale 1, sampling_ratio 1, aligned=True) at each box reads back
    exactly crops[sources[b, j], j]: the boxes follow roi_align(aligned=True)'s convention."""
    B, M, s = 6, 4, 7
    crops = _random_crops(B, M, C=3, s=s, seed=5)
    sources = group_crops(B, M)
    mosaics, boxes = compose(crops, sources)
    rois = torch.cat([torch.arange(B).repeat_interleave(M)[:, None].float(), boxes.reshape(-1, 4)], 1)
    read = roi_align(mosaics, rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    expected = crops[sources.flatten(), torch.arange(M).repeat(B)]
    torch.testing.assert_close(read, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# mosaic.jitter

def test_jitter_constant_colour_crops_fill_exactly_their_boxes():
    """With each crop a distinct constant colour: after jitter every pixel inside each moved,
    clipped box has that crop's colour, and every pixel outside all boxes is 0."""
    B, M, s = 32, 4, 6
    crops = _constant_crops(B, M, C=2, s=s)
    sources = group_crops(B, M, generator=torch.Generator().manual_seed(0))
    mosaics, boxes = compose(crops, sources)
    moved, moved_boxes, visible = jitter(mosaics, boxes, max_shift=s, generator=torch.Generator().manual_seed(1))
    assert moved.shape == mosaics.shape
    for b in range(B):
        covered = torch.zeros(moved.shape[-2:], dtype=torch.bool)
        for j in range(M):
            x1, y1, x2, y2 = [int(v) for v in moved_boxes[b, j].tolist()]
            assert moved_boxes[b, j].tolist() == [float(x1), float(y1), float(x2), float(y2)]
            colour = crops[sources[b, j], j, 0, 0, 0]
            region = moved[b, :, y1:y2, x1:x2]
            assert torch.all(region == colour), (b, j)
            covered[y1:y2, x1:x2] = True
        assert torch.all(moved[b][:, ~covered] == 0), b


def test_jitter_moves_content_and_boxes_together():
    """Random crops: the jittered mosaic equals the input translated by the offset read off the
    box shift (zero where uncovered), and each box moved by that same (dx, dy) before clipping."""
    B, M, s, max_shift = 16, 4, 8, 8
    mosaics, boxes = compose(_random_crops(B, M, C=3, s=s, seed=2), group_crops(B, M))
    moved, moved_boxes, _ = jitter(mosaics, boxes, max_shift, generator=torch.Generator().manual_seed(3))
    dx, dy = _offsets_from_boxes(moved_boxes, s)
    assert torch.equal(moved, _hand_shift(mosaics, dx, dy))
    H, W = mosaics.shape[-2:]
    shift = torch.stack([dx, dy, dx, dy], 1)[:, None, :]
    limit = torch.tensor([W, H, W, H], dtype=boxes.dtype)
    assert torch.equal(moved_boxes, torch.minimum((boxes + shift).clamp_min(0), limit))


def test_jitter_visible_matches_hand_computed_clipped_area():
    """visible [B, M] = (clipped box area) / (original area), computed here from the offsets."""
    B, M, s, max_shift = 64, 9, 5, 5
    mosaics, boxes = compose(_random_crops(B, M, C=1, s=s), group_crops(B, M))
    H, W = mosaics.shape[-2:]
    _, moved_boxes, visible = jitter(mosaics, boxes, max_shift, generator=torch.Generator().manual_seed(4))
    assert visible.shape == (B, M)
    dx, dy = _offsets_from_boxes(moved_boxes, s)
    for b in range(B):
        for j in range(M):
            x1, y1, x2, y2 = boxes[b, j].tolist()
            w = max(0.0, min(x2 + dx[b].item(), W) - max(x1 + dx[b].item(), 0))
            h = max(0.0, min(y2 + dy[b].item(), H) - max(y1 + dy[b].item(), 0))
            assert visible[b, j].item() == pytest.approx(w * h / (s * s), abs=1e-6)
    assert (visible < 1).any() and (visible == 1).any()


def test_jitter_fully_visible_crops_still_read_back_exactly():
    """After jitter, roi_align at the moved box of a fully visible crop returns the crop exactly."""
    B, M, s = 12, 4, 6
    crops = _random_crops(B, M, C=2, s=s, seed=7)
    sources = group_crops(B, M)
    mosaics, boxes = compose(crops, sources)
    moved, moved_boxes, visible = jitter(mosaics, boxes, 3, generator=torch.Generator().manual_seed(8))
    rois = torch.cat([torch.arange(B).repeat_interleave(M)[:, None].float(), moved_boxes.reshape(-1, 4)], 1)
    read = roi_align(moved, rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    expected = crops[sources.flatten(), torch.arange(M).repeat(B)]
    full = visible.flatten() == 1
    assert full.sum() >= 5
    torch.testing.assert_close(read[full], expected[full], rtol=0, atol=1e-6)


def test_jitter_offsets_are_bounded_integers_that_differ_between_mosaics():
    """Offsets are integers within [-max_shift, max_shift], drawn independently per mosaic and
    per axis (not one offset for the whole batch, not dx == dy)."""
    B, max_shift = 32, 7
    offsets = _jitter_offsets(B, max_shift, 0.5, seed=9)
    dx, dy = offsets[:B], offsets[B:]
    assert torch.equal(offsets, offsets.round())
    assert offsets.abs().max() <= max_shift
    assert len(set(dx.tolist())) > 3 and len(set(dy.tolist())) > 3
    assert not torch.equal(dx, dy)


def test_jitter_offsets_follow_arcsine_law_for_alpha_half():
    """alpha = 0.5: t = offset / max_shift is arcsine distributed: P(|t| >= 1/2) = 2/3,
    P(|t| >= 0.9) = 2 acos(0.9) / pi, mean 0, var 1/2; both extremes +-max_shift occur.
    (max_shift = 15 makes the rounding boundaries fall exactly on these thresholds.)"""
    n, max_shift = 4000, 15
    offsets = _jitter_offsets(n, max_shift, 0.5, seed=10)        # 2n samples
    N = offsets.numel()
    t = offsets / max_shift
    p_half = (offsets.abs() > max_shift / 2).float().mean().item()
    assert abs(p_half - 2 / 3) < 5 * math.sqrt(2 / 9 / N)
    p_far = (offsets.abs() >= 14).float().mean().item()
    expected_far = 2 * math.acos(0.9) / math.pi
    assert abs(p_far - expected_far) < 5 * math.sqrt(expected_far * (1 - expected_far) / N)
    assert abs(t.mean().item()) < 5 * math.sqrt(0.5 / N)
    assert abs(t.pow(2).mean().item() - 0.5) < 0.03
    assert (offsets == max_shift).any() and (offsets == -max_shift).any()


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_jitter_offsets_variance_matches_beta(alpha):
    """Beta(alpha, alpha) => Var(2u - 1) = 1 / (2 alpha + 1); alpha = 1 is uniform (P(|t|>=1/2) = 1/2)."""
    n, max_shift = 4000, 15
    offsets = _jitter_offsets(n, max_shift, alpha, seed=11)
    t = offsets / max_shift
    expected = 1 / (2 * alpha + 1) + 1 / (12 * max_shift ** 2)      # + rounding noise
    assert abs(t.pow(2).mean().item() - expected) < 0.1 * expected
    if alpha == 1.0:
        assert abs((offsets.abs() > max_shift / 2).float().mean().item() - 0.5) < 0.03


def test_jitter_large_alpha_concentrates_offsets_near_zero():
    """alpha = 50: u ~ Beta(50, 50) is tight around 1/2, so offsets stay near 0."""
    n, max_shift = 2000, 15
    offsets = _jitter_offsets(n, max_shift, 50.0, seed=12)
    assert offsets.abs().float().mean().item() < 0.2 * max_shift
    assert (offsets.abs() > max_shift / 2).float().mean().item() < 0.01
    wide = _jitter_offsets(n, max_shift, 0.5, seed=12)
    assert wide.abs().float().mean() > 3 * offsets.abs().float().mean()


def test_jitter_small_alpha_offsets_stay_finite_and_bounded():
    """alpha = 0.02 (very U-shaped, still a valid Beta): offsets stay integers in
    [-max_shift, max_shift] and nearly all sit at the extremes; no NaN from the sampler."""
    n, max_shift = 4000, 15
    offsets = _jitter_offsets(n, max_shift, 0.02, seed=28)
    assert offsets.abs().max() <= max_shift
    assert (offsets.abs() == max_shift).float().mean() > 0.9


def test_jitter_zero_max_shift_is_identity():
    """max_shift = 0: mosaics and boxes unchanged, visible all ones of shape [B, M]."""
    B, M, s = 4, 4, 5
    mosaics, boxes = compose(_random_crops(B, M, s=s), group_crops(B, M))
    out, out_boxes, visible = jitter(mosaics, boxes, 0)
    assert torch.equal(out, mosaics) and torch.equal(out_boxes, boxes)
    assert visible.shape == (B, M) and torch.all(visible == 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_jitter_keeps_dtype_and_matches_float32(dtype):
    """Low-precision (and double) mosaics come back in their own dtype, with exactly the pixels of
    the float32 path for the same generator seed."""
    B, M, s = 8, 4, 6
    crops = _random_crops(B, M, s=s, seed=13).to(dtype)
    sources = group_crops(B, M)
    mosaics, boxes = compose(crops, sources)
    assert mosaics.dtype == dtype
    moved, moved_boxes, visible = jitter(mosaics, boxes, 4, generator=torch.Generator().manual_seed(14))
    assert moved.dtype == dtype and moved_boxes.is_floating_point() and visible.is_floating_point()
    ref, ref_boxes, ref_visible = jitter(mosaics.float(), boxes, 4, generator=torch.Generator().manual_seed(14))
    assert torch.equal(moved.float(), ref) and torch.equal(moved_boxes, ref_boxes)
    assert torch.equal(visible, ref_visible)


def test_jitter_generator_reproducible():
    """The same generator seed gives the same jitter whatever the global RNG; another seed differs."""
    B, M, s = 16, 4, 6
    mosaics, boxes = compose(_random_crops(B, M, s=s), group_crops(B, M))
    torch.manual_seed(0)
    a = jitter(mosaics, boxes, 5, generator=torch.Generator().manual_seed(15))
    torch.manual_seed(1)
    b = jitter(mosaics, boxes, 5, generator=torch.Generator().manual_seed(15))
    c = jitter(mosaics, boxes, 5, generator=torch.Generator().manual_seed(16))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


# ----------------------------------------------------------------------------------------------
# mosaic.make_mosaic

def test_make_mosaic_rois_targets_weights_consistent():
    """Mosaic(images, rois, targets, weights): roi row b*M + j = (b, box of slot j in mosaic b);
    with constant-colour crops each roi's pixels have the colour of crop (targets[row], j);
    weights = sqrt(box area / s^2); targets follow group_crops' column rule."""
    B, M, s = 12, 4, 6
    crops = _constant_crops(B, M, C=1, s=s)
    out = make_mosaic(crops, max_shift=s - 1, generator=torch.Generator().manual_seed(17))
    assert isinstance(out, Mosaic)
    assert out.images.shape == (B, 1, 2 * s, 2 * s)
    assert out.rois.shape == (B * M, 5) and out.sources.shape == (B * M,) and out.weights.shape == (B * M,)
    assert torch.equal(out.rois[:, 0], torch.arange(B).repeat_interleave(M).to(out.rois.dtype))
    sources = out.sources.view(B, M)
    assert torch.equal(sources.sort(dim=0).values, torch.arange(B)[:, None].expand(B, M))
    area = (out.rois[:, 3] - out.rois[:, 1]) * (out.rois[:, 4] - out.rois[:, 2])
    torch.testing.assert_close(out.weights, (area / s ** 2).sqrt(), rtol=0, atol=1e-6)
    assert (out.weights < 1).any()
    for row in range(B * M):
        b, j = divmod(row, M)
        x1, y1, x2, y2 = [int(v) for v in out.rois[row, 1:].tolist()]
        colour = crops[out.sources[row], j, 0, 0, 0]
        assert torch.all(out.images[b, :, y1:y2, x1:x2] == colour), row


def test_make_mosaic_without_jitter_reads_back_crops():
    """max_shift = 0: roi_align at the rois returns crops[targets[row], row % M] exactly, weights 1."""
    B, M, s = 5, 4, 6
    crops = _random_crops(B, M, C=3, s=s, seed=18)
    out = make_mosaic(crops, max_shift=0)
    read = roi_align(out.images, out.rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(read, crops[out.sources, torch.arange(M).repeat(B)], rtol=0, atol=1e-6)
    assert torch.all(out.weights == 1)


def test_make_mosaic_generator_reproducible():
    """make_mosaic with equal generator seeds gives identical Mosaics; another seed differs."""
    crops = _random_crops(8, 4, s=6)
    a = make_mosaic(crops, 4, generator=torch.Generator().manual_seed(19))
    b = make_mosaic(crops, 4, generator=torch.Generator().manual_seed(19))
    c = make_mosaic(crops, 4, generator=torch.Generator().manual_seed(20))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not (torch.equal(a.sources, c.sources) and torch.equal(a.rois, c.rois))


# ----------------------------------------------------------------------------------------------
# losses

def _hand_info_nce(q, k, targets, queue, T, weights=None):
    q, k = q.double(), k.double()
    logits = q @ k.T
    if queue is not None:
        logits = torch.cat([logits, q @ queue.double().T], 1)
    logits = logits / T
    per = torch.stack([torch.logsumexp(logits[n], 0) - logits[n, targets[n]] for n in range(len(q))])
    if weights is not None:
        per = weights.double() * per
    return per.mean()


@pytest.mark.parametrize("with_queue", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_info_nce_matches_hand_computation(with_queue, with_weights):
    """mean(w * (logsumexp([q.K, q.queue] / T) - q.K[target] / T)) computed by hand in float64."""
    g = torch.Generator().manual_seed(21)
    N, K, Q, D, T = 6, 4, 5, 8, 0.2
    q = F.normalize(torch.randn(N, D, generator=g), dim=1)
    k = F.normalize(torch.randn(K, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(Q, D, generator=g), dim=1) if with_queue else None
    targets = torch.tensor([0, 1, 2, 3, 1, 0])
    weights = torch.rand(N, generator=g) if with_weights else None
    got = losses.info_nce(q, k, targets, weights, queue=queue, temperature=T)
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _hand_info_nce(q, k, targets, queue, T, weights),
                               rtol=1e-5, atol=1e-6)


def test_info_nce_orthogonal_queries_give_log_of_candidates():
    """Queries orthogonal to every key and queue entry: all logits 0, loss = log(K + Q)."""
    D, K, Q = 8, 3, 5
    g = torch.Generator().manual_seed(22)
    q = torch.eye(D)[:2]                                          # e0, e1
    k = F.normalize(torch.cat([torch.zeros(K, 2), torch.randn(K, D - 2, generator=g)], 1), dim=1)
    queue = F.normalize(torch.cat([torch.zeros(Q, 2), torch.randn(Q, D - 2, generator=g)], 1), dim=1)
    got = losses.info_nce(q, k, torch.tensor([0, 2]), queue=queue, temperature=0.2)
    assert got.item() == pytest.approx(math.log(K + Q), abs=1e-6)
    assert losses.info_nce(q, k, torch.tensor([1, 1]), temperature=0.07).item() == pytest.approx(math.log(K), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_info_nce_fp32_for_low_precision_inputs(dtype):
    """fp16/bf16 queries, keys and queue give an fp32 loss equal to the fp32 computation on the
    same (upcast) values, with no overflow at T = 0.05."""
    g = torch.Generator().manual_seed(23)
    q = F.normalize(torch.randn(8, 16, generator=g), dim=1).to(dtype)
    k = F.normalize(torch.randn(8, 16, generator=g), dim=1).to(dtype)
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1).to(dtype)
    targets = torch.arange(8)
    got = losses.info_nce(q, k, targets, queue=queue, temperature=0.05)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    ref = losses.info_nce(q.float(), k.float(), targets, queue=queue.float(), temperature=0.05)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_info_nce_is_fp32_inside_autocast(dtype):
    """Inside an autocast region (train.py runs the learner under bf16 autocast by default),
    info_nce still computes its logits in fp32: it equals the plain fp32 result closely."""
    g = torch.Generator().manual_seed(29)
    k = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    q = F.normalize(k + 0.3 * torch.randn(64, 128, generator=g), dim=1)
    queue = F.normalize(torch.randn(1024, 128, generator=g), dim=1)
    targets = torch.arange(64)
    ref = losses.info_nce(q, k, targets, queue=queue, temperature=0.2)
    with torch.autocast("cpu", dtype=dtype):
        got = losses.info_nce(q, k, targets, queue=queue, temperature=0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_byol_loss_is_fp32_inside_autocast():
    """Inside bf16 autocast byol_loss equals the plain fp32 result."""
    g = torch.Generator().manual_seed(30)
    p, z = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    ref = losses.byol_loss(p, z, torch.arange(64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.byol_loss(p, z, torch.arange(64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_byol_loss_equal_zero_opposite_four_and_scale_invariant():
    """2 - 2 cos: 0 for equal directions (any scale), 4 for opposite ones, 2 for orthogonal."""
    g = torch.Generator().manual_seed(24)
    z = torch.randn(5, 7, generator=g)
    idx = torch.arange(5)
    assert losses.byol_loss(3 * z, z, idx).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.byol_loss(-z, 0.5 * z, idx).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(4)
    assert losses.byol_loss(e[:2], e[2:], torch.tensor([0, 1])).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_loss_targets_index_and_weights():
    """Prediction n is compared to target_embeddings[targets[n]]; result = mean(w * (2 - 2 cos))."""
    g = torch.Generator().manual_seed(25)
    p = torch.randn(6, 5, generator=g)
    z = torch.randn(3, 5, generator=g)
    targets = torch.tensor([2, 0, 1, 1, 2, 0])
    w = torch.rand(6, generator=g)
    per = 2 - 2 * F.cosine_similarity(p.double(), z.double()[targets], dim=1)
    assert losses.byol_loss(p, z, targets, w).item() == pytest.approx((w.double() * per).mean().item(), abs=1e-6)
    assert losses.byol_loss(p, z, targets).item() == pytest.approx(per.mean().item(), abs=1e-6)


def test_byol_loss_no_gradient_to_targets():
    """Stop-gradient: after backward, target_embeddings.grad is None and predictions.grad is set."""
    p = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    losses.byol_loss(p, z, torch.arange(4), torch.rand(4)).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_byol_loss_fp32_for_low_precision_inputs(dtype):
    """fp16/bf16 inputs give an fp32 scalar equal to the fp32 computation on the upcast values."""
    g = torch.Generator().manual_seed(26)
    p, z = torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype)
    got = losses.byol_loss(p, z, torch.arange(8))
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, losses.byol_loss(p.float(), z.float(), torch.arange(8)))


# ----------------------------------------------------------------------------------------------
# models: Trunk, Head, Encoder, load_trunk

@pytest.mark.parametrize("arch,stem,size,channels,stride", [
    ("resnet18", "imagenet", 64, 512, 32), ("resnet18", "cifar", 32, 512, 8),
    ("resnet50", "imagenet", 64, 2048, 32), ("resnet50", "cifar", 16, 2048, 8)])
def test_trunk_stride_and_output_shape(arch, stem, size, channels, stride):
    """Trunk returns the un-pooled C5 map [N, C, H/stride, W/stride]; .stride is the real ratio."""
    trunk = models.Trunk(arch, stem).eval()
    assert trunk.stride == stride and trunk.out_channels == channels
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, size, size))
    assert out.shape == (2, channels, size // stride, size // stride)
    assert trunk.pooled(torch.randn(2, 3, size, size)).shape == (2, channels)


def test_trunk_rejects_unknown_arch_and_stem():
    """Unknown arch or stem: ValueError."""
    with pytest.raises(ValueError):
        models.Trunk("resnet7", "imagenet")
    with pytest.raises(ValueError):
        models.Trunk("resnet18", "tiny")


def _randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_trunk_state_dict_loads_into_torchvision_resnet(stem):
    """The trunk's state_dict loads into torchvision.models.resnet18() (conv1 swapped for the cifar
    stem) with missing keys exactly fc.weight/fc.bias and nothing unexpected, and the torchvision
    net without avgpool/fc then computes the same C5 map."""
    trunk = models.Trunk("resnet18", stem).eval()
    _randomise_bn(trunk)
    net = torchvision.models.resnet18()
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    result = net.load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    features = nn.Sequential(*list(net.children())[:-2]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features(x), trunk(x))


def test_load_trunk_backbone_checkpoint_random_and_errors(tmp_path):
    """load_trunk reads a torchvision-keyed backbone.pth (fc.* ignored), a train.py checkpoint
    ({'model': learner state, 'args': {...}}), 'random'; a missing file or another arch/stem
    raises ValueError."""
    net = torchvision.models.resnet18()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    trunk = models.load_trunk(str(path), "resnet18", "imagenet")
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key
    assert isinstance(models.load_trunk("random", "resnet18", "cifar"), models.Trunk)
    with pytest.raises(ValueError):
        models.load_trunk(str(tmp_path / "nope.pth"), "resnet18", "imagenet")
    with pytest.raises(ValueError):
        models.load_trunk(str(path), "resnet50", "imagenet")
    with pytest.raises(ValueError):
        models.load_trunk(str(path), "resnet18", "cifar")        # conv1 is 7x7 in the file
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=16)
    _randomise_bn(learner.online.trunk, seed=3)
    ckpt = tmp_path / "checkpoint.pth"
    models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet18", "stem": "cifar"})
    loaded = models.load_trunk(str(ckpt), "resnet18", "cifar")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, learner.online.trunk.state_dict()[key]), key
    with pytest.raises(ValueError):
        models.load_trunk(str(ckpt), "resnet18", "imagenet")


def test_head_shapes():
    """Head: [N, C, h, w] -> [N, out_dim] for a C5 map and a 7x7 RoI map alike."""
    head = models.Head(64, 32, 16, mlp_batch_norm=True)
    assert head(torch.randn(3, 64, 7, 7)).shape == (3, 16)
    assert head(torch.randn(3, 64, 2, 2)).shape == (3, 16)


def _small_mosaic(B=4, M=4, s=8, seed=0, max_shift=2):
    crops = torch.randn(B, M, 3, s, s, generator=torch.Generator().manual_seed(seed))
    return crops, make_mosaic(crops, max_shift, generator=torch.Generator().manual_seed(seed + 1))


def test_encoder_embed_local_shapes_targets_weights():
    """embed_local(Mosaic) -> ([B*M, D], mosaic.targets, mosaic.weights);
    embed_local(crops [B, M, C, s, s]) -> ([B*M, D], row b*M+j -> image b, None)."""
    enc = models.Encoder(models.Trunk("resnet18", "cifar"), hidden_dim=32, out_dim=16, mlp_batch_norm=True)
    crops, mos = _small_mosaic()
    z, targets, weights = enc.embed_local(mos)
    assert z.shape == (16, 16) and torch.equal(targets, mos.sources) and torch.equal(weights, mos.weights)
    z, targets, weights = enc.embed_local(crops)
    assert z.shape == (16, 16) and weights is None
    assert torch.equal(targets, torch.arange(4).repeat_interleave(4))


def test_encoder_embed_local_crops_match_separate_encoding():
    """Multi-crop baseline in eval mode: row b*M+j is the encoding of crops[b, j] on its own."""
    enc = models.Encoder(models.Trunk("resnet18", "cifar"), hidden_dim=32, out_dim=16, mlp_batch_norm=True).eval()
    crops = torch.randn(3, 4, 3, 8, 8)
    with torch.no_grad():
        z, _, _ = enc.embed_local(crops)
        torch.testing.assert_close(z[2 * 4 + 1], enc(crops[2, 1:2])[0], rtol=1e-4, atol=1e-5)


def test_encoder_embed_local_mosaic_rows_read_their_own_mosaic():
    """Eval mode: changing mosaic 1's pixels changes only roi rows M..2M-1 (rois index the right
    mosaic of the batch)."""
    enc = models.Encoder(models.Trunk("resnet18", "cifar"), hidden_dim=32, out_dim=16, mlp_batch_norm=False).eval()
    _, mos = _small_mosaic(B=4)
    images = mos.images.clone()
    images[1] = torch.randn_like(images[1])
    with torch.no_grad():
        a, _, _ = enc.embed_local(mos)
        b, _, _ = enc.embed_local(mos._replace(images=images))
    changed = (a - b).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 4 + [False] * 8


class _IdentityTrunk(nn.Module):
    """A stand-in trunk: 1x1 identity conv (so autocast gives a low-precision map), stride 1."""
    stride = 1

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])

    def forward(self, x):
        return self.conv(x)


class _Recorder(nn.Module):
    def forward(self, maps):
        self.maps = maps
        return maps.flatten(1)


def test_encoder_embed_local_rois_exact_under_bf16_autocast():
    """Under bf16 autocast (train.py's default on CUDA) every roi must still read its own mosaic at
    its own box: batch indices and coordinates above 256 are not representable in bf16, so the
    rois must not be cast to the feature map's dtype. 260 mosaics, checked at mosaic 257."""
    B, M, s = 260, 4, 4
    enc = models.Encoder(models.Trunk("resnet18", "cifar"), hidden_dim=8, out_dim=8, mlp_batch_norm=False, roi_size=s).eval()
    enc.trunk = _IdentityTrunk()
    enc.head = _Recorder()
    crops = torch.rand(B, M, 3, s, s, generator=torch.Generator().manual_seed(27))
    mos = make_mosaic(crops, 0)
    with torch.no_grad():
        enc.embed_local(mos)
        exact = enc.head.maps.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc.embed_local(mos)
        low = enc.head.maps.float()
    rows = slice(257 * M, 258 * M)
    torch.testing.assert_close(low[rows], exact[rows], rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------------------------
# models: learners (EMA, queue, keys, losses)

def _images(n, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _perturb(module, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_update_target_is_exact_ema_step(framework):
    """One update_target(m) moves every target parameter by exactly (1 - m)(online - target);
    online parameters are untouched; target parameters never require grad."""
    torch.manual_seed(0)
    learner = (models.MoCo("resnet18", "cifar", dim=8, queue_size=0) if framework == "moco"
               else models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16))
    online = dict(learner.online.named_parameters())
    target = dict(learner.target.named_parameters())
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) for k in online)     # target starts as a copy
    assert not any(p.requires_grad for p in target.values())
    _perturb(learner.online, seed=1)
    online_before = {k: v.detach().clone() for k, v in online.items()}
    target_before = {k: v.detach().clone() for k, v in target.items()}
    m = 0.9
    learner.update_target(m)
    for k in online:
        expected = target_before[k] + (1 - m) * (online_before[k] - target_before[k])
        torch.testing.assert_close(target[k], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(online[k], online_before[k])
    moved = sum((target[k] - target_before[k]).abs().sum() for k in online)
    assert moved > 0


def test_byol_target_excludes_predictor():
    """BYOL's target is the EMA of trunk + head only; the predictor has no target copy."""
    learner = models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16)
    assert not any(k.startswith("predictor") for k, _ in learner.target.named_parameters())
    assert sum(p.numel() for p in learner.target.parameters()) == sum(p.numel() for p in learner.online.parameters())


def test_moco_queue_buffer_and_wraparound():
    """MoCo registers queue [Q, D] (unit rows) and a long queue_ptr; enqueue writes at the pointer
    and wraps around the end; a batch larger than the queue is a ValueError."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=10)
    buffers = dict(learner.named_buffers())
    assert buffers["queue"].shape == (10, 8) and buffers["queue_ptr"].dtype == torch.long
    torch.testing.assert_close(learner.queue.norm(dim=1), torch.ones(10))
    assert int(learner.queue_ptr) == 0
    k1, k2, k3 = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(3))
    learner.enqueue(k1)
    assert torch.equal(learner.queue[:4], k1) and int(learner.queue_ptr) == 4
    learner.enqueue(k2)
    assert torch.equal(learner.queue[4:8], k2) and int(learner.queue_ptr) == 8
    learner.enqueue(k3)                                  # 2 at the end, 2 wrapped to the front
    assert torch.equal(learner.queue[8:10], k3[:2])
    assert torch.equal(learner.queue[0:2], k3[2:])
    assert torch.equal(learner.queue[2:4], k1[2:])
    assert torch.equal(learner.queue[4:8], k2)
    assert int(learner.queue_ptr) == 2
    k4 = F.normalize(torch.randn(10, 8), dim=1)
    learner.enqueue(k4)                                  # exactly one lap
    assert torch.equal(learner.queue, torch.cat([k4[8:], k4[:8]])) and int(learner.queue_ptr) == 2
    with pytest.raises(ValueError):
        learner.enqueue(torch.randn(11, 8))


def test_moco_keys_in_original_order_eval_many_chunks():
    """keys() undoes its shuffle: in eval mode (per-sample BN) with 4 shuffle chunks, keys equal
    normalize(target(x_k)) row for row."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=0, min_shuffle_chunk=2).eval()
    _randomise_bn(learner.target)
    x = _images(8)
    with torch.no_grad():
        expected = F.normalize(learner.target(x), dim=1)
    keys = learner.keys(x)
    assert keys.shape == (8, 8) and keys.dtype == torch.float32
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)


def test_moco_keys_in_original_order_train_one_chunk():
    """Train mode, one shuffle chunk (batch < 2 * min_shuffle_chunk): BN batch statistics do not
    depend on order, so keys equal normalize(target(x_k)) row for row."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=0, min_shuffle_chunk=16)
    x = _images(8, seed=1)
    keys = learner.keys(x)
    with torch.no_grad():
        expected = F.normalize(learner.target(x), dim=1)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_moco_forward_losses_match_hand_computation(local_mode):
    """Eval mode: loss_global = info_nce(q, K, own index, queue before the step, T); loss_local =
    info_nce(crop embeddings, K, source index, queue, T, weights) (0 without local views);
    loss = sum; then the keys of x_k are enqueued at the pointer, in order."""
    torch.manual_seed(0)
    B, M = 4, 4
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=12, temperature=0.2).eval()
    _perturb(learner.online, seed=2, scale=0.05)
    crops, mos = _small_mosaic(B, M)
    local = {"none": None, "mosaic": mos, "crops": crops}[local_mode]
    xq, xk = _images(B, seed=3), _images(B, seed=4)
    queue = learner.queue.clone()
    with torch.no_grad():
        q = F.normalize(learner.online(xq), dim=1)
        k = F.normalize(learner.target(xk), dim=1)
        expected_global = losses.info_nce(q, k, torch.arange(B), queue=queue, temperature=0.2)
        expected_local = torch.tensor(0.0)
        if local is not None:
            z, src, w = learner.online.embed_local(local)
            expected_local = losses.info_nce(z, k, src, w, queue=queue, temperature=0.2)
        out = learner(xq, xk, local)
    assert set(out) >= {"loss", "loss_global", "loss_local"}
    assert all(out[n].dim() == 0 for n in ("loss", "loss_global", "loss_local"))
    torch.testing.assert_close(out["loss_global"], expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_local"], expected_local.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["loss_global"] + out["loss_local"])
    torch.testing.assert_close(learner.queue[:B], k, rtol=1e-5, atol=1e-6)
    assert torch.equal(learner.queue[B:], queue[B:]) and int(learner.queue_ptr) == B


@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_byol_forward_losses_match_hand_computation(local_mode):
    """Eval mode: loss_global = l(p1, z2) + l(p2, z1) (a sum, not a mean); loss_local =
    mean_c w (l(p_c, z1[src]) + l(p_c, z2[src])); loss = sum of the two."""
    torch.manual_seed(0)
    B, M = 4, 4
    learner = models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16).eval()
    _perturb(learner.online, seed=5, scale=0.05)
    crops, mos = _small_mosaic(B, M)
    local = {"none": None, "mosaic": mos, "crops": crops}[local_mode]
    x1, x2 = _images(B, seed=6), _images(B, seed=7)
    own = torch.arange(B)
    with torch.no_grad():
        p1, p2 = learner.predictor(learner.online(x1)), learner.predictor(learner.online(x2))
        z1, z2 = learner.target(x1), learner.target(x2)
        expected_global = losses.byol_loss(p1, z2, own) + losses.byol_loss(p2, z1, own)
        expected_local = torch.tensor(0.0)
        if local is not None:
            z, src, w = learner.online.embed_local(local)
            p = learner.predictor(z)
            expected_local = losses.byol_loss(p, z1, src, w) + losses.byol_loss(p, z2, src, w)
        out = learner(x1, x2, local)
    torch.testing.assert_close(out["loss_global"], expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_local"], expected_local.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["loss_global"] + out["loss_local"])


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_no_gradient_reaches_target_and_parts_are_detached(framework):
    """After backward of 'loss' (mosaic views): online params have grads, target params none;
    loss_global / loss_local are detached reports."""
    torch.manual_seed(0)
    learner = (models.MoCo("resnet18", "cifar", dim=8, queue_size=8) if framework == "moco"
               else models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16))
    _, mos = _small_mosaic(4, 4)
    out = learner(_images(4, seed=8), _images(4, seed=9), mos)
    assert out["loss"].requires_grad
    assert not out["loss_global"].requires_grad and not out["loss_local"].requires_grad
    out["loss"].backward()
    assert all(p.grad is None for p in learner.target.parameters())
    assert learner.online.trunk.conv1.weight.grad is not None
    assert learner.online.trunk.conv1.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# a few SGD steps lower the loss on a fixed batch, in every view mode

@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_few_sgd_steps_lower_the_loss(framework, local_mode):
    """Tiny resnet18 (cifar stem), 8 images of 32 px, M = 4 crops of 16 px (mosaic jittered with a
    fixed generator): plain SGD (MoCo lr 0.01, queue 0; BYOL lr 0.05, hidden 256), EMA 0.99 after
    each step, lowers the total loss on the fixed batch: mean of the last two < ratio x the first.
    (MoCo at T = 0.2 on a batch of 8 oscillates at lr >= 0.02, hence its smaller lr.)"""
    torch.manual_seed(0)
    B, M = 8, 4
    x1, x2 = _images(B, size=32, seed=10), _images(B, size=32, seed=11)
    crops = torch.randn(B, M, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    local = {"none": None, "crops": crops,
             "mosaic": make_mosaic(crops, 4, generator=torch.Generator().manual_seed(13))}[local_mode]
    if framework == "moco":
        learner, lr, steps, ratio = models.MoCo("resnet18", "cifar", dim=32, queue_size=0), 0.01, 6, 0.93
    else:
        learner, lr, steps, ratio = models.BYOL("resnet18", "cifar", dim=32, hidden_dim=256), 0.05, 5, 0.6
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        out = learner(x1, x2, local)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        learner.update_target(0.99)
        history.append(out["loss"].item())
    assert all(math.isfinite(v) for v in history)
    if local_mode != "none":
        assert out["loss_local"] > 0
    assert sum(history[-2:]) / 2 < ratio * history[0], history



# ==================================================================================================
# eval_knn.py and eval_linear.py
# ==================================================================================================



def test_knn_predict_hand_computed():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.0], [0.0, 3.0]])              # not normalised: knn_predict normalises
    scores = knn_predict(train, labels, test, k=2, temperature=0.5, num_classes=3)
    # test 0: nearest are train 0 (cos 1, class 0) and train 2 (cos 0.6, class 1)
    # test 1: nearest are train 1 (cos 1, class 1) and train 2 (cos 0.8, class 1)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(0.6 / 0.5), 0.0],
                             [0.0, math.exp(1 / 0.5) + math.exp(0.8 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_ties():
    # two identical neighbours of classes 1 and 0: equal scores, the lower class index ranks first
    train, labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0])
    scores = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), k=2, temperature=0.07, num_classes=2)
    assert scores[0, 0] == scores[0, 1]
    assert accuracy(scores, torch.tensor([0])) == (100.0, 100.0)
    assert accuracy(scores, torch.tensor([1])) == (0.0, 100.0)
    # neighbours tied at the k-th place with the same class: the score does not depend on which is taken
    train, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    scores = knn_predict(train, labels, torch.tensor([[0.0, 1.0]]), k=1, temperature=0.1, num_classes=2)
    torch.testing.assert_close(scores, torch.tensor([[0.0, math.exp(10.0)]]))


def test_k_larger_than_train_set_and_top5_with_few_classes():
    torch.manual_seed(0)
    train, labels, test = torch.randn(3, 8), torch.tensor([0, 1, 2]), torch.randn(4, 8)
    torch.testing.assert_close(knn_predict(train, labels, test, 200, 0.07, 3), knn_predict(train, labels, test, 3, 0.07, 3))
    results = evaluate_knn(train, labels, test, torch.tensor([0, 1, 2, 0]), [1, 5, 200], 0.07, num_classes=3)
    assert set(results) == {1, 5, 200}
    assert all(r["top5"] == 100.0 for r in results.values())   # top-5 of 3 classes is every class
    assert results[5] == results[200]                          # both clamp to k = 3


def test_top5_with_k_below_5():
    # k = 1 votes for one class only; the other four of the top 5 are zero-score classes, lowest index first
    train, labels = torch.eye(3), torch.tensor([7, 1, 2])
    test = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.1, 0.0]])
    scores = knn_predict(train, labels, test, k=1, temperature=0.07, num_classes=10)
    assert (scores > 0).sum() == 2 and scores[0, 7] > 0
    assert accuracy(scores, torch.tensor([2, 8])) == (0.0, 50.0)   # top 5: 7, 0, 1, 2, 3
    assert evaluate_knn(train, labels, test, torch.tensor([7, 3]), [1], 0.07, 10)[1] == {"top1": 50.0, "top5": 100.0}


def test_one_image_test_set():
    train, labels = torch.eye(4), torch.tensor([0, 1, 2, 3])
    results = evaluate_knn(train, labels, torch.tensor([[0.0, 1.0, 0.1, 0.0]]), torch.tensor([1]), [1, 20], 0.07, 4)
    assert results[1] == {"top1": 100.0, "top5": 100.0}


def test_chunked_equals_unchunked():
    torch.manual_seed(0)
    train, labels, test = torch.randn(60, 16), torch.randint(0, 5, (60,)), torch.randn(37, 16)
    full = knn_predict(train, labels, test, 7, 0.07, 5, chunk_size=1000)
    for chunk_size in (1, 5, 36):
        # equal up to float rounding: a matmul of 1 row and of 37 rows may sum in another order
        torch.testing.assert_close(knn_predict(train, labels, test, 7, 0.07, 5, chunk_size=chunk_size), full, rtol=1e-5, atol=0)
    test_labels = torch.randint(0, 5, (37,))
    assert (evaluate_knn(train, labels, test, test_labels, [1, 7], 0.07, 5, chunk_size=4)
            == evaluate_knn(train, labels, test, test_labels, [1, 7], 0.07, 5, chunk_size=1000))


def test_probe_leaves_trunk_bn_statistics_unchanged():
    torch.manual_seed(0)
    trunk = Trunk("resnet18", "cifar").train()                  # left in train mode on purpose
    before = {name: buffer.clone() for name, buffer in trunk.named_buffers()}
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.tensor([0, 1] * 4)), batch_size=4)
    val_features, val_labels = extract_features(trunk, loader, "cpu")
    results = train_probe(lambda epoch: frozen_features(trunk, loader, "cpu"), len(loader), val_features, val_labels,
                          trunk.out_channels, 2, [0.1], epochs=1)
    assert results[0]["best_epoch"] == 1
    for name, buffer in trunk.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert all(p.grad is None for p in trunk.parameters())


def test_balanced_subset():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 30)
    subset = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [2, 2, 3]
    assert torch.equal(subset, balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(subset, balanced_subset(labels, 0.1, seed=1))
    assert len(balanced_subset(labels, 1.0, seed=0)) == 70
    for fraction in (0.01, 0.0, 1.5):                           # 0.01 * 20 rounds to no image
        with pytest.raises(ValueError, match="label-fraction"):
            balanced_subset(labels, fraction, seed=0)


def test_probe_separates_separable_features():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 5

    def sample(n):
        labels = torch.arange(3).repeat(n)
        return centres[labels] + torch.randn(len(labels), 16), labels

    (train, labels), (val, val_labels) = sample(40), sample(20)
    generator = torch.Generator().manual_seed(0)
    results = train_probe(lambda epoch: cached_batches(train, labels, 32, generator), 4, val, val_labels,
                          16, 3, [0.1, 1.0], epochs=10)
    assert max(r["best_top1"] for r in results) == 100.0
    assert all(r["best_top5"] == 100.0 for r in results)


def test_weights_of_another_arch_exit_with_one_line(tmp_path):
    path = str(tmp_path / "backbone.pth")
    torch.save(Trunk("resnet18", "cifar").state_dict(), path)
    with pytest.raises(SystemExit, match="resnet34"):
        build_trunk(argparse.Namespace(weights=path, arch="resnet34", stem="cifar"), "cpu")


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """train/ and val/ folders of three classes of 32 px images, coloured by class."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 3)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            os.makedirs(root / split / f"class{c}")
            for i in range(count):
                noise = torch.randint(-20, 20, (32, 32, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, script), "--weights", "random", "--arch", "resnet18",
                           "--stem", "cifar", "--image-size", "32", "--workers", "0", "--batch-size", "16", *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})   # tiny batches: threads only add overhead


def test_knn_cli(image_folders, tmp_path):
    out = tmp_path / "knn.json"
    done = run("eval_knn.py", "--dataset", "imagefolder", "--data", image_folders / "train",
               "--val-data", image_folders / "val", "--k", 1, 5, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (18, 9, 3)
    assert set(result["knn"]) == {"1", "5"}
    assert all(0 <= r[key] <= 100 for r in result["knn"].values() for key in ("top1", "top5"))


def test_linear_cli_cached(image_folders, tmp_path):
    out = tmp_path / "linear.json"
    done = run("eval_linear.py", "--dataset", "imagefolder", "--data", image_folders / "train",
               "--val-data", image_folders / "val", "--epochs", 2, "--lr", 0.1, 1, "--label-fraction", 0.5, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_val"], len(result["heads"])) == (9, 9, 2)
    for head in result["heads"]:
        assert 1 <= head["best_epoch"] <= 2
        assert all(0 <= head[key] <= 100 for key in ("best_top1", "best_top5", "last_top1", "last_top5"))


def test_missing_val_dir_is_a_one_line_error(image_folders):
    missing = image_folders / "no-such-split"
    done = run("eval_knn.py", "--dataset", "imagefolder", "--data", image_folders / "train", "--val-data", missing)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(missing) in done.stderr



# ==================================================================================================
# train.py end to end: frameworks x view modes, DDP, resume, export, bad input, real images
# ==================================================================================================

TINY = ["--dataset", "fake", "--fake-size", "32", "--arch", "resnet18", "--stem", "cifar", "--image-size", "32",
        "--crop-size", "16", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if not r.get("final")], [r for r in records if r.get("final")]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("views", ["two", "multicrop", "mosaic"])
def test_every_framework_and_view_mode_trains(tmp_path, framework, views):
    """Two steps of each combination run, log finite losses, and write checkpoint + backbone."""
    out = str(tmp_path)
    assert train.main(TINY + ["--framework", framework, "--views", views, "--queue-size", "32",
                              "--max-steps", "2", "--out", out]) == 0
    steps, _ = read_log(out)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all((r["loss_local"] == 0) == (views == "two") for r in steps)
    state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert state["step"] == 2 and state["args"]["views"] == views


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """Stopping after 3 steps and resuming gives the same losses at steps 4-6 (across an epoch end)."""
    flags = TINY + ["--fake-size", "32", "--framework", "byol"]   # 4 steps per epoch
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(flags + ["--max-steps", "6", "--out", straight])
    train.main(flags + ["--max-steps", "3", "--out", split])
    train.main(flags + ["--max-steps", "6", "--out", split, "--resume"])
    expected, _ = read_log(straight)
    got, _ = read_log(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["lr"] == b["lr"] and a["ema"] == b["ema"]


def test_exported_backbone_loads_into_torchvision(tmp_path):
    """backbone.pth is a plain torchvision state_dict: only fc.* is missing."""
    out = str(tmp_path)
    train.main(["--dataset", "fake", "--fake-size", "8", "--arch", "resnet18", "--image-size", "64",
                "--crop-size", "32", "--batch-size", "4", "--workers", "0", "--max-steps", "1", "--out", out])
    state = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    learner = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["learner"]
    assert torch.equal(state["layer4.1.conv2.weight"], learner["online.trunk.layer4.1.conv2.weight"])


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) trains and ends with bit-identical weights on both ranks."""
    out = str(tmp_path)
    result = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py",
                     *TINY, "--framework", "moco", "--queue-size", "32", "--max-steps", "3", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    steps, (final,) = read_log(out)
    assert len(final["rank_checksums"]) == 2 and final["ranks_identical"]
    assert [r["step"] for r in steps] == [1, 2, 3]


BAD_INPUTS = [
    (["--data", "/no/such/folder", "--dataset", "imagefolder"], "does not exist"),
    (["--batch-size", "2"], "per-process batch 2 is smaller than --crops 4"),
    (["--crops", "3"], "--crops 3 is not a perfect square"),
    (["--jitter", "16"], "must be smaller than --crop-size 16"),
    (["--image-size", "64"], "set --crop-size 32"),
    (["--framework", "moco", "--queue-size", "4"], "smaller than the global batch"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_names_the_fix(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message.replace("-", r"\-")):
        train.main(TINY + ["--out", str(tmp_path)] + extra)


def test_empty_data_folder_and_corrupt_image(tmp_path):
    """An empty folder stops with a message; a corrupt JPEG is skipped with a warning naming it."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        train.main(TINY + ["--dataset", "imagefolder", "--data", str(tmp_path / "empty"), "--out", str(tmp_path)])
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        assert train.main(TINY + ["--dataset", "imagefolder", "--data", str(tmp_path / "images"),
                                  "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0


def test_resume_refuses_another_framework_or_arch(tmp_path):
    out = str(tmp_path)
    train.main(TINY + ["--framework", "byol", "--max-steps", "1", "--out", out])
    with pytest.raises(SystemExit, match="a --framework byol run"):
        train.main(TINY + ["--framework", "moco", "--queue-size", "32", "--resume", "--out", out])
    with pytest.raises(SystemExit, match="a --arch resnet18 run"):
        train.main(TINY + ["--framework", "byol", "--arch", "resnet34", "--resume", "--out", out])


def test_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    """Without --resume, an --out that holds a checkpoint is an error, not silently overwritten."""
    out = str(tmp_path)
    train.main(TINY + ["--max-steps", "1", "--out", out])
    with pytest.raises(SystemExit, match="exists; pass --resume"):
        train.main(TINY + ["--max-steps", "2", "--out", out])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    train.main(TINY + ["--max-steps", "1", "--out", out])
    before = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]
    monkeypatch.setattr(models, "byol_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="non-finite loss nan at step 1"):
        train.main(TINY + ["--max-steps", "3", "--out", out, "--resume"])
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"] == before


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    """A preempted run (SIGTERM) finishes its step, checkpoints atomically, and can be resumed."""
    out = str(tmp_path)
    # Loader workers, in their own process group like under torchrun or a scheduler, get the
    # signal too: they must not die before the trainer has saved.
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--fake-size", "4096", "--workers", "2",
                                "--out", out], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    for line in process.stdout:
        if "step 2/" in line:
            os.killpg(process.pid, signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1 and "checkpoint saved" in output
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"] >= 2
    assert not os.path.exists(os.path.join(out, "checkpoint.pth.tmp"))


def cifar_subset(root, per_class):
    """Copy `per_class[split]` JPEGs per class of real CIFAR-10 into root/cifar10-jpg/<split>/<class>/,
    from data/cifar10-jpg (where .ci/run extracts it) or straight from the archive in ../shared/data."""
    extracted = os.path.join(HERE, "data", "cifar10-jpg")
    archive = os.path.join(HERE, "..", "shared", "data", "cifar10-jpg.tar.gz")
    if os.path.isdir(extracted):
        for split, count in per_class.items():
            for label in sorted(os.listdir(os.path.join(extracted, split))):
                os.makedirs(os.path.join(root, "cifar10-jpg", split, label))
                for name in sorted(os.listdir(os.path.join(extracted, split, label)))[:count]:
                    shutil.copy(os.path.join(extracted, split, label, name), os.path.join(root, "cifar10-jpg", split, label))
    elif os.path.exists(archive):
        counts = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 4 and counts.get(tuple(parts[1:3]), 0) < per_class[parts[1]]:
                    counts[tuple(parts[1:3])] = counts.get(tuple(parts[1:3]), 0) + 1
                    tar.extract(member, root, filter="data")
    else:
        pytest.skip(f"real CIFAR-10 not found: extract {archive} into data/ to run this test")
    return os.path.join(root, "cifar10-jpg")


def test_end_to_end_on_real_cifar10(tmp_path):
    """Train MoCo+mosaic on 400 real CIFAR-10 JPEGs, export, run eval_knn: the loss falls and the
    accuracies are valid numbers."""
    root = cifar_subset(str(tmp_path), {"train": 40, "test": 10})
    out = str(tmp_path / "run")
    assert train.main(["--demo", "--data", os.path.join(root, "train"), "--batch-size", "32", "--epochs", "3",
                       "--workers", "0", "--log-every", "1", "--out", out, "--knn-samples", "400"]) == 0
    steps, (final,) = read_log(out)
    losses = [r["loss"] for r in steps]
    # Step 1 is special (the key encoder is still an exact copy of the query encoder, so its loss is
    # low); the loss then rises as the encoders part, and falls as they learn. Compare with steps 2-7.
    assert sum(losses[-6:]) / 6 < sum(losses[1:7]) / 6
    assert sum(losses[-6:]) / 6 < 2 * math.log(32)   # below chance for 32 in-batch keys, global + local
    assert set(final["knn_top1"]) == {"trained", "random-init"}
    result = run_cli("eval_knn.py", "--weights", os.path.join(out, "backbone.pth"), "--arch", "resnet18",
                     "--stem", "imagenet", "--dataset", "imagefolder", "--data", os.path.join(root, "train"),
                     "--val-data", os.path.join(root, "test"), "--image-size", "64", "--workers", "0",
                     "--out", str(tmp_path / "knn.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "knn.json") as f:
        text = f.read()
    numbers = [float(x) for x in re.findall(r'"top[15]": ([0-9.]+)', text)]
    assert numbers and all(0 <= x <= 100 for x in numbers)


def test_evaluate_knn_counts_a_repeated_k_once():
    """--k 1 1 must not double the hit counts (accuracies stay within [0, 100] and equal --k 1's)."""
    torch.manual_seed(0)
    train_x, test_x = torch.randn(30, 8), torch.randn(10, 8)
    train_y, test_y = torch.randint(0, 3, (30,)), torch.randint(0, 3, (10,))
    once = evaluate_knn(train_x, train_y, test_x, test_y, [1], 0.07, 3)
    twice = evaluate_knn(train_x, train_y, test_x, test_y, [1, 1], 0.07, 3)
    assert twice == once
