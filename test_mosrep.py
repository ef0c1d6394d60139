"""Spec suite of the MosRep reference implementation (CPU, small), in module order: mosaic.py, losses.py,
augment.py, mixture.py, models.py, data.py, train.py (units), eval_knn.py, eval_linear.py, eval_transfer.py,
eval_finetune.py, the evaluation scripts under 2 processes, train.py end to end, real CIFAR-10 end to end, the CUDA
checks, README. The tools' tests are in tools/test_tools.py.
Every test's docstring is the one spec it pins. Run: python -m pytest -q (both files)"""
import argparse
import ast
import errno
import inspect
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import augment
import data
import eval_finetune
import eval_knn
import eval_linear
import eval_transfer
import losses
import mixture
import models
import runtime
import train
from eval_knn import accuracy, build_trunk, evaluate_knn, extract_features, knn_scores
from eval_linear import balanced_subset, cached_batches, frozen_features, train_probe
from mosaic import Mosaic, compose, default_jitter, group_crops, jitter, make_mosaic

HERE = os.path.dirname(os.path.abspath(__file__))


def knn_predict(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size=256):
    """knn_scores for one k: scores [M, classes]."""
    return knn_scores(train_features, train_labels, test_features, [k], temperature, num_classes, chunk_size)[0]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # subprocesses: tiny batches, threads only add overhead
# The device-independent tests take the `device` fixture, set by MOSREP_TEST_DEVICE (default cpu, what CI runs); their
# ids end in [on_<device type>], so `MOSREP_TEST_DEVICE=cuda python -m pytest test_mosrep.py -k on_cuda` runs just
# them on a GPU (tools/check_gpu.py does).
TEST_DEVICE = torch.device(os.environ.get("MOSREP_TEST_DEVICE", "cpu"))


@pytest.fixture(params=[TEST_DEVICE], ids=[f"on_{TEST_DEVICE.type}"])
def device(request):
    """The device under test; on CUDA with TF32 off during the test, so that fp32 tolerances keep their meaning."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if request.param.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield request.param
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The 2 CPU cores are shared with other jobs: intra-op threads then spin against each other and tiny
    convolutions run 2-3x slower than on one thread. Restored after each test module (tools/test_tools.py imports
    it too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_one_line_error(error, fragment):
    """error is a script's SystemExit ('error: ...', as train.fail raises) or a library's ValueError (the message
    a script prints after 'error: '): one line, naming fragment."""
    message = str(error.code if isinstance(error, SystemExit) else error)
    assert message.startswith("error:") == isinstance(error, SystemExit), message
    assert "\n" not in message, message
    assert fragment in message, message


# ==================================================================================================
# mosaic.py
# ==================================================================================================

def _random_crops(B, M, C=3, s=8, seed=0, dtype=torch.float32):
    """Crops [B, M, C, s, s] of uniform noise, from their own generator."""
    return torch.rand(B, M, C, s, s, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _constant_crops(B, M, C=2, s=8):
    """crops[b, j] is filled with the distinct non-zero value 1 + b*M + j (all channels)."""
    values = 1.0 + torch.arange(B * M, dtype=torch.float32).view(B, M, 1, 1, 1)
    return values.expand(B, M, C, s, s).contiguous()


def _offsets_from_boxes(boxes_after, s):
    """(dx, dy) per mosaic from the moved slot-0 box, whose corner (s, s) is never clipped when |offset| <= s
    and the grid is at least 2 x 2."""
    return boxes_after[:, 0, 2] - s, boxes_after[:, 0, 3] - s


def _hand_shift(images, dx, dy):
    """Reference translation: out[b, :, y, x] = images[b, :, y - dy, x - dx], 0 outside."""
    out = torch.zeros_like(images)
    H, W = images.shape[-2:]
    for b in range(images.shape[0]):
        ox, oy = int(dx[b]), int(dy[b])
        ys, yd, xs, xd = max(0, -oy), max(0, oy), max(0, -ox), max(0, ox)
        h, w = H - abs(oy), W - abs(ox)
        if h > 0 and w > 0:
            out[b, :, yd:yd + h, xd:xd + w] = images[b, :, ys:ys + h, xs:xs + w]
    return out


def _jitter_offsets(n, max_shift, alpha, seed, s=16):
    """n mosaics' offsets (dx then dy, 2n values) from one jitter call on a blank 2x2 grid of s px slots."""
    _, boxes = compose(torch.zeros(1, 4, 1, s, s), torch.zeros(1, 4, dtype=torch.long))
    boxes = boxes.expand(n, 4, 4).contiguous()
    torch.manual_seed(seed)
    _, moved_boxes, _ = jitter(torch.zeros(n, 1, 2 * s, 2 * s), boxes, max_shift, alpha)
    return torch.cat(_offsets_from_boxes(moved_boxes, s))


# ---- default_jitter

@pytest.mark.parametrize("mosaic_size,shift", [(224, 48), (32, 7), (3 * 112, 72), (64, 14)])
def test_default_jitter_is_48_px_per_224_px_of_mosaic(mosaic_size, shift):
    """default_jitter(size) = round(48 * size / 224): 224 -> 48, 32 -> 7, 3x3 of 112 px -> 72, 64 -> 14."""
    assert default_jitter(mosaic_size) == shift


# ---- group_crops

@pytest.mark.parametrize("B,M", [(4, 4), (5, 4), (8, 4), (9, 9), (16, 9), (3, 1), (64, 4)])
def test_group_crops_columns_are_permutations_and_rows_distinct(B, M, device):
    """group_crops: [B, M] long; every column is a permutation of range(B) and every row holds M distinct images."""
    for _ in range(200):
        sources = group_crops(B, M, device=device).cpu()
        assert sources.shape == (B, M) and sources.dtype == torch.long
        assert torch.equal(sources.sort(dim=0).values, torch.arange(B)[:, None].expand(B, M))
        assert all(len(set(row)) == M for row in sources.tolist())


def test_group_crops_is_random_at_each_call():
    """group_crops draws a new arrangement at each call, and every image reaches every slot of mosaic 0."""
    draws = [group_crops(8, 4) for _ in range(50)]
    assert len({tuple(d.flatten().tolist()) for d in draws}) >= 45
    seen = torch.stack(draws)[:, 0, :]                        # [50, M]
    for j in range(4):
        assert len(set(seen[:, j].tolist())) >= 6


def test_group_crops_reproducible_from_torch_seed():
    """group_crops: the same torch.manual_seed gives the same arrangement, another seed another one."""
    torch.manual_seed(123)
    a = group_crops(16, 4)
    torch.manual_seed(123)
    assert torch.equal(a, group_crops(16, 4))
    others = set()
    for seed in range(10):
        torch.manual_seed(seed)
        others.add(tuple(group_crops(16, 4).flatten().tolist()))
    assert len(others) == 10


def test_group_crops_builds_on_the_given_device():
    """group_crops(..., device=d) creates the arrangement on d (the meta device here), not on the CPU."""
    sources = group_crops(6, 4, device=torch.device("meta"))
    assert sources.device.type == "meta" and sources.shape == (6, 4) and sources.dtype == torch.long


def test_group_crops_batch_smaller_than_crops_raises_with_both_numbers():
    """group_crops with B < M (a mosaic needs M different images) raises ValueError naming B and M."""
    for B, M in ((3, 4), (7, 9)):
        with pytest.raises(ValueError) as error:
            group_crops(B, M)
        assert str(B) in str(error.value) and str(M) in str(error.value)


# ---- compose

@pytest.mark.parametrize("B,M,s", [(4, 4, 5), (10, 9, 3), (2, 1, 4)])
def test_compose_places_crops_pixel_exactly(B, M, s, device):
    """compose: slot j of mosaic b sits at grid row j // g, column j % g and holds crops[sources[b, j], j]."""
    g = math.isqrt(M)
    crops = _random_crops(B, M, C=3, s=s, seed=B * M).to(device)
    sources = group_crops(B, M, device=device)
    mosaics, _ = compose(crops, sources)
    assert mosaics.shape == (B, 3, g * s, g * s) and mosaics.dtype == crops.dtype
    for b in range(B):
        for j in range(M):
            r, c = divmod(j, g)
            assert torch.equal(mosaics[b, :, r * s:(r + 1) * s, c * s:(c + 1) * s], crops[sources[b, j], j])


def test_compose_boxes_exact():
    """compose boxes [B, M, 4] float: slot j covers [x1, x2) x [y1, y2) at its grid cell, the same in every mosaic."""
    B, M, s = 10, 9, 4
    _, boxes = compose(_random_crops(B, M, C=1, s=s), group_crops(B, M))
    assert boxes.shape == (B, M, 4) and boxes.is_floating_point()
    expected = torch.tensor([[(j % 3) * s, (j // 3) * s, (j % 3 + 1) * s, (j // 3 + 1) * s] for j in range(M)],
                            dtype=boxes.dtype)
    assert all(torch.equal(boxes[b], expected) for b in range(B))


def test_compose_rejects_non_square_grids_and_crops():
    """compose raises ValueError for a non-square number of crops or non-square crops."""
    with pytest.raises(ValueError):
        compose(torch.zeros(4, 3, 3, 4, 4), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        compose(torch.zeros(4, 4, 3, 4, 5), torch.zeros(4, 4, dtype=torch.long))


def test_roi_align_reproduces_each_crop_from_unjittered_mosaic(device):
    """roi_align(aligned=True, scale 1) at each compose box reads back exactly crops[sources[b, j], j]."""
    B, M, s = 6, 4, 7
    crops = _random_crops(B, M, C=3, s=s, seed=5).to(device)
    sources = group_crops(B, M, device=device)
    mosaics, boxes = compose(crops, sources)
    rois = torch.cat([torch.arange(B, device=device).repeat_interleave(M)[:, None].float(), boxes.reshape(-1, 4)], 1)
    read = roi_align(mosaics, rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    expected = crops[sources.flatten(), torch.arange(M, device=device).repeat(B)]
    torch.testing.assert_close(read, expected, rtol=0, atol=1e-6)


# ---- jitter

def test_jitter_constant_colour_crops_fill_exactly_their_boxes():
    """jitter: every pixel inside each moved, clipped box has its crop's colour; every pixel outside all boxes is 0."""
    B, M, s = 32, 4, 6
    crops = _constant_crops(B, M, C=2, s=s)
    sources = group_crops(B, M)
    mosaics, boxes = compose(crops, sources)
    moved, moved_boxes, _ = jitter(mosaics, boxes, max_shift=s)
    assert moved.shape == mosaics.shape
    for b in range(B):
        covered = torch.zeros(moved.shape[-2:], dtype=torch.bool)
        for j in range(M):
            x1, y1, x2, y2 = [int(v) for v in moved_boxes[b, j].tolist()]
            assert moved_boxes[b, j].tolist() == [float(x1), float(y1), float(x2), float(y2)]
            assert torch.all(moved[b, :, y1:y2, x1:x2] == crops[sources[b, j], j, 0, 0, 0]), (b, j)
            covered[y1:y2, x1:x2] = True
        assert torch.all(moved[b][:, ~covered] == 0), b


def test_jitter_moves_content_and_boxes_together():
    """jitter translates each mosaic by (dx, dy) (0 where uncovered) and moves its boxes by the same offset, clipped."""
    B, M, s = 16, 4, 8
    mosaics, boxes = compose(_random_crops(B, M, C=3, s=s, seed=2), group_crops(B, M))
    moved, moved_boxes, _ = jitter(mosaics, boxes, 8)
    dx, dy = _offsets_from_boxes(moved_boxes, s)
    assert torch.equal(moved, _hand_shift(mosaics, dx, dy))
    H, W = mosaics.shape[-2:]
    shift = torch.stack([dx, dy, dx, dy], 1)[:, None, :]
    limit = torch.tensor([W, H, W, H], dtype=boxes.dtype)
    assert torch.equal(moved_boxes, torch.minimum((boxes + shift).clamp_min(0), limit))


def test_jitter_visible_matches_hand_computed_clipped_area():
    """jitter's visible [B, M] = clipped box area / original area, recomputed here from the offsets."""
    B, M, s = 64, 9, 5
    mosaics, boxes = compose(_random_crops(B, M, C=1, s=s), group_crops(B, M))
    H, W = mosaics.shape[-2:]
    torch.manual_seed(4)
    _, moved_boxes, visible = jitter(mosaics, boxes, 5)
    assert visible.shape == (B, M)
    dx, dy = _offsets_from_boxes(moved_boxes, s)
    for b in range(B):
        for j in range(M):
            x1, y1, x2, y2 = boxes[b, j].tolist()
            w = max(0.0, min(x2 + dx[b].item(), W) - max(x1 + dx[b].item(), 0))
            h = max(0.0, min(y2 + dy[b].item(), H) - max(y1 + dy[b].item(), 0))
            assert visible[b, j].item() == pytest.approx(w * h / (s * s), abs=1e-6)
    assert (visible < 1).any() and (visible == 1).any()


def test_jitter_fully_visible_crops_still_read_back_exactly(device):
    """After jitter, roi_align at the moved box of a fully visible crop returns that crop exactly."""
    B, M, s = 12, 4, 6
    crops = _random_crops(B, M, C=2, s=s, seed=7).to(device)
    sources = group_crops(B, M, device=device)
    mosaics, boxes = compose(crops, sources)
    torch.manual_seed(8)
    moved, moved_boxes, visible = jitter(mosaics, boxes, 3)
    rois = torch.cat([torch.arange(B, device=device).repeat_interleave(M)[:, None].float(), moved_boxes.reshape(-1, 4)],
                     1)
    read = roi_align(moved, rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    expected = crops[sources.flatten(), torch.arange(M, device=device).repeat(B)]
    full = visible.flatten() == 1
    assert full.sum() >= 5
    torch.testing.assert_close(read[full], expected[full], rtol=0, atol=1e-6)


def test_jitter_offsets_are_bounded_integers_that_differ_between_mosaics():
    """jitter offsets are integers in [-max_shift, max_shift], drawn per mosaic and per axis (dx != dy)."""
    B, max_shift = 32, 7
    offsets = _jitter_offsets(B, max_shift, 0.5, seed=9)
    dx, dy = offsets[:B], offsets[B:]
    assert torch.equal(offsets, offsets.round()) and offsets.abs().max() <= max_shift
    assert len(set(dx.tolist())) > 3 and len(set(dy.tolist())) > 3
    assert not torch.equal(dx, dy)


def test_jitter_offsets_follow_arcsine_law_for_alpha_half():
    """alpha 0.5: t = offset / max_shift is arcsine: P(|t|>=1/2) = 2/3, P(|t|>=0.9) = 2acos(0.9)/pi, var 1/2."""
    n, max_shift = 4000, 15            # max_shift = 15 puts the rounding boundaries exactly on the thresholds
    offsets = _jitter_offsets(n, max_shift, 0.5, seed=10)
    N, t = offsets.numel(), offsets / max_shift
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
    """jitter with Beta(alpha, alpha): Var(offset / max_shift) = 1 / (2 alpha + 1); alpha = 1 is uniform."""
    n, max_shift = 4000, 15
    offsets = _jitter_offsets(n, max_shift, alpha, seed=11)
    expected = 1 / (2 * alpha + 1) + 1 / (12 * max_shift ** 2)      # + rounding noise
    assert abs((offsets / max_shift).pow(2).mean().item() - expected) < 0.1 * expected
    if alpha == 1.0:
        assert abs((offsets.abs() > max_shift / 2).float().mean().item() - 0.5) < 0.03


def test_jitter_large_alpha_concentrates_offsets_near_zero():
    """jitter with alpha = 50: Beta(50, 50) is tight around 1/2, so offsets stay near 0 (vs alpha = 0.5)."""
    n, max_shift = 2000, 15
    offsets = _jitter_offsets(n, max_shift, 50.0, seed=12)
    assert offsets.abs().float().mean().item() < 0.2 * max_shift
    assert (offsets.abs() > max_shift / 2).float().mean().item() < 0.01
    assert _jitter_offsets(n, max_shift, 0.5, seed=12).abs().float().mean() > 3 * offsets.abs().float().mean()


def test_jitter_small_alpha_offsets_stay_finite_and_bounded():
    """jitter with alpha = 0.02: offsets stay bounded integers (no NaN from the sampler), nearly all at +-max_shift."""
    n, max_shift = 4000, 15
    offsets = _jitter_offsets(n, max_shift, 0.02, seed=28)
    assert offsets.abs().max() <= max_shift and torch.equal(offsets, offsets.round())
    assert (offsets.abs() == max_shift).float().mean() > 0.9


def test_jitter_zero_max_shift_is_identity_and_bad_alpha_raises():
    """jitter with max_shift 0 returns mosaics and boxes unchanged and visible ones; alpha <= 0 raises ValueError."""
    B, M, s = 4, 4, 5
    mosaics, boxes = compose(_random_crops(B, M, s=s), group_crops(B, M))
    out, out_boxes, visible = jitter(mosaics, boxes, 0)
    assert torch.equal(out, mosaics) and torch.equal(out_boxes, boxes)
    assert visible.shape == (B, M) and torch.all(visible == 1)
    for alpha in (0.0, -1.0):
        with pytest.raises(ValueError):
            jitter(mosaics, boxes, 3, alpha)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_jitter_keeps_dtype_and_matches_float32(dtype, device):
    """jitter returns mosaics in their own dtype with exactly the float32 path's pixels for the same torch seed."""
    B, M, s = 8, 4, 6
    mosaics, boxes = compose(_random_crops(B, M, s=s, seed=13).to(device, dtype), group_crops(B, M, device=device))
    assert mosaics.dtype == dtype
    torch.manual_seed(14)
    moved, moved_boxes, visible = jitter(mosaics, boxes, 4)
    assert moved.dtype == dtype and moved_boxes.is_floating_point() and visible.is_floating_point()
    torch.manual_seed(14)
    ref, ref_boxes, ref_visible = jitter(mosaics.float(), boxes, 4)
    assert torch.equal(moved.float(), ref) and torch.equal(moved_boxes, ref_boxes) and torch.equal(visible, ref_visible)


def test_jitter_reproducible_from_torch_seed():
    """jitter: the same torch.manual_seed gives the same result, another seed another one."""
    mosaics, boxes = compose(_random_crops(16, 4, s=6), group_crops(16, 4))
    results = []
    for seed in (15, 15, 16):
        torch.manual_seed(seed)
        results.append(jitter(mosaics, boxes, 5))
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[1]))
    assert not torch.equal(results[0][1], results[2][1])


# ---- make_mosaic

def test_make_mosaic_rois_sources_weights_consistent(device):
    """make_mosaic: roi row b*M+j = (b, box of slot j) shows crop (sources[row], j); weights = sqrt(visible)."""
    B, M, s = 12, 4, 6
    crops = _constant_crops(B, M, C=1, s=s).to(device)
    torch.manual_seed(17)
    out = make_mosaic(crops, max_shift=s - 1)
    assert isinstance(out, Mosaic) and out._fields == ("images", "rois", "sources", "weights")
    assert out.images.shape == (B, 1, 2 * s, 2 * s) and all(t.device == crops.device for t in out)
    assert out.rois.shape == (B * M, 5) and out.sources.shape == (B * M,) and out.weights.shape == (B * M,)
    assert torch.equal(out.rois[:, 0], torch.arange(B).repeat_interleave(M).to(out.rois))
    assert torch.equal(out.sources.view(B, M).sort(dim=0).values.cpu(), torch.arange(B)[:, None].expand(B, M))
    area = (out.rois[:, 3] - out.rois[:, 1]) * (out.rois[:, 4] - out.rois[:, 2])
    torch.testing.assert_close(out.weights, (area / s ** 2).sqrt(), rtol=0, atol=1e-6)
    assert (out.weights < 1).any()
    for row in range(B * M):
        b, j = divmod(row, M)
        x1, y1, x2, y2 = [int(v) for v in out.rois[row, 1:].tolist()]
        assert torch.all(out.images[b, :, y1:y2, x1:x2] == crops[out.sources[row], j, 0, 0, 0]), row


def test_make_mosaic_without_jitter_reads_back_crops(device):
    """make_mosaic with max_shift 0: roi_align at the rois returns crops[sources[row], row % M] exactly, weights 1."""
    B, M, s = 5, 4, 6
    crops = _random_crops(B, M, C=3, s=s, seed=18).to(device)
    out = make_mosaic(crops, max_shift=0)
    read = roi_align(out.images, out.rois, output_size=s, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(read, crops[out.sources, torch.arange(M, device=device).repeat(B)], rtol=0, atol=1e-6)
    assert torch.all(out.weights == 1)


def test_make_mosaic_reproducible_from_torch_seed(device):
    """make_mosaic: the same torch.manual_seed gives an identical Mosaic, another seed a different one."""
    crops = _random_crops(8, 4, s=6).to(device)
    results = []
    for seed in (19, 19, 20):
        torch.manual_seed(seed)
        results.append(make_mosaic(crops, 4))
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[1]))
    assert not (torch.equal(results[0].sources, results[2].sources) and torch.equal(results[0].rois, results[2].rois))


# ==================================================================================================
# losses.py
# ==================================================================================================

def _hand_info_nce(q, k, positives, queue, T, weights=None):
    """InfoNCE in float64 by hand, on L2-normalised inputs."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    logits = q @ k.T
    if queue is not None:
        logits = torch.cat([logits, q @ F.normalize(queue.double(), dim=1).T], 1)
    logits = logits / T
    per = torch.stack([torch.logsumexp(logits[n], 0) - logits[n, positives[n]] for n in range(len(q))])
    return (per if weights is None else weights.double() * per).mean()


@pytest.mark.parametrize("with_queue", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_info_nce_matches_hand_computation(with_queue, with_weights, device):
    """info_nce(raw q, K, queue) = mean(w * (logsumexp([q.K, q.queue] / T) - q.K[pos] / T)), all normalised."""
    g = torch.Generator().manual_seed(21)
    N, K, Q, D, T = 6, 4, 5, 8, 0.2
    q, k = 3 * torch.randn(N, D, generator=g).to(device), 0.5 * torch.randn(K, D, generator=g).to(device)
    queue = 2 * torch.randn(Q, D, generator=g).to(device) if with_queue else None
    positives = torch.tensor([0, 1, 2, 3, 1, 0], device=device)
    weights = torch.rand(N, generator=g).to(device) if with_weights else None
    got = losses.info_nce(q, k, positives, weights, queue=queue, temperature=T)
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _hand_info_nce(q, k, positives, queue, T, weights), rtol=1e-5, atol=1e-6)


def test_info_nce_orthogonal_queries_give_log_of_candidates():
    """info_nce with queries orthogonal to every key and queue row: all logits 0, loss = log(K + Q)."""
    D, K, Q = 8, 3, 5
    g = torch.Generator().manual_seed(22)
    q = torch.eye(D)[:2]
    k = torch.cat([torch.zeros(K, 2), torch.randn(K, D - 2, generator=g)], 1)
    queue = torch.cat([torch.zeros(Q, 2), torch.randn(Q, D - 2, generator=g)], 1)
    with_queue = losses.info_nce(q, k, torch.tensor([0, 2]), queue=queue, temperature=0.2)
    assert with_queue.item() == pytest.approx(math.log(K + Q), abs=1e-6)
    assert losses.info_nce(q, k, torch.tensor([1, 1]), temperature=0.07).item() == pytest.approx(math.log(K), abs=1e-6)


def test_both_losses_are_invariant_to_scaling_queries_and_keys():
    """info_nce and byol_loss normalise their own inputs: scaling queries, keys or queue rows changes nothing."""
    g = torch.Generator().manual_seed(31)
    q, k, queue = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    positives, weights = torch.tensor([0, 1, 2, 3, 1, 0]), torch.rand(6, generator=g)
    q_scale, k_scale = torch.rand(6, 1, generator=g) * 10 + 0.1, torch.rand(4, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(losses.info_nce(q_scale * q, k_scale * k, positives, weights, queue=7 * queue),
                               losses.info_nce(q, k, positives, weights, queue=queue))
    torch.testing.assert_close(losses.byol_loss(q_scale * q, k_scale * k, positives, weights),
                               losses.byol_loss(q, k, positives, weights))


def test_info_nce_gradient_reaches_queries_only():
    """info_nce: after backward, queries have a gradient, keys and queue none (stop-gradient on the target side)."""
    q, k, queue = (torch.randn(n, 6, requires_grad=True) for n in (4, 4, 8))
    losses.info_nce(q, k, torch.arange(4), torch.rand(4), queue=queue).backward()
    assert k.grad is None and queue.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_info_nce_fp32_for_low_precision_inputs(dtype):
    """info_nce on fp16/bf16 inputs returns fp32, equal to the fp32 loss of the upcast values (T = 0.05)."""
    g = torch.Generator().manual_seed(23)
    q, k, queue = (torch.randn(n, 16, generator=g).to(dtype) for n in (8, 8, 32))
    got = losses.info_nce(q, k, torch.arange(8), queue=queue, temperature=0.05)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    ref = losses.info_nce(q.float(), k.float(), torch.arange(8), queue=queue.float(), temperature=0.05)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_info_nce_is_fp32_inside_autocast(dtype, device):
    """info_nce inside an autocast region computes its logits in fp32: equal to the plain fp32 result."""
    g = torch.Generator().manual_seed(29)
    k = torch.randn(64, 128, generator=g)
    q, queue = k + 0.3 * torch.randn(64, 128, generator=g), torch.randn(1024, 128, generator=g)
    q, k, queue, own = q.to(device), k.to(device), queue.to(device), torch.arange(64, device=device)
    ref = losses.info_nce(q, k, own, queue=queue)
    with torch.autocast(device.type, dtype=dtype):
        got = losses.info_nce(q, k, own, queue=queue)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_byol_loss_is_fp32_inside_autocast(device):
    """byol_loss inside bf16 autocast equals the plain fp32 result, in fp32."""
    g = torch.Generator().manual_seed(30)
    p, z = torch.randn(64, 256, generator=g).to(device), torch.randn(64, 256, generator=g).to(device)
    ref = losses.byol_loss(p, z, torch.arange(64, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = losses.byol_loss(p, z, torch.arange(64, device=device))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_byol_loss_equal_zero_opposite_four_orthogonal_two():
    """byol_loss = 2 - 2 cos: 0 for equal directions (any scale), 4 for opposite ones, 2 for orthogonal ones."""
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(24))
    idx = torch.arange(5)
    assert losses.byol_loss(3 * z, z, idx).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.byol_loss(-z, 0.5 * z, idx).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(4)
    assert losses.byol_loss(e[:2], e[2:], torch.tensor([0, 1])).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_loss_positives_index_and_weights(device):
    """byol_loss compares query n with keys[positives[n]]: mean(w * (2 - 2 cos))."""
    g = torch.Generator().manual_seed(25)
    p, z = torch.randn(6, 5, generator=g).to(device), torch.randn(3, 5, generator=g).to(device)
    positives, w = torch.tensor([2, 0, 1, 1, 2, 0], device=device), torch.rand(6, generator=g).to(device)
    per = 2 - 2 * F.cosine_similarity(p.double(), z.double()[positives], dim=1)
    assert losses.byol_loss(p, z, positives, w).item() == pytest.approx((w.double() * per).mean().item(), abs=1e-6)
    assert losses.byol_loss(p, z, positives).item() == pytest.approx(per.mean().item(), abs=1e-6)


def test_byol_loss_gradient_reaches_queries_only():
    """byol_loss: after backward, keys have no gradient (stop-gradient), queries do."""
    p, z = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    losses.byol_loss(p, z, torch.arange(4), torch.rand(4)).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_byol_loss_fp32_for_low_precision_inputs(dtype):
    """byol_loss on fp16/bf16 inputs returns an fp32 scalar equal to the fp32 computation on the upcast values."""
    g = torch.Generator().manual_seed(26)
    p, z = torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype)
    got = losses.byol_loss(p, z, torch.arange(8))
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, losses.byol_loss(p.float(), z.float(), torch.arange(8)))


# ==================================================================================================
# augment.py
# ==================================================================================================

def _aug_images(n=5, h=19, w=23, seed=0):
    """Random [0, 1] images with a grey patch and saturated pixels (the HSV conversion's edge cases)."""
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    images[:, :, :3, :3] = 0.5
    images[:, 0, -2:, -2:], images[:, 1:, -2:, -2:] = 1.0, 0.0
    return images


def _blend_as(op):
    """augment.blend with one op (BRIGHTNESS, CONTRAST or SATURATION) for every image: (images, factors [N])."""
    return lambda x, f: augment.blend(x, torch.full((len(x), 1, 1, 1), op), f.reshape(-1, 1, 1, 1))


OPS = [("brightness", _blend_as(augment.BRIGHTNESS), TF.adjust_brightness, lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("contrast", _blend_as(augment.CONTRAST), TF.adjust_contrast, lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("saturation", _blend_as(augment.SATURATION), TF.adjust_saturation, lambda n: 0.6 + 0.8 * torch.rand(n)),
       ("hue", augment.adjust_hue, TF.adjust_hue, lambda n: torch.rand(n) - 0.5)]


# ---- batched colour ops, grayscale, solarize, blur against torchvision

@pytest.mark.parametrize("name, mine, reference, draw", OPS, ids=[op[0] for op in OPS])
def test_batched_colour_op_equals_torchvision_per_image(name, mine, reference, draw):
    """augment.blend (as brightness, contrast, saturation) and augment.adjust_hue, with per-sample factors, equal
    torchvision.transforms.v2.functional.adjust_<op> on each image alone, within 1e-5 in fp32."""
    torch.manual_seed(1)
    images, factors = _aug_images(), draw(5)
    for image, factor, batched in zip(images, factors, mine(images, factors)):
        assert torch.allclose(batched, reference(image, factor.item()), atol=1e-5, rtol=0)


def test_blend_applies_each_images_own_op():
    """blend with a different op per image (brightness, contrast, saturation, ...) equals torchvision's op on each
    image alone, within 1e-5; an image with factor 1 comes back unchanged, whatever its op."""
    torch.manual_seed(2)
    images, factors = _aug_images(n=7), 0.6 + 0.8 * torch.rand(7)
    factors[6] = 1.0
    ops = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    out = augment.blend(images, ops.reshape(-1, 1, 1, 1), factors.reshape(-1, 1, 1, 1))
    reference = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for image, op, factor, mine in zip(images, ops.tolist(), factors.tolist(), out):
        assert torch.allclose(mine, reference[op](image, factor), atol=1e-5, rtol=0), op
    assert torch.equal(out[6], images[6])


def test_grayscale_and_solarize_equal_torchvision():
    """grayscale (replicated to 3 channels) equals rgb_to_grayscale(num_output_channels=3); solarize with
    threshold 128/255 equals v2.functional.solarize, i.e. RandomSolarize(128) of the uint8 image."""
    images = _aug_images()
    for image, grey, solar in zip(images, augment.grayscale(images).expand_as(images), augment.solarize(images)):
        assert torch.allclose(grey, TF.rgb_to_grayscale(image, num_output_channels=3), atol=1e-5, rtol=0)
        assert torch.equal(solar, TF.solarize(image, 128 / 255))
    uint8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal((augment.solarize(uint8.float() / 255) * 255).round().to(torch.uint8), TF.solarize(uint8, 128))


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_gaussian_blur_equals_torchvision_per_image(kernel_size):
    """gaussian_blur(images, sigmas [N], k) equals v2.functional.gaussian_blur(image, [k, k], sigma) per image
    (torchvision's kernel, reflect padding), within 1e-5."""
    images, sigmas = _aug_images(h=29, w=31), torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for image, sigma, mine in zip(images, sigmas, augment.gaussian_blur(images, sigmas, kernel_size)):
        assert torch.allclose(mine, TF.gaussian_blur(image, [kernel_size] * 2, [sigma.item()] * 2), atol=1e-5, rtol=0)


def test_colour_jitter_applies_each_images_ops_in_its_own_order():
    """apply_colour_jitter equals torchvision's four ops applied one image at a time in that image's order (24
    images: every order of the four ops once); a non-applied image is returned unchanged."""
    orders = torch.tensor(list(itertools.permutations(range(4))))                   # [24, 4]
    n = len(orders)
    images, factors = _aug_images(n=n), torch.stack([0.6 + 0.8 * torch.rand(n), 0.6 + 0.8 * torch.rand(n),
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


# ---- drawing and applying the recipes

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
    n, recipe = 4000, augment.VIEW_RECIPES[framework][view]
    params = augment.draw_augment(n, framework, view, 64)
    for name, p in (("grey", 0.2), ("blur", recipe.blur), ("solarize", recipe.solarize)):
        assert abs(params[name].float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, name
    assert 0.1 <= params["sigma"].min() and params["sigma"].max() <= 2.0 and params["sigma"].std() > 0.5
    assert not augment.draw_augment(n, framework, view, 63)["blur"].any()


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_draw_augment_of_two_views_gives_each_half_its_own_recipe(framework):
    """x1 and x2 in one call (views ("x1", "x2")): the first half of the batch draws blur and solarize at x1's rates,
    the second half at x2's (BYOL's asymmetric 1.0 / 0.1 and 0 / 0.2), within 4 standard deviations."""
    torch.manual_seed(0)
    n = 4000
    params = augment.draw_augment(2 * n, framework, ("x1", "x2"), 64)
    for half, view in enumerate(("x1", "x2")):
        recipe = augment.VIEW_RECIPES[framework][view]
        for name, p in (("grey", 0.2), ("blur", recipe.blur), ("solarize", recipe.solarize)):
            rate = params[name][half * n:(half + 1) * n].float().mean().item()
            assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (view, name)


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


# ==================================================================================================
# mixture.py
# ==================================================================================================

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




@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_box_means_is_exact_in_fp32_under_fp16_autocast(dtype, device):
    """Under fp16 autocast (train.py --amp fp16, cutmix's embed_boxes), box_means still sums in fp32: its output is
    the fp32 result without autocast, cast to the map's dtype, bit for bit, at the paper's geometry (7x7 cells of
    stride 32, so up to 1,024 px per cell) with features of a few units, whose box sums pass fp16's 65,504 (inf)."""
    torch.manual_seed(0)
    feature_map = (4 + torch.randn(8, 16, 7, 7)).to(device, dtype)
    boxes = mixture.random_boxes(8, 224, 224, 0.25, 0.75, device)
    expected = [m.to(dtype) for m in mixture.box_means(feature_map.float(), boxes, 32)]
    with torch.autocast(device.type, dtype=torch.float16):
        got = mixture.box_means(feature_map, boxes, 32)
    for mean, want in zip(got, expected):
        assert mean.dtype == dtype and torch.isfinite(mean).all()
        assert torch.equal(mean, want)
# ==================================================================================================
# models.py
# ==================================================================================================

def _randomise_bn(module, seed=0):
    """Give every BatchNorm2d non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _images(n, size=16, seed=0, device="cpu"):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def _perturb(module, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))


def _small_mosaic(B=4, M=4, s=8, seed=0, max_shift=2, device="cpu"):
    """(crops [B, M, 3, s, s], their jittered Mosaic), both from seed, on device."""
    crops = torch.randn(B, M, 3, s, s, generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed + 1)
    return crops, make_mosaic(crops, max_shift)


def _encoder(mlp_batch_norm=True, hidden_dim=32, out_dim=16, roi_size=7):
    return models.Encoder(models.Trunk("resnet18", "cifar"), hidden_dim, out_dim, mlp_batch_norm, roi_size)


def _learner(framework, **kwargs):
    if framework == "moco":
        return models.MoCo("resnet18", "cifar", dim=8, **{"queue_size": 0, **kwargs})
    return models.BYOL("resnet18", "cifar", dim=8, hidden_dim=16, **kwargs)


# ---- Trunk, Encoder

@pytest.mark.parametrize("arch,stem,size,channels,stride", [
    ("resnet18", "imagenet", 64, 512, 32), ("resnet18", "cifar", 32, 512, 8),
    ("resnet50", "imagenet", 64, 2048, 32), ("resnet50", "cifar", 16, 2048, 8)])
def test_trunk_stride_and_output_shape(arch, stem, size, channels, stride):
    """Trunk returns the un-pooled C5 map [N, C, H/stride, W/stride]; .stride and .out_channels are the real ones."""
    trunk = models.Trunk(arch, stem).eval()
    assert trunk.stride == stride and trunk.out_channels == channels
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, size, size)).shape == (2, channels, size // stride, size // stride)
        assert trunk.pooled(torch.randn(2, 3, size, size)).shape == (2, channels)


def test_trunk_rejects_unknown_arch_and_stem():
    """Trunk with an unknown arch or stem raises ValueError."""
    with pytest.raises(ValueError):
        models.Trunk("resnet7", "imagenet")
    with pytest.raises(ValueError):
        models.Trunk("resnet18", "tiny")


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_trunk_state_dict_loads_into_torchvision_resnet(stem):
    """Trunk's state_dict loads into torchvision's resnet18 (cifar stem swapped in) missing only fc.*, same C5 map."""
    trunk = models.Trunk("resnet18", stem).eval()
    _randomise_bn(trunk)
    net = torchvision.models.resnet18()
    if stem == "cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    result = net.load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    features = nn.Sequential(*list(net.children())[:-2]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features(x), trunk(x))


def test_trunk_feeds_channels_last_inputs_to_channels_last_weights(device):
    """Trunk converts its input to channels_last when its weights are channels_last (else leaves it), same output."""
    trunk = models.Trunk("resnet18", "cifar").eval().to(device)
    _randomise_bn(trunk)
    seen = []
    trunk.conv1.register_forward_pre_hook(lambda module, inputs: seen.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 16, 16).to(device)
    with torch.no_grad():
        plain = trunk(x)
        trunk.to(memory_format=torch.channels_last)
        last = trunk(x)
    assert seen == [False, True]
    torch.testing.assert_close(last, plain, rtol=1e-3, atol=1e-4)


def test_encoder_head_shapes():
    """Encoder's head maps a C5 map and a 7x7 RoI map alike to [N, out_dim]."""
    enc = models.Encoder(models.Trunk("resnet18", "cifar"), 32, 16, mlp_batch_norm=True)
    assert enc.head(torch.randn(3, 512, 7, 7)).shape == (3, 16)
    assert enc.head(torch.randn(3, 512, 2, 2)).shape == (3, 16)
    assert enc(torch.randn(3, 3, 16, 16)).shape == (3, 16)


def test_encoder_embed_local_shapes_sources_weights():
    """embed_local(Mosaic) -> ([B*M, D], sources, weights); embed_local(crops) -> ([B*M, D], row b*M+j -> b, None)."""
    enc = _encoder()
    crops, mos = _small_mosaic()
    z, sources, weights = enc.embed_local(mos)
    assert z.shape == (16, 16) and torch.equal(sources, mos.sources) and torch.equal(weights, mos.weights)
    z, sources, weights = enc.embed_local(crops)
    assert z.shape == (16, 16) and weights is None
    assert torch.equal(sources, torch.arange(4).repeat_interleave(4))


def test_encoder_embed_local_crops_match_separate_encoding(device):
    """embed_local(crops) in eval mode: row b*M+j is the encoding of crops[b, j] on its own."""
    enc = _encoder().eval().to(device)
    crops = torch.randn(3, 4, 3, 8, 8).to(device)
    with torch.no_grad():
        z, _, _ = enc.embed_local(crops)
        torch.testing.assert_close(z[2 * 4 + 1], enc(crops[2, 1:2])[0], rtol=1e-4, atol=1e-5)


def test_encoder_embed_local_mosaic_rows_read_their_own_mosaic(device):
    """embed_local(Mosaic) in eval mode: changing mosaic 1's pixels changes only roi rows M..2M-1."""
    enc = _encoder(mlp_batch_norm=False).eval().to(device)
    _, mos = _small_mosaic(B=4, device=device)
    images = mos.images.clone()
    images[1] = torch.randn_like(images[1])
    with torch.no_grad():
        a, _, _ = enc.embed_local(mos)
        b, _, _ = enc.embed_local(mos._replace(images=images))
    assert ((a - b).abs().amax(dim=1) > 1e-6).tolist() == [False] * 4 + [True] * 4 + [False] * 8


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
    """A stand-in head that keeps the RoI maps it is given."""
    def forward(self, maps):
        self.maps = maps
        return maps.flatten(1)


def test_encoder_embed_local_rois_exact_under_bf16_autocast(device):
    """embed_local under bf16 autocast still reads each roi from its own mosaic and box beyond index 256 (fp32 rois)."""
    B, M, s = 260, 4, 4
    enc = _encoder(mlp_batch_norm=False, hidden_dim=8, out_dim=8, roi_size=s).eval()
    enc.trunk, enc.head = _IdentityTrunk(), _Recorder()
    enc.to(device)
    mos = make_mosaic(torch.rand(B, M, 3, s, s, generator=torch.Generator().manual_seed(27)).to(device), 0)
    with torch.no_grad():
        enc.embed_local(mos)
        exact = enc.head.maps.float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            enc.embed_local(mos)
        low = enc.head.maps.float()
    rows = slice(257 * M, 258 * M)
    torch.testing.assert_close(low[rows], exact[rows], rtol=0.02, atol=0.02)


# ---- checkpoints: save_checkpoint, read_checkpoint, load_trunk

def _fill_disk(monkeypatch, calls=None, error=OSError(errno.ENOSPC, "No space left on device")):
    """Make torch.save (as models calls it) write a few bytes and then fail as a full disk does: an OSError, or the
    RuntimeError that torch.save's zip writer raises on a real full disk ("unexpected pos ...")."""
    def full_disk(obj, path, *args, **kwargs):
        if calls is not None:
            calls.append(str(path))
        with open(path, "wb") as file:
            file.write(b"partial")
        raise error
    monkeypatch.setattr(models.torch, "save", full_disk)


def test_save_checkpoint_writes_learner_backbone_args_and_state(tmp_path):
    """save_checkpoint writes checkpoint.pth {learner, backbone, args, **state} and backbone.pth; no .tmp left."""
    learner = _learner("moco", queue_size=16)
    _randomise_bn(learner.backbone, seed=3)
    models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet18", "stem": "cifar"}, step=7, steps_per_epoch=3)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(checkpoint) == {"learner", "backbone", "args", "step", "steps_per_epoch"}
    assert checkpoint["args"] == {"arch": "resnet18", "stem": "cifar"} and checkpoint["step"] == 7
    for key, value in learner.state_dict().items():
        assert torch.equal(checkpoint["learner"][key], value), key
    backbone = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert learner.backbone is learner.online.trunk
    assert backbone.keys() == learner.backbone.state_dict().keys() == checkpoint["backbone"].keys()
    assert all(torch.equal(backbone[k], v) for k, v in learner.backbone.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint.pth"]


def test_backbone_pth_holds_cpu_tensors_that_a_bare_torch_load_gives_to_torchvision(tmp_path, device):
    """With the learner on the device (a GPU under MOSREP_TEST_DEVICE=cuda), every tensor that save_checkpoint writes
    is on the CPU: backbone.pth loads with a bare torch.load into torchvision.models.resnet50() (only fc.* missing) on
    a machine without that GPU; in checkpoint.pth the backbone's tensors share the learner's storage (saved once)."""
    learner = models.MoCo("resnet50", "imagenet", queue_size=16).to(device)
    models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet50"}, step=1)
    state = torch.load(tmp_path / "backbone.pth")
    result = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    checkpoint = torch.load(tmp_path / "checkpoint.pth")
    assert {v.device.type for part in (state, *checkpoint.values()) if isinstance(part, dict)
            for v in part.values() if isinstance(v, torch.Tensor)} == {"cpu"}
    for key, value in checkpoint["backbone"].items():
        shared = checkpoint["learner"]["online.trunk." + key]
        assert value.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr(), key


def test_save_checkpoint_on_a_full_disk_keeps_the_previous_files(tmp_path, monkeypatch):
    """save_checkpoint failing mid-write (ENOSPC) raises OSError; previous files byte-identical, no .tmp."""
    learner = _learner("moco", queue_size=16)
    models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet18"}, step=1)
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pth", "backbone.pth")}
    calls = []
    _fill_disk(monkeypatch, calls)
    with pytest.raises(OSError) as error:
        models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet18"}, step=2)
    assert error.value.errno == errno.ENOSPC and calls
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint.pth"]


def test_read_checkpoint_errors_are_one_line_value_errors(tmp_path):
    """read_checkpoint raises a one-line ValueError for a missing file and for a file that is not a torch file."""
    with pytest.raises(ValueError, match="does not exist") as error:
        models.read_checkpoint(str(tmp_path / "nope.pth"))
    assert "\n" not in str(error.value)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file") as error:
        models.read_checkpoint(str(tmp_path / "junk.pth"))
    assert "\n" not in str(error.value)
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(models.read_checkpoint(str(tmp_path / "ok.pth"))["a"], torch.ones(2))


def test_load_trunk_reads_backbone_checkpoint_random_and_refuses_mismatches(tmp_path):
    """load_trunk reads backbone.pth (fc.*, module. ignored), checkpoint.pth, 'random'; else ValueError."""
    net = torchvision.models.resnet18()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    trunk = models.load_trunk(str(path), "resnet18", "imagenet")
    assert all(torch.equal(value, net.state_dict()[key]) for key, value in trunk.state_dict().items())
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "ddp.pth")
    trunk = models.load_trunk(str(tmp_path / "ddp.pth"), "resnet18", "imagenet")
    assert all(torch.equal(value, net.state_dict()[key]) for key, value in trunk.state_dict().items())
    assert isinstance(models.load_trunk("random", "resnet18", "cifar"), models.Trunk)
    for weights, arch, stem in ((tmp_path / "nope.pth", "resnet18", "imagenet"), (path, "resnet50", "imagenet"),
                                (path, "resnet18", "cifar")):          # conv1 is 7x7 in the file
        with pytest.raises(ValueError) as error:
            models.load_trunk(str(weights), arch, stem)
        assert "\n" not in str(error.value)
    learner = _learner("moco", queue_size=16)
    _randomise_bn(learner.backbone, seed=3)
    models.save_checkpoint(str(tmp_path), learner, {"arch": "resnet18", "stem": "cifar"})
    loaded = models.load_trunk(str(tmp_path / "checkpoint.pth"), "resnet18", "cifar")
    assert all(torch.equal(value, learner.backbone.state_dict()[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(ValueError, match="--arch resnet18 --stem cifar"):
        models.load_trunk(str(tmp_path / "checkpoint.pth"), "resnet18", "imagenet")


# ---- learners: EMA, queue, keys, losses, target_std

@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_update_target_is_exact_ema_step(framework, device):
    """update_target(m) moves every target parameter by exactly (1 - m)(online - target); online untouched, no grad."""
    torch.manual_seed(0)
    learner = _learner(framework).to(device)
    online, target = dict(learner.online.named_parameters()), dict(learner.target.named_parameters())
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) for k in online)     # the target starts as a copy
    assert not any(p.requires_grad for p in target.values())
    _perturb(learner.online, seed=1)
    online_before = {k: v.detach().clone() for k, v in online.items()}
    target_before = {k: v.detach().clone() for k, v in target.items()}
    learner.update_target(0.9)
    for k in online:
        torch.testing.assert_close(target[k], target_before[k] + 0.1 * (online_before[k] - target_before[k]),
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(online[k], online_before[k])
    assert sum((target[k] - target_before[k]).abs().sum() for k in online) > 0


def test_byol_target_excludes_predictor():
    """BYOL's target is the EMA of trunk + head only: the predictor has no target copy."""
    learner = _learner("byol")
    assert not any(k.startswith("predictor") for k, _ in learner.target.named_parameters())
    assert sum(p.numel() for p in learner.target.parameters()) == sum(p.numel() for p in learner.online.parameters())


def test_moco_queue_buffer_and_wraparound():
    """MoCo queue [Q, D] of unit rows: enqueue writes at the pointer and wraps; more than Q keys: ValueError."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=10)
    assert learner.queue.shape == (10, 8) and learner.queue_ptr.dtype == torch.long
    torch.testing.assert_close(learner.queue.norm(dim=1), torch.ones(10))
    assert int(learner.queue_ptr) == 0
    k1, k2, k3 = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(3))
    learner.enqueue(k1)
    assert torch.equal(learner.queue[:4], k1) and int(learner.queue_ptr) == 4
    learner.enqueue(k2)
    assert torch.equal(learner.queue[4:8], k2) and int(learner.queue_ptr) == 8
    learner.enqueue(k3)                                  # 2 at the end, 2 wrapped to the front
    assert torch.equal(learner.queue[8:10], k3[:2]) and torch.equal(learner.queue[0:2], k3[2:])
    assert torch.equal(learner.queue[2:4], k1[2:]) and torch.equal(learner.queue[4:8], k2)
    assert int(learner.queue_ptr) == 2
    k4 = F.normalize(torch.randn(10, 8), dim=1)
    learner.enqueue(k4)                                  # exactly one lap
    assert torch.equal(learner.queue, torch.cat([k4[8:], k4[:8]])) and int(learner.queue_ptr) == 2
    with pytest.raises(ValueError):
        learner.enqueue(torch.randn(11, 8))


def test_moco_keys_in_original_order_eval_many_chunks(device):
    """MoCo.keys undoes its shuffle: in eval mode with 4 shuffle chunks, keys = normalize(target(x)) row for row."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=0, min_shuffle_chunk=2).eval().to(device)
    _randomise_bn(learner.target)
    x = _images(8, device=device)
    with torch.no_grad():
        expected = F.normalize(learner.target(x), dim=1)
    keys = learner.keys(x)
    assert keys.shape == (8, 8) and keys.dtype == torch.float32
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)


def test_moco_keys_in_original_order_train_one_chunk():
    """MoCo.keys in train mode with one shuffle chunk: keys = normalize(target(x)) row for row (BN is order-free)."""
    torch.manual_seed(0)
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=0, min_shuffle_chunk=16)
    x = _images(8, seed=1)
    keys = learner.keys(x)
    with torch.no_grad():
        expected = F.normalize(learner.target(x), dim=1)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_moco_forward_losses_match_hand_computation(local_mode, device):
    """MoCo: global = info_nce(q, K, own, queue), local = info_nce(z_c, K, src, w); then K is enqueued."""
    torch.manual_seed(0)
    B, M = 4, 4
    learner = models.MoCo("resnet18", "cifar", dim=8, queue_size=12, temperature=0.2).eval().to(device)
    _perturb(learner.online, seed=2, scale=0.05)
    crops, mos = _small_mosaic(B, M, device=device)
    local = {"none": None, "mosaic": mos, "crops": crops}[local_mode]
    x1, x2 = _images(B, seed=3, device=device), _images(B, seed=4, device=device)
    queue = learner.queue.clone()
    with torch.no_grad():
        q, k = learner.online(x1), F.normalize(learner.target(x2), dim=1)
        expected_global = losses.info_nce(q, k, torch.arange(B, device=device), queue=queue, temperature=0.2)
        expected_local = torch.tensor(0.0, device=device)
        if local is not None:
            z, src, w = learner.online.embed_local(local)
            expected_local = losses.info_nce(z, k, src, w, queue=queue, temperature=0.2)
        out = learner(x1, x2, local)
    assert set(out) == {"loss", "loss_global", "loss_local", "loss_mix", "target_std"}
    assert all(v.dim() == 0 for v in out.values())
    torch.testing.assert_close(out["loss_global"], expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_local"], expected_local.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["loss_global"] + out["loss_local"])
    torch.testing.assert_close(learner.queue[:B], k, rtol=1e-5, atol=1e-6)
    assert torch.equal(learner.queue[B:], queue[B:]) and int(learner.queue_ptr) == B


@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_byol_forward_losses_match_hand_computation(local_mode, device):
    """BYOL: global = l(p1, z2) + l(p2, z1) (a sum); local = mean_c w (l(p_c, z1[src]) + l(p_c, z2[src]))."""
    torch.manual_seed(0)
    B, M = 4, 4
    learner = _learner("byol").eval().to(device)
    _perturb(learner.online, seed=5, scale=0.05)
    crops, mos = _small_mosaic(B, M, device=device)
    local = {"none": None, "mosaic": mos, "crops": crops}[local_mode]
    x1, x2 = _images(B, seed=6, device=device), _images(B, seed=7, device=device)
    own = torch.arange(B, device=device)
    with torch.no_grad():
        p1, p2 = learner.predictor(learner.online(x1)), learner.predictor(learner.online(x2))
        z1, z2 = learner.target(x1), learner.target(x2)
        expected_global = losses.byol_loss(p1, z2, own) + losses.byol_loss(p2, z1, own)
        expected_local = torch.tensor(0.0, device=device)
        if local is not None:
            z, src, w = learner.online.embed_local(local)
            p = learner.predictor(z)
            expected_local = losses.byol_loss(p, z1, src, w) + losses.byol_loss(p, z2, src, w)
        out = learner(x1, x2, local)
    assert set(out) == {"loss", "loss_global", "loss_local", "loss_mix", "target_std"}
    torch.testing.assert_close(out["loss_global"], expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_local"], expected_local.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["loss_global"] + out["loss_local"])


def _target_std(embeddings):
    """The spec's formula: per-dimension std of the L2-normalised embeddings, averaged, times sqrt(D)."""
    z = F.normalize(embeddings.double(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_target_std_is_the_spread_of_the_normalised_target_embeddings(framework):
    """target_std = per-dim std of normalised target outputs x sqrt(D) (MoCo: keys; BYOL: cat(z1, z2))."""
    torch.manual_seed(0)
    learner = _learner(framework).eval()
    _randomise_bn(learner.target, seed=4)
    x1, x2 = _images(6, seed=10), _images(6, seed=11)
    with torch.no_grad():
        targets = learner.target(x2) if framework == "moco" else torch.cat([learner.target(x1), learner.target(x2)])
        out = learner(x1, x2)
    assert out["target_std"].dim() == 0 and not out["target_std"].requires_grad
    torch.testing.assert_close(out["target_std"].double(), _target_std(targets), rtol=1e-4, atol=1e-5)


def test_report_target_std_is_one_for_isotropic_and_zero_for_collapsed_embeddings():
    """_Learner._report: target_std ~1 for isotropic embeddings, 0 for identical ones; loss = global + local + mix."""
    g = torch.Generator().manual_seed(32)
    isotropic = 5 * torch.randn(8192, 64, generator=g)
    report = models._Learner._report(torch.tensor(1.5, requires_grad=True), torch.tensor(0.25), torch.tensor(0.125),
                                     isotropic)
    assert report["target_std"].item() == pytest.approx(1.0, abs=0.02)
    assert report["loss"].item() == 1.875 and report["loss"].requires_grad and report["loss_mix"].item() == 0.125
    assert not report["loss_global"].requires_grad
    collapsed = torch.randn(1, 64, generator=g).expand(100, 64)
    report = models._Learner._report(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), collapsed)
    assert report["target_std"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_no_gradient_reaches_target_and_parts_are_detached(framework, device):
    """backward of 'loss' (mosaic views) reaches online params, not the target; the reports are detached."""
    torch.manual_seed(0)
    learner = _learner(framework, **({"queue_size": 8} if framework == "moco" else {})).to(device)
    _, mos = _small_mosaic(4, 4, device=device)
    out = learner(_images(4, seed=8, device=device), _images(4, seed=9, device=device), mos)
    assert out["loss"].requires_grad
    assert not any(out[k].requires_grad for k in ("loss_global", "loss_local", "target_std"))
    out["loss"].backward()
    assert all(p.grad is None for p in learner.target.parameters())
    assert learner.backbone.conv1.weight.grad is not None and learner.backbone.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("local_mode", ["none", "mosaic", "crops"])
def test_few_sgd_steps_lower_the_loss(framework, local_mode, device):
    """A few plain SGD steps + EMA updates lower the learner's total loss on a fixed batch, in every view mode."""
    # MoCo at T = 0.2 on a batch of 8 oscillates at lr >= 0.02, hence its smaller lr.
    torch.manual_seed(0)
    B, M = 8, 4
    x1, x2 = _images(B, size=32, seed=10, device=device), _images(B, size=32, seed=11, device=device)
    crops = torch.randn(B, M, 3, 16, 16, generator=torch.Generator().manual_seed(12)).to(device)
    torch.manual_seed(13)
    local = {"none": None, "crops": crops, "mosaic": make_mosaic(crops, 4)}[local_mode]
    torch.manual_seed(0)
    if framework == "moco":
        learner, lr, steps, ratio = models.MoCo("resnet18", "cifar", dim=32, queue_size=0), 0.01, 6, 0.93
    else:
        learner, lr, steps, ratio = models.BYOL("resnet18", "cifar", dim=32, hidden_dim=256), 0.05, 5, 0.6
    learner.to(device)
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
    assert (out["loss_local"] > 0) == (local_mode != "none")
    assert sum(history[-2:]) / 2 < ratio * history[0], history


# ---- learners with --mix: flatten, cutmix, their queues

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


# ==================================================================================================
# data.py
# ==================================================================================================

class _RandomItems(Dataset):
    """n items (torch.rand(4) drawn from the global RNG, index): stands in for a randomly augmented dataset."""
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.rand(4), index


def _noise_view(image):
    """A random 'augmentation' that only reads torch's global RNG (picklable for loader workers)."""
    return torch.rand(3) + torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def test_add_data_args_flags_and_defaults():
    """add_data_args adds --dataset (imagefolder) --data --val-data --image-size (224) --workers --fake-size (512)."""
    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    args = parser.parse_args([])
    assert (args.dataset, args.data, args.val_data, args.image_size, args.fake_size) == (
        "imagefolder", None, None, 224, 512)
    assert args.workers >= 1
    args = parser.parse_args(["--dataset", "fake", "--data", "d", "--val-data", "v", "--image-size", "32",
                              "--workers", "0", "--fake-size", "8"])
    assert (args.dataset, args.data, args.val_data, args.image_size, args.workers, args.fake_size) == (
        "fake", "d", "v", 32, 0, 8)


def test_default_workers_share_the_process_affinity_among_the_local_processes(monkeypatch):
    """--workers defaults to the cores of this process's CPU affinity (else os.cpu_count) over LOCAL_WORLD_SIZE
    (torchrun's; 1 without it), at least 1, at most 16."""
    for cores, local, workers in ((32, "8", 4), (64, None, 16), (3, "8", 1), (12, "2", 6), (2, None, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert data.default_workers() == workers
        parser = argparse.ArgumentParser()
        data.add_data_args(parser)
        assert parser.parse_args([]).workers == workers
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)   # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.default_workers() == 2


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("num_crops", [0, 4])
def test_multi_view_transform_output_shapes(framework, num_crops):
    """MultiViewTransform(image) -> uint8 x1, x2 [3, S, S], crops [M, 3, s, s]; M = 0 gives an empty [0, 3, s, s]."""
    image = Image.fromarray(torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8).numpy())
    x1, x2, crops = data.MultiViewTransform(framework, 32, 16, num_crops)(image)
    assert x1.shape == x2.shape == (3, 32, 32) and x1.dtype == x2.dtype == torch.uint8
    assert crops.shape == (num_crops, 3, 16, 16) and crops.dtype == torch.uint8


def test_multi_view_transform_only_crops_and_flips_with_the_recipes_scales():
    """The loader's views are RandomResizedCrop (each view's scale from augment.VIEW_RECIPES) + flip on the uint8
    tensor: nothing photometric, no float conversion; a constant image (PIL or tensor) stays exactly that colour."""
    for framework in ("moco", "byol"):
        views = data.MultiViewTransform(framework, 64, 32, 4)
        for view, name in ((views.view1, "x1"), (views.view2, "x2"), (views.small, "crops")):
            kinds = [type(t) for t in view.transforms]
            assert kinds == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
            assert view.transforms[0].scale == augment.VIEW_RECIPES[framework][name].scale
    colour = torch.tensor([[200], [10], [99]], dtype=torch.uint8)
    for image in (Image.new("RGB", (80, 70), (200, 10, 99)), colour[:, :, None].expand(3, 70, 80)):
        x1, x2, crops = data.MultiViewTransform("byol", 64, 32, 4)(image)
        for view in (x1, x2, crops.movedim(1, 0)):   # crops [M, 3, s, s] -> [3, M, s, s]
            assert view.dtype == torch.uint8 and (view.reshape(3, -1) == colour).all()


def _coordinate_image(width=256, height=192):
    """uint8 [3, height, width]: red = x, green = y, blue = 0; a view's pixels tell where it was cropped from."""
    x = torch.arange(width, dtype=torch.uint8).expand(height, width)
    y = torch.arange(height, dtype=torch.uint8)[:, None].expand(height, width)
    return torch.stack([x, y, torch.zeros_like(x)])


def test_view_transform_crop_scale_aspect_and_flip_rates():
    """view_transform on a uint8 tensor: each view's crop (read back from the coordinate image's red and green
    slopes between the quarter points) covers a share of the image within its scale range at an aspect within
    [3/4, 4/3], both ranges filled; flipped (red falling left to right) at 1/2 (within 4 sigma of 600 views)."""
    image, size, n = _coordinate_image(), 64, 600
    torch.manual_seed(0)
    for low in (0.08, 0.2):
        views = torch.stack([data.view_transform(size, (low, 1.0))(image) for _ in range(n)]).float()
        slope_x = (views[:, 0, size // 2, 3 * size // 4] - views[:, 0, size // 2, size // 4]) * 2
        slope_y = (views[:, 1, 3 * size // 4, size // 2] - views[:, 1, size // 4, size // 2]) * 2
        width, height = slope_x.abs(), slope_y                 # the crop's sides, in pixels of the image
        scale, aspect = width * height / (256 * 192), width / height
        assert scale.min() > low * 0.9 and scale.max() < 1.05 and scale.min() < low + 0.05 and scale.max() > 0.9
        assert aspect.min() > 3 / 4 * 0.93 and aspect.max() < 4 / 3 / 0.93
        assert aspect.min() < 3 / 4 * 1.07 and aspect.max() > 4 / 3 / 1.07
        assert abs((slope_x < 0).float().mean() - 0.5) < 4 * math.sqrt(0.25 / n)


def _pil_loader_views(image):
    """The PIL loader that load_image + MultiViewTransform("byol", 32, 16, 1) replaced, on a PIL image: per view
    RandomResizedCrop and a flip on the PIL image, then PILToTensor; BYOL's scales, (0.08, 1) for x1 and x2 and
    (0.1, 0.6) for the crop, which it draws first, as MultiViewTransform does. (x1, x2, crops [1, 3, 16, 16])."""
    view, crop = (v2.Compose([v2.RandomResizedCrop(side, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                              v2.PILToTensor()]) for side, scale in ((32, (0.08, 1.0)), (16, (0.1, 0.6))))
    crops = crop(image)[None]
    return view(image), view(image), crops


def test_tensor_views_of_real_cifar_match_the_pil_loader(tmp_path):
    """2,100 views (x1, x2, a crop) of 700 real CIFAR-10 JPEGs: load_image + MultiViewTransform (crops and flips on
    the uint8 tensor) against the PIL loader they replaced (_pil_loader_views: PIL decode, crop and flip,
    PILToTensor). From the same torch seed the same crops and flips: every pixel within 2 grey levels, under 0.5 on
    average (the two resamplers round apart); from other seeds the per-channel means within 4 standard errors of
    the PIL loader's."""
    root = cifar_subset(str(tmp_path), {"train": 70})
    paths = [path for path, _ in torchvision.datasets.ImageFolder(os.path.join(root, "train")).samples]
    assert len(paths) == 700
    tensor_views, pil_views = data.MultiViewTransform("byol", 32, 16, 1), _pil_loader_views
    means = {"tensor": [], "pil": []}
    for index, path in enumerate(paths):
        torch.manual_seed(index)
        new = tensor_views(data.load_image(path))
        torch.manual_seed(index)
        old = pil_views(Image.open(path).convert("RGB"))
        differences = [(a.int() - b.int()).abs() for a, b in zip(new, old)]
        assert all(difference.max() <= 2 and difference.float().mean() < 0.5 for difference in differences)
        torch.manual_seed(10**6 + index)
        old = pil_views(Image.open(path).convert("RGB"))
        for name, (x1, x2, crops) in (("tensor", new), ("pil", old)):   # an image's 3 views: one sample
            means[name].append(torch.stack([x1.float().mean((1, 2)), x2.float().mean((1, 2)),
                                            crops[0].float().mean((1, 2))]).mean(0))
    new, old = torch.stack(means["tensor"]), torch.stack(means["pil"])
    standard_error = ((new.var(0) + old.var(0)) / len(paths)).sqrt()
    assert ((new.mean(0) - old.mean(0)).abs() < 4 * standard_error).all()
    assert (standard_error < 2.5).all()                        # the check has teeth: under 10 grey levels


def test_recipes_moco_views_alike_byol_views_asymmetric():
    """augment.VIEW_RECIPES: MoCo-v2's global views share scale (0.2, 1), blur 0.5, no solarize; BYOL's are (0.08, 1)
    with blur 1.0 / 0.1 and solarize 0 / 0.2; crops (0.1, 0.6), blur 0.5. Jitter MoCo (.4, .4, .4, .1), BYOL
    (.4, .4, .2, .1)."""
    moco, byol = augment.VIEW_RECIPES["moco"], augment.VIEW_RECIPES["byol"]
    assert moco["x1"] == moco["x2"] == ((0.2, 1.0), 0.5, 0.0)
    assert (byol["x1"], byol["x2"]) == (((0.08, 1.0), 1.0, 0.0), ((0.08, 1.0), 0.1, 0.2))
    assert moco["crops"] == byol["crops"] == ((0.1, 0.6), 0.5, 0.0)
    assert augment.COLOUR_JITTER == {"moco": (0.4, 0.4, 0.4, 0.1), "byol": (0.4, 0.4, 0.2, 0.1)}


def test_safe_image_folder_skips_a_corrupt_image_with_a_warning(tmp_path):
    """SafeImageFolder returns the next readable image (load_image's uint8 tensor) for a corrupt or truncated one,
    warning with each skipped file's name."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0_broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(tmp_path / "whole.jpg")
    jpeg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "a" / "1_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a" / "2_red.png")
    folder = data.SafeImageFolder(str(tmp_path))
    with pytest.warns(UserWarning, match="0_broken.png") as caught:
        image, label = folder[0]
    assert any("1_truncated.jpg" in str(warning.message) for warning in caught)
    assert image.dtype == torch.uint8 and image[:, 0, 0].tolist() == [255, 0, 0] and label == 0


def test_load_image_gives_rgb_uint8_for_greyscale_cmyk_png_and_formats_torchvision_does_not_read(tmp_path):
    """load_image -> uint8 [3, H, W] with PIL's RGB pixels: greyscale and CMYK JPEGs (within 2 grey levels: JPEG
    decoders may round apart), RGBA, palette and 16-bit PNGs and a BMP (through PIL) exactly."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    files = {"grey.jpg": rgb.convert("L"), "cmyk.jpg": rgb.convert("CMYK"), "rgb.jpg": rgb, "rgba.png":
             rgb.convert("RGBA"), "palette.png": rgb.convert("P"), "deep.png": rgb.convert("I;16"), "rgb.bmp": rgb}
    for name, image in files.items():
        image.save(tmp_path / name)
        decoded = data.load_image(str(tmp_path / name))
        expected = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB"))).permute(2, 0, 1)
        assert decoded.shape == (3, 30, 40) and decoded.dtype == torch.uint8, name
        assert (decoded.int() - expected.int()).abs().max() <= (2 if name.endswith(".jpg") else 0), name
    with pytest.raises(OSError):                                # what SafeImageFolder skips
        data.load_image(str(tmp_path / "missing.jpg"))


@pytest.mark.parametrize("augmented", [False, True])
def test_eval_transform_of_load_images_tensor_equals_that_of_the_pil_image(tmp_path, augmented):
    """eval_transform resizes on PIL whatever it is given: a folder's load_image tensor evaluates exactly as the
    PIL image of the same pixels did (torchvision's tensor resize differs from PIL's by 1 grey level here and there)."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(path)
    transform = data.eval_transform(96, random_crop=augmented)
    torch.manual_seed(0)
    from_tensor = transform(data.load_image(str(path)))
    torch.manual_seed(0)
    from_pil = transform(Image.open(path).convert("RGB"))
    assert from_tensor.shape == (3, 96, 96) and torch.equal(from_tensor, from_pil)


def _class_folders(root, classes, count=1):
    """root/<class>/<i>.png, tiny images."""
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(root / c / f"{i}.png")


STAND_IN_DOWNLOAD = """
import os, sys, time
sys.path.insert(0, {here!r})
import torch.distributed, torchvision, data, runtime
root, rank = sys.argv[1], os.environ["RANK"]
def note(*words):
    with open(os.path.join(root, "log"), "a") as log:
        log.write(" ".join(map(str, words)) + "\\n")
class StandIn:   # torchvision's CIFAR10 with download=True: download unless the files are there, then read them
    def __init__(self, root, train, transform, download):
        files = os.path.join(root, "cifar-10-batches-py")
        if download and not os.path.isdir(files):
            note("download", rank, time.time())
            time.sleep(2)
            os.makedirs(files)
            note("downloaded", rank, time.time())
        note("loaded", rank, time.time(), os.path.isdir(files))
torchvision.datasets.CIFAR10 = StandIn
with runtime.distributed():
    torch.distributed.barrier()   # both ranks ask for the dataset at the same moment
    note("asks", rank, time.time())
    data.build_dataset("cifar10", root, True, None)
"""


def test_a_download_happens_once_per_machine_while_the_other_ranks_wait(tmp_path):
    """Under torchrun --nproc_per_node 2 (gloo), both ranks asking data.build_dataset for a torchvision dataset at
    the same moment: one rank downloads (a 2 s stand-in), the other waits for it, then finds the files and
    downloads nothing."""
    script, root = tmp_path / "download.py", tmp_path / "data"
    script.write_text(STAND_IN_DOWNLOAD.format(here=HERE))
    os.makedirs(root)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(script), str(root)], cwd=HERE, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [line.split() for line in (root / "log").read_text().splitlines()]
    (_, downloader, began), (_, _, ended) = [e for e in events if e[0].startswith("download")]
    other = "1" if downloader == "0" else "0"
    asked, loaded = (float(e[2]) for e in events if e[1] == other and e[0] in ("asks", "loaded"))
    assert asked < float(began) + 1 and loaded >= float(ended)   # it asked during the download and waited for it
    assert sorted(e[3] for e in events if e[0] == "loaded") == ["True", "True"]


def test_build_splits_finds_val_beside_data_and_checks_classes(tmp_path):
    """build_splits finds val/ or test/ beside --data; other classes or no val split: one-line ValueError."""
    _class_folders(tmp_path / "train", ["a", "b"], count=2)
    _class_folders(tmp_path / "test", ["a", "b"])
    train_set, val_set, classes = data.build_splits("imagefolder", str(tmp_path / "train"), None, None, None, 32, 8)
    assert (len(train_set), len(val_set), classes) == (4, 2, 2)
    assert os.path.dirname(val_set.samples[0][0]).startswith(str(tmp_path / "test"))
    _class_folders(tmp_path / "other", ["a", "c"])
    with pytest.raises(ValueError) as error:
        data.build_splits("imagefolder", str(tmp_path / "train"), str(tmp_path / "other"), None, None, 32, 8)
    assert_one_line_error(error.value, "classes")
    _class_folders(tmp_path / "alone" / "train", ["a"])
    with pytest.raises(ValueError) as error:
        data.build_splits("imagefolder", str(tmp_path / "alone" / "train"), None, None, None, 32, 8)
    assert_one_line_error(error.value, "no --val-data given")
    fake_train, fake_val, fake_classes = data.build_splits("fake", None, None, None, None, 8, 40)
    assert (len(fake_train), len(fake_val), fake_classes) == (40, 16, 10)


def test_epoch_sampler_shards_are_disjoint_and_cover():
    """EpochSampler over R ranks: disjoint shards of batches_per_epoch * batch_size keys, R times that many distinct."""
    N, batch, R = 50, 4, 3
    shards = []
    for rank in range(R):
        sampler = data.EpochSampler(list(range(N)), batch, seed=0, num_replicas=R, rank=rank)
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        sampler.set_epoch(2)
        keys = list(sampler)
        assert len(keys) == len(sampler) == sampler.batches_per_epoch * batch and sampler.batches_per_epoch == 4
        shards.append(keys)
    every = sum(shards, [])
    assert len(set(every)) == len(every) == sampler.batches_per_epoch * batch * R
    assert all(2 * N <= key < 3 * N for key in every)          # epoch * N + index


def test_epoch_sampler_epochs_differ_and_encode_epoch_and_index():
    """EpochSampler: each epoch another order (fixed by the seed) of distinct indices, as epoch * N + index."""
    N, batch = 20, 4
    sampler = data.EpochSampler(list(range(N)), batch, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert all(key // N == epoch for key in keys) and len(set(keys)) == len(keys) == N
        orders.append([key % N for key in keys])
    assert orders[0] != orders[1] != orders[2] != orders[0]
    again = data.EpochSampler(list(range(N)), batch, seed=0)
    again.set_epoch(1)
    other = data.EpochSampler(list(range(N)), batch, seed=1)
    other.set_epoch(1)
    assert [k % N for k in again] == orders[1] != [k % N for k in other]


def test_epoch_sampler_skip_batches_yields_the_rest_of_the_epoch():
    """EpochSampler.set_epoch(e, skip_batches=k) yields exactly the uninterrupted order after its first k batches."""
    N, batch = 30, 4
    sampler = data.EpochSampler(list(range(N)), batch, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == 7 * batch                                # drop_last: 7 whole batches of 30 images
    for skip in range(sampler.batches_per_epoch + 1):
        sampler.set_epoch(3, skip_batches=skip)
        assert list(sampler) == full[skip * batch:] and len(sampler) == len(full) - skip * batch
    sampler.set_epoch(3)
    assert list(sampler) == full


def test_seeded_views_depend_on_key_only():
    """SeededViews: the same key gives identical views whatever the call order; another epoch or seed other views."""
    views = data.SeededViews(_RandomItems(10), seed=0)
    first, index = views[13]                                    # epoch 1, index 3
    assert index == 3
    views[27], views[5]
    torch.manual_seed(99)
    again, _ = views[13]
    assert torch.equal(first, again)
    other_epoch, other_index = views[3]                         # epoch 0, index 3
    assert other_index == 3 and not torch.equal(first, other_epoch)
    assert not torch.equal(first, data.SeededViews(_RandomItems(10), seed=1)[13][0])


def test_train_loader_same_batches_whatever_the_workers():
    """train_loader yields full batches of EpochSampler keys whose views do not depend on the number of workers."""
    dataset = torchvision.datasets.FakeData(12, (3, 4, 4), 10, transform=_noise_view)
    batches = {}
    for workers in (0, 2):
        with data.train_loader(dataset, 4, workers, seed=3) as loader:
            assert isinstance(loader.sampler, data.EpochSampler)
            loader.sampler.set_epoch(1, skip_batches=1)
            batches[workers] = [images for images, _ in loader]
    assert len(batches[0]) == 2 and all(images.shape == (4, 3) for images in batches[0])
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


# ---- --dataset imagenet100 (imagenet100.txt)

EXTRA = "n99999999"   # a 101st class folder, not in the list


def _listed_classes():
    with open(os.path.join(HERE, "imagenet100.txt")) as file:
        return [line.strip() for line in file if line.strip() and not line.startswith("#")]


def _tree(root, classes, count):
    """root/<class>/<i>.JPEG, 4x4 images."""
    for c in classes:
        os.makedirs(root / c)
        for i in range(count):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(root / c / f"{i}.JPEG")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A fake ImageNet: train/ with the 100 listed classes + EXTRA (2 images each), val/ with the 100 (1 each)."""
    root = tmp_path_factory.mktemp("imagenet")
    _tree(root / "train", _listed_classes() + [EXTRA], 2)
    _tree(root / "val", _listed_classes(), 1)
    return root


def test_shipped_list_is_the_100_distinct_cmc_synsets_with_its_source_named():
    """imagenet100.txt: a comment naming CMC as the source, then 100 distinct WordNet ids (n + 8 digits)."""
    with open(os.path.join(HERE, "imagenet100.txt")) as file:
        text = file.read()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#") and "Contrastive Multiview Coding" in " ".join(header)
    listed = _listed_classes()
    assert len(listed) == len(set(listed)) == 100
    assert all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in listed)
    assert {"n02869837", "n01749939", "n02090622", "n01855672"} <= set(listed)   # first and last of CMC's list


def test_imagenet100_selects_the_listed_classes_in_sorted_order_and_never_lists_others(imagenet, monkeypatch):
    """--dataset imagenet100 keeps exactly the 100 listed classes, indexed in sorted synset order; neither the
    root nor the extra class folder is ever listed."""
    listed_dirs = []
    for name in ("scandir", "listdir"):
        original = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", _original=original: listed_dirs.append(str(path))
                            or _original(path))
    folder = data.build_dataset("imagenet100", str(imagenet / "train"), True, None)
    monkeypatch.undo()
    assert folder.classes == sorted(_listed_classes()) and len(folder) == 200
    assert folder.class_to_idx == {c: i for i, c in enumerate(sorted(_listed_classes()))}
    assert all(os.path.basename(os.path.dirname(path)) == folder.classes[label] for path, label in folder.samples)
    assert listed_dirs and str(imagenet / "train") not in listed_dirs
    assert not [path for path in listed_dirs if EXTRA in path]
    assert not [path for path, _ in folder.samples if EXTRA in path]


def test_imagenet100_val_split_is_val_beside_data(imagenet):
    """build_splits('imagenet100') takes val/ beside --data, with the same 100 classes."""
    train_set, val_set, classes = data.build_splits("imagenet100", str(imagenet / "train"), None, None, None, 32, 8)
    assert (len(train_set), len(val_set), classes) == (200, 100, 100)
    assert all(path.startswith(str(imagenet / "val")) for path, _ in val_set.samples)


def test_imagenet100_missing_classes_fail_in_one_line_naming_the_count_and_an_example(tmp_path):
    """A tree lacking 3 of the 100 classes: one-line ValueError naming 3, the root and the first missing synset."""
    listed = sorted(_listed_classes())
    missing = [listed[5], listed[50], listed[97]]
    _tree(tmp_path, [c for c in listed if c not in missing], 1)
    with pytest.raises(ValueError) as error:
        data.build_dataset("imagenet100", str(tmp_path), True, None)
    assert_one_line_error(error.value, f"3 of the 100 ImageNet-100 classes are missing under {tmp_path}, "
                                       f"e.g. {missing[0]}")


def test_train_accepts_dataset_imagenet100():
    """train.py parses --dataset imagenet100 (shared add_data_args)."""
    assert train.parse_args(["--dataset", "imagenet100", "--data", "imagenet/train"]).dataset == "imagenet100"


# ==================================================================================================
# train.py: units (LARS, build_optimizer, schedules, parse_args, train_step)
# ==================================================================================================

def test_lars_step_matches_the_formula():
    """LARS: w -= lr u, u = (g+wd w) trust|w|/|g+wd w| (lars=False: u = g, no wd); step 2 adds 0.9 x u1."""
    lr, wd, trust = 0.5, 0.1, 0.001
    w = torch.tensor([[3.0, -4.0], [1.0, 2.0]], requires_grad=True)
    b = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    optimizer = train.LARS([{"params": [w]}, {"params": [b], "lars": False}], lr, weight_decay=wd, trust=trust)
    w0, b0 = w.detach().clone(), b.detach().clone()
    g1w, g1b = torch.tensor([[0.1, 0.2], [-0.3, 0.4]]), torch.tensor([0.3, -0.1, 0.2])
    w.grad, b.grad = g1w.clone(), g1b.clone()
    optimizer.step()
    u1 = (g1w + wd * w0) * trust * w0.norm() / (g1w + wd * w0).norm()
    torch.testing.assert_close(w.detach(), w0 - lr * u1)
    torch.testing.assert_close(b.detach(), b0 - lr * g1b)            # plain SGD: weight decay not applied
    w1, b1 = w.detach().clone(), b.detach().clone()
    g2w, g2b = torch.tensor([[-0.2, 0.1], [0.05, 0.3]]), torch.tensor([-0.1, 0.4, 0.0])
    w.grad, b.grad = g2w.clone(), g2b.clone()
    optimizer.step()
    u2 = (g2w + wd * w1) * trust * w1.norm() / (g2w + wd * w1).norm()
    torch.testing.assert_close(w.detach(), w1 - lr * (0.9 * u1 + u2))
    torch.testing.assert_close(b.detach(), b1 - lr * (0.9 * g1b + g2b))


def test_lars_zero_weight_falls_back_to_plain_update():
    """LARS on an all-zero weight (|w| = 0) uses trust ratio 1: w -= lr (g + wd w)."""
    w = torch.zeros(2, 2, requires_grad=True)
    w.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    train.LARS([w], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), -0.1 * torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def _reference_lars_step(params, state, lr, wd, momentum=0.9, trust=0.001):
    """LARS by its definition, one tensor at a time (what train.LARS computes with foreach ops): params is a list
    of (tensor, lars) with .grad set; state maps a tensor's id to its momentum buffer."""
    with torch.no_grad():
        for p, lars in params:
            update = p.grad
            if lars:
                update = update + wd * p
                w_norm, u_norm = p.norm(), update.norm()
                update = update * (trust * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            buffer = state.setdefault(id(p), torch.zeros_like(p))
            buffer.mul_(momentum).add_(update)
            p.sub_(lr * buffer)


def test_foreach_lars_equals_the_per_tensor_definition():
    """train.LARS (torch._foreach_* per group) equals the per-tensor definition over 20 steps, within 1e-6: weight
    decay on the LARS group, the excluded group (plain SGD, no weight decay), a tensor of norm 0 at the first step
    (unscaled update), a tensor without gradient (left alone)."""
    g = torch.Generator().manual_seed(0)
    shapes = [((4, 3), True), ((2, 2, 3, 3), True), ((3, 3), True), ((5,), False), ((2,), False)]
    mine = [torch.randn(shape, generator=g).requires_grad_() for shape, _ in shapes]
    with torch.no_grad():
        mine[2].zero_()                                                            # |w| = 0 at the first step
    reference = [p.detach().clone().requires_grad_() for p in mine]
    idle = torch.randn(3, 3, requires_grad=True)
    optimizer = train.LARS([{"params": [p for p, (_, lars) in zip(mine, shapes) if lars] + [idle]},
                            {"params": [p for p, (_, lars) in zip(mine, shapes) if not lars], "lars": False,
                             "weight_decay": 0.0}], lr=0.7, weight_decay=0.05, trust=0.02)
    state, before_idle = {}, idle.detach().clone()
    for step in range(20):
        for p, q in zip(mine, reference):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        optimizer.step()
        _reference_lars_step([(q, lars) for q, (_, lars) in zip(reference, shapes)], state, 0.7, 0.05, trust=0.02)
        for p, q in zip(mine, reference):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(idle.detach(), before_idle) and idle not in optimizer.state


def test_build_optimizer_groups():
    """build_optimizer: LARS puts ndim <= 1 params in a lars=False group with wd 0; SGD: all online params."""
    learner = _learner("byol")
    online = [p for p in learner.parameters() if p.requires_grad]
    target_ids = {id(p) for p in learner.target.parameters()}
    lars = train.build_optimizer(learner, argparse.Namespace(optimizer="lars", wd=1e-3), lr=0.2)
    assert isinstance(lars, train.LARS) and len(lars.param_groups) == 2
    big, small = lars.param_groups
    assert big["lars"] and big["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in big["params"])
    assert not small["lars"] and small["weight_decay"] == 0 and all(p.ndim <= 1 for p in small["params"])
    assert len(big["params"]) + len(small["params"]) == len(online) and small["params"] and big["params"]
    assert not target_ids & {id(p) for group in lars.param_groups for p in group["params"]}
    sgd = train.build_optimizer(learner, argparse.Namespace(optimizer="sgd", wd=1e-4), lr=0.2)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.9, 1e-4)
    assert len(group["params"]) == len(online)


def test_schedules_warmup_and_cosine():
    """schedules: lr = (step+1)/warmup * peak during warm-up, peak right after it, then a cosine to 0 at step total."""
    args = argparse.Namespace(framework="moco", ema=0.999)
    total, warmup, peak = 100, 10, 0.8
    lrs = [train.schedules(step, total, warmup, peak, args)[0] for step in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(peak)
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(peak / 2)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert 0 < lrs[total - 1] < 1e-3 * peak and lrs[total] == pytest.approx(0, abs=1e-12)
    assert train.schedules(0, total, 0, peak, args)[0] == pytest.approx(peak)         # no warm-up: peak at step 0


def test_schedules_ema_moco_constant_byol_cosine_to_one():
    """schedules: MoCo's ema is args.ema at every step; BYOL's is args.ema at step 0, rises, and is 1 at step total."""
    moco, byol = argparse.Namespace(framework="moco", ema=0.999), argparse.Namespace(framework="byol", ema=0.99)
    total = 50
    assert {train.schedules(s, total, 5, 1.0, moco)[1] for s in range(total + 1)} == {0.999}
    emas = [train.schedules(s, total, 5, 1.0, byol)[1] for s in range(total + 1)]
    assert emas[0] == pytest.approx(0.99) and emas[total] == pytest.approx(1.0)
    assert emas[total // 2] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(emas, emas[1:]))


def test_amp_defaults_to_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """--amp's default: bf16 on GPUs of compute capability 8.0 and later (A100 8.0, RTX 30xx 8.6, H100 9.0), fp16 with
    train_step's GradScaler on older ones (V100 7.0, T4 7.5: no bf16 tensor cores, torch.cuda.is_bf16_supported()
    True by emulation), off on the CPU."""
    for capability, amp in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert runtime.default_amp(torch.device("cuda", 0)) == amp, capability
    assert runtime.default_amp(torch.device("cpu")) == "off"


def test_parse_args_recipes_and_default_jitter():
    """parse_args fills the framework's recipe (flags win), BYOL ema 0.996 past 300 epochs, default_jitter."""
    byol = train.parse_args([])
    assert (byol.framework, byol.lr, byol.optimizer, byol.ema, byol.epochs, byol.warmup_epochs) == (
        "byol", 0.3, "lars", 0.99, 300, 10)
    moco = train.parse_args(["--framework", "moco", "--lr", "0.1"])
    assert (moco.lr, moco.optimizer, moco.ema, moco.epochs) == (0.1, "sgd", 0.999, 200)
    assert train.parse_args(["--epochs", "1000"]).ema == 0.996
    assert byol.jitter == default_jitter(2 * 112) == 48
    assert train.parse_args(["--crops", "9", "--crop-size", "32"]).jitter == default_jitter(96)
    assert train.parse_args(["--jitter", "3"]).jitter == 3


def test_parse_args_demo_recipe_per_framework_and_its_data(tmp_path, monkeypatch):
    """--demo: each framework's recipe (flags win; BYOL's lr leaves warm-up); data/cifar10-jpg if there, else torchvision."""
    monkeypatch.chdir(tmp_path)
    moco = train.parse_args(["--demo"])
    assert (moco.framework, moco.arch, moco.image_size, moco.crop_size, moco.lr, moco.queue_size, moco.max_steps) == (
        "moco", "resnet18", 64, 32, 0.4, 0, 180)
    assert (moco.dataset, moco.data) == ("cifar10", "data")
    byol = train.parse_args(["--demo", "--framework", "byol", "--max-steps", "50"])
    assert (byol.optimizer, byol.warmup_epochs, byol.max_steps) == ("lars", 0, 50)
    assert byol.lr == train.DEMO_FRAMEWORK_DEFAULTS["byol"]["lr"] and byol.lr != train.FRAMEWORK_DEFAULTS["byol"]["lr"]
    os.makedirs(os.path.join("data", "cifar10-jpg", "train"))
    demo = train.parse_args(["--demo"])
    assert (demo.dataset, demo.data) == ("imagefolder", os.path.join("data", "cifar10-jpg", "train"))
    assert train.parse_args(["--demo", "--data", "elsewhere"]).data == "elsewhere"


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


# ==================================================================================================
# eval_knn.py
# ==================================================================================================

def test_knn_predict_hand_computed():
    """knn_predict: score[i, c] = sum of exp(cos / T) over the k nearest train rows of class c (raw inputs)."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    scores = knn_predict(train_x, labels, torch.tensor([[2.0, 0.0], [0.0, 3.0]]), k=2, temperature=0.5, num_classes=3)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(0.6 / 0.5), 0.0],
                             [0.0, math.exp(1 / 0.5) + math.exp(0.8 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_knn_ties_rank_the_lower_class_first():
    """accuracy ranks tied scores lower class first; neighbours tied at the k-th place of one class score the same."""
    train_x, labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0])
    scores = knn_predict(train_x, labels, torch.tensor([[1.0, 0.0]]), k=2, temperature=0.07, num_classes=2)
    assert scores[0, 0] == scores[0, 1]
    assert accuracy(scores, torch.tensor([0])) == (100.0, 100.0)
    assert accuracy(scores, torch.tensor([1])) == (0.0, 100.0)
    train_x, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    scores = knn_predict(train_x, labels, torch.tensor([[0.0, 1.0]]), k=1, temperature=0.1, num_classes=2)
    torch.testing.assert_close(scores, torch.tensor([[0.0, math.exp(10.0)]]))


def test_accuracy_top1_top5_percent_and_empty_set():
    """accuracy -> (top-1 %, top-5 %); top-5 is top-K when K < 5; an empty set gives (0, 0)."""
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.5],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    assert accuracy(scores, torch.tensor([0, 6, 2, 1])) == (50.0, 75.0)
    assert accuracy(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([2])) == (0.0, 100.0)
    assert accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == (0.0, 0.0)


def test_k_larger_than_train_set_and_top5_with_few_classes():
    """k is clamped to the train set size; with 3 classes top-5 is 100 %."""
    torch.manual_seed(0)
    train_x, labels, test_x = torch.randn(3, 8), torch.tensor([0, 1, 2]), torch.randn(4, 8)
    torch.testing.assert_close(knn_predict(train_x, labels, test_x, 200, 0.07, 3),
                               knn_predict(train_x, labels, test_x, 3, 0.07, 3))
    results = evaluate_knn(train_x, labels, test_x, torch.tensor([0, 1, 2, 0]), [1, 5, 200], 0.07, num_classes=3)
    assert set(results) == {1, 5, 200}
    assert all(r["top5"] == 100.0 for r in results.values())
    assert results[5] == results[200]


def test_top5_with_k_below_5():
    """With k = 1 the other top-5 classes are zero-score ones, lowest index first."""
    train_x, labels = torch.eye(3), torch.tensor([7, 1, 2])
    test_x = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.1, 0.0]])
    scores = knn_predict(train_x, labels, test_x, k=1, temperature=0.07, num_classes=10)
    assert (scores > 0).sum() == 2 and scores[0, 7] > 0
    assert accuracy(scores, torch.tensor([2, 8])) == (0.0, 50.0)   # top 5: 7, 0, 1, 2, 3
    results = evaluate_knn(train_x, labels, test_x, torch.tensor([7, 3]), [1], 0.07, 10)
    assert results[1] == {"top1": 50.0, "top5": 100.0}


def test_one_image_test_set():
    """evaluate_knn on a one-image test set gives 100 % when its nearest neighbour has its class."""
    train_x, labels = torch.eye(4), torch.tensor([0, 1, 2, 3])
    results = evaluate_knn(train_x, labels, torch.tensor([[0.0, 1.0, 0.1, 0.0]]), torch.tensor([1]), [1, 20], 0.07, 4)
    assert results[1] == {"top1": 100.0, "top5": 100.0}


def test_chunked_equals_unchunked():
    """knn_predict and evaluate_knn give the same results for any chunk_size."""
    torch.manual_seed(0)
    train_x, labels, test_x = torch.randn(60, 16), torch.randint(0, 5, (60,)), torch.randn(37, 16)
    full = knn_predict(train_x, labels, test_x, 7, 0.07, 5, chunk_size=1000)
    for chunk_size in (1, 5, 36):   # equal up to float rounding: matmuls of 1 and 37 rows may sum in another order
        chunked = knn_predict(train_x, labels, test_x, 7, 0.07, 5, chunk_size=chunk_size)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    test_labels = torch.randint(0, 5, (37,))
    assert (evaluate_knn(train_x, labels, test_x, test_labels, [1, 7], 0.07, 5, chunk_size=4)
            == evaluate_knn(train_x, labels, test_x, test_labels, [1, 7], 0.07, 5, chunk_size=1000))


def test_evaluate_knn_counts_a_repeated_k_once():
    """evaluate_knn with ks [1, 1] equals ks [1] (hit counts are not doubled)."""
    torch.manual_seed(0)
    train_x, test_x = torch.randn(30, 8), torch.randn(10, 8)
    train_y, test_y = torch.randint(0, 3, (30,)), torch.randint(0, 3, (10,))
    twice = evaluate_knn(train_x, train_y, test_x, test_y, [1, 1], 0.07, 3)
    assert twice == evaluate_knn(train_x, train_y, test_x, test_y, [1], 0.07, 3)


class _LargeOutputs(TorchDispatchMode):
    """Records the aten ops that allocate a tensor of at least `numel` elements (views of their inputs excepted)."""
    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storage = lambda tensors: [t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)]
        given = storage([*args, *(kwargs or {}).values()])
        self.ops += [str(func) for t in (out if isinstance(out, (tuple, list)) else [out])
                     if isinstance(t, torch.Tensor) and t.numel() >= self.numel and storage([t])[0] not in given]
        return out


def test_knn_eval_holds_the_train_features_once():
    """knn_eval makes one tensor the size of the train features [N, C] (extract_features' buffer, filled in place):
    no concatenated copy, no normalised copy (at ImageNet's 1.28M x 2048 each would be another 10.5 GB per GPU).
    Sizes chosen so that nothing else (activations of 16 images, a chunk's similarities) is as large."""
    torch.manual_seed(0)
    trunk, num_train = models.Trunk("resnet18", "cifar"), 256
    train_set = TensorDataset(torch.randn(num_train, 3, 8, 8), torch.arange(num_train) % 4)
    val_set = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 4)
    with _LargeOutputs(num_train * trunk.out_channels) as large:
        results = eval_knn.knn_eval(trunk, train_set, val_set, [1, 20], 0.07, 4, 16, 0, "cpu")
    assert large.ops == ["aten.zeros.default"], large.ops
    assert set(results) == {1, 20}


def test_extract_features_pooled_in_order_and_bn_untouched():
    """extract_features: eval-mode pooled features [N, C], labels [N] in loader order; BN buffers untouched."""
    torch.manual_seed(0)
    trunk = models.Trunk("resnet18", "cifar").train()          # left in train mode on purpose
    _randomise_bn(trunk)
    before = {name: buffer.clone() for name, buffer in trunk.named_buffers()}
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    features, got_labels = extract_features(trunk, DataLoader(TensorDataset(images, labels), batch_size=4), "cpu")
    assert features.shape == (10, 512) and features.dtype == torch.float32 and torch.equal(got_labels, labels)
    with torch.no_grad():
        torch.testing.assert_close(features, trunk.eval().pooled(images), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(buffer, before[name]) for name, buffer in trunk.named_buffers())


def test_extract_features_prints_progress_every_10_s(monkeypatch, capsys):
    """extract_features prints 'name: n/N images' when more than 10 s passed since the last print, and not before."""
    trunk = models.Trunk("resnet18", "cifar")
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 8, 8), torch.zeros(12, dtype=torch.long)), batch_size=4)
    clock = [1000.0]

    def tick(seconds):
        def now():
            clock[0] += seconds
            return clock[0]
        return now

    monkeypatch.setattr(eval_knn.time, "time", tick(11.0))
    extract_features(trunk, loader, "cpu", "probe-set")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split(" (")[0] for line in lines] == ["probe-set: 4/12 images", "probe-set: 8/12 images",
                                                       "probe-set: 12/12 images"]
    monkeypatch.setattr(eval_knn.time, "time", tick(1.0))
    extract_features(trunk, loader, "cpu", "probe-set")
    assert capsys.readouterr().out == ""


def test_weights_of_another_arch_exit_with_one_line(tmp_path):
    """build_trunk with weights of another arch exits with a one-line error naming the requested arch."""
    path = str(tmp_path / "backbone.pth")
    torch.save(models.Trunk("resnet18", "cifar").state_dict(), path)
    with pytest.raises(SystemExit) as error:
        build_trunk(argparse.Namespace(weights=path, arch="resnet34", stem="cifar", seed=0), "cpu")
    assert_one_line_error(error.value, "resnet34")


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """train/ (6 per class) and val/ (3 per class) folders of three classes of 32 px images, coloured by class."""
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


def run_eval(script, *args):
    """Run an evaluation script on a random-init resnet18 (cifar stem) at 32 px."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), "--weights", "random", "--arch", "resnet18",
                           "--stem", "cifar", "--image-size", "32", "--workers", "0", "--batch-size", "16",
                           *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, timeout=120, env=ENV)


def test_knn_cli_separates_coloured_classes(image_folders, tmp_path):
    """eval_knn CLI on red/green/blue classes: a random-init trunk scores 100 % top-1 at k = 1 and 5."""
    out = tmp_path / "knn.json"
    done = run_eval("eval_knn.py", "--data", image_folders / "train", "--val-data", image_folders / "val",
                    "--k", 1, 5, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (18, 9, 3)
    assert result["knn"] == {"1": {"top1": 100.0, "top5": 100.0}, "5": {"top1": 100.0, "top5": 100.0}}


def test_missing_val_data_is_a_one_line_error(image_folders):
    """eval_knn with a --val-data that does not exist exits non-zero with one stderr line naming it, no traceback."""
    missing = image_folders / "no-such-split"
    done = run_eval("eval_knn.py", "--data", image_folders / "train", "--val-data", missing)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(missing) in done.stderr


# ==================================================================================================
# eval_linear.py
# ==================================================================================================

def test_balanced_subset():
    """balanced_subset keeps round(f * n_c) per class by seed; f outside (0, 1] or keeping no image: ValueError."""
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 30)
    subset = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [2, 2, 3]
    assert torch.equal(subset, balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(subset, balanced_subset(labels, 0.1, seed=1))
    assert len(balanced_subset(labels, 1.0, seed=0)) == 70
    for fraction in (0.01, 0.0, 1.5):                           # 0.01 * 20 rounds to no image
        with pytest.raises(ValueError, match="label-fraction"):
            balanced_subset(labels, fraction, seed=0)


def test_probe_leaves_the_trunk_unchanged():
    """train_probe on frozen_features changes neither the trunk's BN statistics nor its weights or grads."""
    torch.manual_seed(0)
    trunk = models.Trunk("resnet18", "cifar").train()          # left in train mode on purpose
    before = {name: value.clone() for name, value in trunk.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.tensor([0, 1] * 4)), batch_size=4)
    val_features, val_labels = extract_features(trunk, loader, "cpu")
    train_probe(lambda epoch: frozen_features(trunk, loader, "cpu"), len(loader), val_features, val_labels,
                trunk.out_channels, 2, [0.1], epochs=2)
    assert all(torch.equal(value, before[name]) for name, value in trunk.state_dict().items())
    assert all(p.grad is None for p in trunk.parameters())
    torch.testing.assert_close(extract_features(trunk, loader, "cpu")[0], val_features)


def _clusters(per_class, seed):
    """Three well-separated Gaussian clusters in 16-d: (features [3n, 16], labels [3n])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 5
    labels = torch.arange(3).repeat(per_class)
    return centres[labels] + torch.randn(len(labels), 16, generator=g), labels


def test_probe_separates_separable_features():
    """train_probe reaches 100 % top-1 on well-separated clusters (and top-5 100 % with 3 classes)."""
    torch.manual_seed(0)
    (train_x, labels), (val_x, val_labels) = _clusters(40, 1), _clusters(20, 2)
    generator = torch.Generator().manual_seed(0)
    results = train_probe(lambda epoch: cached_batches(train_x, labels, 32, generator), 4, val_x, val_labels,
                          16, 3, [0.1, 1.0], epochs=10)
    assert [r["lr"] for r in results] == [0.1, 1.0]
    assert max(r["best_top1"] for r in results) == 100.0
    assert all(r["best_top5"] == 100.0 for r in results)


def test_probe_best_epoch_is_the_first_epoch_of_the_best_accuracy():
    """train_probe: best_epoch is the first epoch of the best top-1 (a tie keeps it); last_* the final epoch."""
    # Epoch 1 trains nothing (heads at init), epochs 2-3 learn the clusters (100 %), epoch 4 learns shifted labels.
    torch.manual_seed(0)
    (train_x, labels), (val_x, val_labels) = _clusters(40, 1), _clusters(20, 2)
    generator = torch.Generator().manual_seed(0)

    def make_batches(epoch):
        if epoch == 1:
            return iter(())
        return cached_batches(train_x, labels if epoch < 4 else (labels + 1) % 3, 8, generator)

    result, = train_probe(make_batches, 15, val_x, val_labels, 16, 3, [1.0], epochs=4)
    assert result["best_epoch"] == 2 and result["best_top1"] == 100.0 and result["best_top5"] == 100.0
    assert result["last_top1"] < 50.0 and result["last_top5"] == 100.0


def _probe_history(stdout):
    """Per-lr val top-1 history from eval_linear's 'epoch e/E ... val top-1 per lr: lr:acc ...' lines."""
    history = {}
    for line in stdout.splitlines():
        if line.startswith("epoch ") and "val top-1 per lr:" in line:
            for item in line.split("val top-1 per lr:")[1].split():
                lr, top1 = item.split(":")
                history.setdefault(float(lr), []).append(float(top1))
    return history


def test_linear_cli_cached_reaches_the_separable_accuracy(image_folders, tmp_path):
    """eval_linear CLI on red/green/blue: best head 100 %; best_epoch/best/last = first argmax/max/last of its log;
    no warning printed."""
    out = tmp_path / "linear.json"
    done = run_eval("eval_linear.py", "--data", image_folders / "train", "--epochs", 3, "--lr", 0.1, 1,
                    "--label-fraction", 0.5, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_val"], result["num_classes"], len(result["heads"])) == (9, 9, 3, 2)
    assert result["best"] == max(result["heads"], key=lambda r: r["best_top1"])
    assert result["best"]["best_top1"] == 100.0 and result["best"]["best_top5"] == 100.0
    history = _probe_history(done.stdout)
    assert sorted(history) == [0.1, 1.0] and all(len(h) == 3 for h in history.values())
    for head in result["heads"]:
        h = history[head["lr"]]
        assert head["best_top1"] == pytest.approx(max(h), abs=0.05)
        assert head["best_epoch"] == h.index(max(h)) + 1
        assert head["last_top1"] == pytest.approx(h[-1], abs=0.05)


# ---- both eval scripts on --dataset imagenet100

@pytest.mark.parametrize("script", [eval_knn, eval_linear])
def test_eval_scripts_run_on_imagenet100(script, imagenet, tmp_path, monkeypatch):
    """eval_knn.py and eval_linear.py take --dataset imagenet100 and evaluate on its 100 classes (val/ beside)."""
    extra = ["--k", "1"] if script is eval_knn else ["--epochs", "1", "--lr", "0.1"]
    monkeypatch.setattr(sys, "argv", [script.__name__, "--weights", "random", "--arch", "resnet18", "--stem", "cifar",
                                      "--dataset", "imagenet100", "--data", str(imagenet / "train"), "--image-size",
                                      "8", "--workers", "0", "--batch-size", "100", "--out", str(tmp_path / "r.json"),
                                      *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny convolutions on shared cores
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "r.json") as file:
        result = json.load(file)
    assert (result["args"]["dataset"], result["num_train"], result["num_classes"]) == ("imagenet100", 200, 100)


# ---- --label-list (SimCLR's 1 % / 10 % files)

@pytest.fixture
def synset_tree(tmp_path):
    """train/<synset>/<synset>_<i>.JPEG for two synsets, 3 images each, as ImageNet names them."""
    for synset in ("n00000001", "n00000002"):
        os.makedirs(tmp_path / "train" / synset)
        for i in range(3):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(tmp_path / "train" / synset / f"{synset}_{i}.JPEG")
    return tmp_path


def test_label_list_keeps_exactly_the_listed_files_and_ignores_other_classes(synset_tree):
    """The listed files of the tree's classes, nothing else; a listed file of a class not in the tree is ignored."""
    folder = torchvision.datasets.ImageFolder(synset_tree / "train")
    listed = ["n00000001_2.JPEG", "n00000002_0.JPEG", "n00000002_1.JPEG", "n09999999_7.JPEG"]
    (synset_tree / "list.txt").write_text("\n".join(listed) + "\n\n")
    kept = eval_linear.listed_subset(folder.samples, folder.classes, str(synset_tree / "list.txt"))
    assert sorted(os.path.basename(folder.samples[i][0]) for i in kept) == listed[:3]


def test_label_list_missing_files_fail_in_one_line_with_count_and_example(synset_tree, monkeypatch):
    """eval_linear --label-list: listed files absent from --data end in one line with their count and the first;
    an unreadable list, or one naming none of the classes, is a one-line ValueError."""
    (synset_tree / "list.txt").write_text("n00000001_0.JPEG\nn00000002_9.JPEG\nn00000001_8.JPEG\n")
    monkeypatch.setattr(sys, "argv", ["eval_linear.py", "--weights", "random", "--arch", "resnet18", "--data",
                                      str(synset_tree / "train"), "--val-data", str(synset_tree / "train"),
                                      "--label-list", str(synset_tree / "list.txt"), "--workers", "0"])
    with pytest.raises(SystemExit) as done:
        eval_linear.main()
    message = str(done.value)
    assert "\n" not in message and message.startswith("error: 2 of the 3 files that")
    assert "e.g. n00000001_8.JPEG" in message
    folder = torchvision.datasets.ImageFolder(synset_tree / "train")
    (synset_tree / "other.txt").write_text("n09999999_7.JPEG\n")
    for path, fragment in (("absent.txt", "cannot read --label-list"), ("other.txt", "names no file of the 2")):
        with pytest.raises(ValueError, match=fragment):
            eval_linear.listed_subset(folder.samples, folder.classes, str(synset_tree / path))


# ==================================================================================================
# eval_transfer.py
# ==================================================================================================

def _gaussian_classes(n, d, k, seed, spread=1.0):
    """features [n, d] float64 (class means + unit noise), labels [n] = i mod k."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    means = spread * torch.randn(k, d, generator=generator, dtype=torch.float64)
    return means[labels] + torch.randn(n, d, generator=generator, dtype=torch.float64), labels


def _objective(features, labels, lam):
    return lambda W, b: F.cross_entropy(features @ W + b, labels) + lam / 2 * W.square().sum()


def _newton(features, labels, k, lam, steps=30):
    """An independent solve: Newton's method on the flat (W, b) in float64, autograd's Hessian, pinv (b is
    defined up to a constant)."""
    d, objective = features.shape[1], _objective(features, labels, lam)
    flat = lambda theta: objective(theta[:d * k].view(d, k), theta[d * k:])
    theta = torch.zeros(d * k + k, dtype=torch.float64)
    for _ in range(steps):
        gradient = torch.autograd.functional.jacobian(flat, theta)
        theta = theta - torch.linalg.pinv(torch.autograd.functional.hessian(flat, theta)) @ gradient
    assert torch.autograd.functional.jacobian(flat, theta).abs().max() < 1e-12
    return theta[:d * k].view(d, k), theta[d * k:]


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0])
def test_fit_logistic_gradient_of_the_regularised_loss_vanishes(lam):
    """The fitted (W, b) zero the gradient of mean CE + lam / 2 ||W||^2, computed again here: every entry below
    1e-5 of the largest at W = 0, b = 0; the bias carries no penalty. The fit's own figure (fp32 passes over the
    features) agrees within a tenth of the tolerance: the margin its stopping rule keeps."""
    features, labels = _gaussian_classes(400, 16, 4, seed=0)
    W, b, relative = eval_transfer.fit_logistic(features, labels, 4, lam)
    objective = _objective(features, labels, lam)
    zero = [torch.zeros_like(W, requires_grad=True), torch.zeros_like(b, requires_grad=True)]
    reference = max(g.abs().max() for g in torch.autograd.grad(objective(*zero), zero))
    params = [W.clone().requires_grad_(), b.clone().requires_grad_()]
    gradient = max(g.abs().max() for g in torch.autograd.grad(objective(*params), params))
    assert gradient / reference < 1e-5 and abs(relative - float(gradient / reference)) < 1e-6


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_fit_logistic_matches_a_float64_newton_solve(lam):
    """On a small problem, W and the centred b agree with Newton's within 1e-4, from zero and from a warm start."""
    features, labels = _gaussian_classes(60, 5, 3, seed=1)
    newton_W, newton_b = _newton(features, labels, 3, lam)
    warm = eval_transfer.fit_logistic(features, labels, 3, lam * 10)[:2]
    for init in (None, warm):
        W, b, _ = eval_transfer.fit_logistic(features, labels, 3, lam, init)
        assert (W - newton_W).abs().max() < 1e-4
        assert ((b - b.mean()) - (newton_b - newton_b.mean())).abs().max() < 1e-4


def _lbfgs_fit(features, labels, num_classes, lam, init=None, tolerance=1e-5, max_iter=1000):
    """eval_transfer.fit_logistic as it was before truncated Newton (full-batch fp64 L-BFGS, strong Wolfe line
    search, the same stopping rule): today's optimum, the reference of the specs below."""
    if init is None:
        counts = torch.bincount(labels, minlength=num_classes).to(features)
        init = features.new_zeros(features.shape[1], num_classes), counts.clamp_min(1).log()
    objective = _objective(features, labels, lam)
    zero = [torch.zeros_like(tensor, requires_grad=True) for tensor in init]
    reference = float(max(grad.abs().max() for grad in torch.autograd.grad(objective(*zero), zero)))
    W, b = (tensor.detach().clone().requires_grad_() for tensor in init)
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=tolerance * reference,
                                  tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(W, b)
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    eval_transfer._PROBLEM["steps"] = (0, 0)   # what transfer_fit reads after each fit
    return W.detach(), b.detach(), float(max(W.grad.abs().max(), b.grad.abs().max())) / reference


def _correlated_classes(n, d, k, seed):
    """_gaussian_classes mixed by a random map of singular values 1 down to 1e-3, then standardised: correlated
    columns, as pooled CNN features are (their Gram matrix spans decades), which slow plain gradient methods."""
    features, labels = _gaussian_classes(n, d, k, seed, spread=0.5)
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    features = features @ (mixing * torch.logspace(0, -3, d, dtype=torch.float64))
    return (features - features.mean(0)) / features.std(0), labels


@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("lam", [1e-6, 1e-3, 1.0, 1e3])
def test_fit_logistic_reaches_todays_float64_optimum_from_the_weakest_to_a_strong_lambda(lam, correlated):
    """600 x 6 features of 3 overlapping classes (a finite optimum even at lambda 1e-6), plain or correlated:
    truncated Newton (fp32 directions, fp64 gradient), from zero and warm from lambda * 10, converges to the
    optimum of an independent float64 Newton solve: objective within 1e-10, W and centred b within 2e-5 (the
    stopping rule allows ~1e-5 here). Today's L-BFGS, warm-started as in the sweep, is within 1e-9 and 1e-4."""
    features, labels = (_correlated_classes if correlated else
                        lambda *a: _gaussian_classes(*a, spread=0.5))(600, 6, 3, 3)
    objective, (newton_W, newton_b) = _objective(features, labels, lam), _newton(features, labels, 3, lam)
    warm = eval_transfer.fit_logistic(features, labels, 3, lam * 10)[:2]
    today = _lbfgs_fit(features, labels, 3, lam, [tensor.clone() for tensor in warm], max_iter=200)
    fits = [eval_transfer.fit_logistic(features, labels, 3, lam, init) for init in (None, warm)]
    for (W, b, relative), (value, weights) in [(fit, (1e-10, 2e-5)) for fit in fits] + [(today, (1e-9, 1e-4))]:
        assert abs(float(objective(W, b) - objective(newton_W, newton_b))) < value
        assert (W - newton_W).abs().max() < weights
        assert ((b - b.mean()) - (newton_b - newton_b.mean())).abs().max() < weights
    assert all(relative <= 1e-5 for *_, relative in fits)


def test_fit_logistic_with_fewer_images_than_dimensions_reaches_the_optimum_in_their_span():
    """20 images of 50 dimensions (lambda 0.1): the l2 optimum lies in the span of the images, so a float64 Newton
    solve on their coordinates in an orthonormal basis Q of it gives it exactly (W = Q W_span); the fit converges
    and lands there: objective within 1e-8, W within 1e-4 (the preconditioner is exact off the span: H = lambda)."""
    features, labels = _gaussian_classes(20, 50, 4, seed=5)
    span = torch.linalg.svd(features, full_matrices=False)[2].T   # [50, 20]
    W_span, b_span = _newton(features @ span, labels, 4, 0.1)
    W, b, relative = eval_transfer.fit_logistic(features, labels, 4, 0.1)
    objective = _objective(features, labels, 0.1)
    assert relative <= 1e-5 and abs(float(objective(W, b) - objective(span @ W_span, b_span))) < 1e-8
    assert (W - span @ W_span).abs().max() < 1e-4


def test_transfer_fit_picks_todays_lambda_and_test_accuracy_and_prints_a_line_per_fit(monkeypatch, capsys):
    """A small fixed dataset (500 x 8, 3 classes; its val curve peaks at lambda 0.56 alone): the new sweep's val
    curve, chosen lambda and test top-1 equal those of today's L-BFGS sweep; one progress line per fit (lambda,
    score, steps, seconds, ETA), and the JSON's fits: 45 + the refit, all converged."""
    features, labels = _gaussian_classes(500, 8, 3, seed=10, spread=0.5)
    train, val, test = ((features[part], labels[part]) for part in (slice(300), slice(300, 400), slice(400, None)))
    result = eval_transfer.transfer_fit(train, val, test)
    lines = capsys.readouterr().out.splitlines()
    with monkeypatch.context() as patch:
        patch.setattr(eval_transfer, "fit_logistic", _lbfgs_fit)
        today = eval_transfer.transfer_fit(train, val, test)
    assert result["val_curve"] == today["val_curve"] and result["best_lambda"] == today["best_lambda"]
    assert result["best_lambda"] == pytest.approx(0.5623413) and result["test"] == today["test"] == 78.0
    assert len(lines) == 46 and all(re.fullmatch(r"  lambda \S+: (val \(\d+ of 45\)|refit, test) [\d.]+ %, \d+ Newton "
                                                  r"steps \(\d+ Hessian products\), [\d.]+ s, relative gradient "
                                                  r"\S+, ETA \d+ s", line) for line in lines)
    assert lines[0].startswith("  lambda 1e+05: val (1 of 45)")
    assert lines[-1].startswith("  lambda 0.562: refit, test 78.00 %")
    fits = result["fits"]
    assert [fit[0] for fit in fits] == pytest.approx(eval_transfer.LAMBDAS + [result["best_lambda"]])
    assert all(fit[2] >= fit[1] >= 0 and fit[3] >= 0 and fit[4] <= 1e-5 for fit in fits)


def test_score_top1_and_mean_per_class_by_hand():
    """Unbalanced toy: class 0 gets 3 of 4 right, class 1 0 of 1, class 2 2 of 2; class 3 is absent."""
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 2, 0, 2, 2])
    logits = F.one_hot(predicted, 4).double()
    assert eval_transfer.score(logits, labels) == pytest.approx(100 * 5 / 7)
    assert eval_transfer.score(logits, labels, per_class=True) == pytest.approx((75 + 0 + 100) / 3)


@pytest.mark.parametrize("scale", [lambda lam: lam, math.log, lambda lam: 1 / lam])
def test_extrapolate_continues_a_path_quadratic_in_lambda_its_log_or_its_inverse(scale):
    """Solutions that move along a quadratic in scale(lambda) over five fits of the sweep's grid: the sixth start is
    that quadratic's value (the scale that predicted the fifth fit exactly is chosen); with one fit, that fit's
    [W, b]; with two, the line through them in log lambda."""
    generator = torch.Generator().manual_seed(0)
    A, B, C = (torch.randn(5, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    path_at = lambda lam: A + B * scale(lam) + C * scale(lam) ** 2   # [W; b] at lam, [5, 4]
    lambdas = sorted(eval_transfer.LAMBDAS, reverse=True)[20:26]
    path = [[lam, 50.0, [path_at(lam)[:-1], path_at(lam)[-1]]] for lam in lambdas[:5]]
    W, b = eval_transfer.extrapolate(path, lambdas[5])
    assert torch.allclose(torch.cat([W, b[None]]), path_at(lambdas[5]), rtol=1e-8, atol=1e-8)
    assert all(torch.equal(u, v) for u, v in zip(eval_transfer.extrapolate(path[:1], 1.0), path[0][2]))
    (l0, _, (W0, _)), (l1, _, (W1, _)) = path[:2]
    line = W1 + (W1 - W0) * (math.log(lambdas[2]) - math.log(l1)) / (math.log(l1) - math.log(l0))
    assert torch.allclose(eval_transfer.extrapolate(path[:2], lambdas[2])[0], line, rtol=1e-12, atol=1e-12)


def test_transfer_fit_sweeps_warm_picks_the_best_val_lambda_and_refits_on_train_plus_val(monkeypatch):
    """45 fits from lambda 1e5 down to 1e-6, each from extrapolate(the fits before it); the val curve scores each; the best
    (of ties the largest lambda) is refitted from its solution on train + val, standardised anew; test scored once."""
    calls, fit = [], eval_transfer.fit_logistic
    monkeypatch.setattr(eval_transfer, "fit_logistic", lambda *a: calls.append((a, fit(*a))) or calls[-1][1])
    features, labels = _gaussian_classes(260, 30, 3, seed=2, spread=0.3)
    train, val = (features[:120], labels[:120]), (features[120:160], labels[120:160])
    test = features[160:], labels[160:]
    result = eval_transfer.transfer_fit(train, val, test)
    assert len(calls) == 46 and [c[0][3] for c in calls[:45]] == sorted(eval_transfer.LAMBDAS, reverse=True)
    path = [[a[3], None, list(fitted[:2])] for a, fitted in calls[:45]]
    assert calls[0][0][4] is None
    assert all(all(torch.equal(u, v) for u, v in zip(c[0][4], eval_transfer.extrapolate(path[:i], c[0][3])))
               for i, c in enumerate(calls[1:45], 1))
    standardise = lambda x, ref: (x - ref.mean(0)) / ref.std(0)
    curve = [[a[3], eval_transfer.score(standardise(val[0], train[0]) @ W + b, val[1])] for a, (W, b, _) in calls[:45]]
    flat = lambda points: [value for point in points for value in point]
    assert flat(result["val_curve"]) == pytest.approx(flat(curve[::-1]))
    assert len({round(v, 6) for _, v in curve}) > 1   # the choice is not trivial
    best = next(point for point in curve if point[1] == max(v for _, v in curve))
    (x, y, _, lam, init), (W, b, _) = calls[45]
    everything = torch.cat([train[0], val[0]])
    assert lam == best[0] == result["best_lambda"] and torch.equal(y, torch.cat([train[1], val[1]]))
    assert torch.allclose(x, standardise(everything, everything))
    assert all(torch.equal(u, v) for u, v in zip(init, calls[curve.index(best)][1][:2]))
    assert result["test"] == eval_transfer.score(standardise(test[0], everything) @ W + b, test[1])


class _DatasetRecorder:
    """Stands in for a torchvision dataset class: records its arguments, builds nothing, downloads nothing."""
    calls = []

    def __init__(self, root, **kwargs):
        self.calls.append((type(self).__name__, root, kwargs))


SPLIT_ARGUMENTS = {
    "cifar10": ("CIFAR10", [{"train": True}, {"train": False}]),
    "cifar100": ("CIFAR100", [{"train": True}, {"train": False}]),
    "stl10": ("STL10", [{"split": "train"}, {"split": "test"}]),
    "food101": ("Food101", [{"split": "train"}, {"split": "test"}]),
    "flowers102": ("Flowers102", [{"split": "train"}, {"split": "val"}, {"split": "test"}]),
    "dtd": ("DTD", [{"split": s, "partition": 1} for s in ("train", "val", "test")]),
    "pets": ("OxfordIIITPet", [{"split": "trainval", "target_types": "category"},
                               {"split": "test", "target_types": "category"}]),
    "cars": ("StanfordCars", [{"split": "train", "download": False}, {"split": "test", "download": False}])}


def test_each_dataset_builds_its_torchvision_class_with_the_papers_splits(monkeypatch, tmp_path):
    """Every name builds its torchvision class with the split arguments (downloading into --root, cars excepted);
    flowers102 and dtd bring their official val split, the others none (held out of train)."""
    monkeypatch.chdir(tmp_path)   # where the download lock makes --root
    for kind, _ in SPLIT_ARGUMENTS.values():
        monkeypatch.setattr(torchvision.datasets, kind, type(kind, (_DatasetRecorder,), {}))
    args, transform = argparse.Namespace(root="somewhere"), object()
    for name, (kind, splits) in SPLIT_ARGUMENTS.items():
        _DatasetRecorder.calls.clear()
        built = eval_transfer.load_splits(name, args, transform)
        assert (built["val"] is None) == (name not in ("flowers102", "dtd"))
        assert _DatasetRecorder.calls == [(kind, "somewhere", {"transform": transform, "download": True, **split})
                                   for split in splits]


def test_held_out_split_is_stratified_and_fixed_by_the_seed():
    """20 % of every class (rounded half up) as val, the rest train, disjoint; the same for a seed, not another; a
    class of 2 images holds none out: a ValueError that names the dataset."""
    shuffle = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 3 + [3] * 7)[shuffle]
    train_index, val_index = eval_transfer.held_out(labels, seed=0)
    assert torch.bincount(labels[val_index]).tolist() == [2, 1, 1, 1]
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(25))
    assert torch.equal(eval_transfer.held_out(labels, seed=0)[1], val_index)
    assert not torch.equal(eval_transfer.held_out(labels, seed=1)[1], val_index)
    with pytest.raises(ValueError, match="pets's val share 0.2 keeps no image of class 1"):
        eval_transfer.held_out(torch.tensor([0] * 10 + [1] * 2), seed=0, name="pets")


def test_transfer_help_lists_the_datasets_and_a_missing_out_folder_stops_first(monkeypatch, capsys):
    """--help prints (argparse formats every help string) and names the nine datasets and the 20 % share; an --out
    in a missing folder is a usage error before any work."""
    monkeypatch.setattr(sys, "argv", ["eval_transfer.py", "--help"])
    with pytest.raises(SystemExit) as done:
        eval_transfer.main()
    shown = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "20 % of --data held out" in shown
    assert all(name in shown for name in [*eval_transfer.TORCHVISION, "imagefolder"])
    monkeypatch.setattr(sys, "argv", ["eval_transfer.py", "--weights", "random", "--out", "/no/such/folder/t.json"])
    with pytest.raises(SystemExit) as done:   # before any extraction or fit
        eval_transfer.main()
    assert done.value.code == 2 and "--out /no/such/folder/t.json: its folder does not exist" in capsys.readouterr().err


def test_transfer_cli_runs_imagefolder_and_a_missing_dataset_fails_alone(image_folders, tmp_path):
    """--datasets imagefolder cars: cars (not there) is one line and exit 1; imagefolder still runs, 20 % of train
    held out, 100 % test on red/green/blue, its JSON entry and the table with the paper's rows."""
    out = tmp_path / "transfer.json"
    done = run_eval("eval_transfer.py", "--datasets", "imagefolder", "cars", "--root", tmp_path, "--data",
                    image_folders / "train", "--test-data", image_folders / "val", "--out", out)
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("error: cars could not be loaded") and "stanford_cars" in errors[0]
    assert errors[1] == "error: 1 of 2 datasets did not run: cars"
    result = json.loads(out.read_text())
    entry = result["datasets"]["imagefolder"]
    assert (entry["num_train"], entry["num_val"], entry["num_test"], entry["metric"]) == (15, 3, 9, "top1")
    assert entry["test"] == 100.0 and result["failed"] == ["cars"]
    assert [lam for lam, _ in entry["val_curve"]] == pytest.approx(eval_transfer.LAMBDAS)
    assert entry["best_lambda"] in [lam for lam, _ in entry["val_curve"]] and entry["relative_gradient"] < 1e-5
    assert "| MosRep BYOL (paper) | 93.7 | 78.2 | 97.8 | 77.3 | 90.9 | 72.5 | 91.2 | 63.0 | - |" in done.stdout
    assert "| this run (random) | - | - | - | - | - | - | - | - | 100.0 |" in done.stdout


# ==================================================================================================
# eval_finetune.py
# ==================================================================================================

def run_main(module, monkeypatch, *args):
    """module.main() in this process on a random-init resnet18 (imagenet stem) at 32 px, batch 6, no loader workers."""
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", "--weights", "random", "--arch", "resnet18", "--stem",
                                      "imagenet", "--image-size", "32", "--workers", "0", "--batch-size", "6",
                                      *map(str, args)])
    module.main()


def _torchvision_scores(path, folder, num_classes):
    """(top-1 %, top-5 %) on the images of folder of torchvision's resnet18 loaded (strictly) from the file at path."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.load_state_dict(torch.load(path, weights_only=True))
    images, labels = zip(*torchvision.datasets.ImageFolder(folder, data.eval_transform(32), loader=data.load_image))
    with torch.no_grad():
        return accuracy(net.eval()(torch.stack(images)), torch.tensor(labels))


def test_finetune_exports_the_network_it_scores(image_folders, tmp_path, monkeypatch):
    """eval_finetune: finetuned.pth (CPU tensors, the only file in --save) loads strictly into torchvision's resnet18
    and scores the JSON's top-1 and top-5."""
    flags = ["--data", image_folders / "train", "--val-data", image_folders / "val", "--epochs", 2, "--lr", 5]
    run_main(eval_finetune, monkeypatch, *flags, "--save", tmp_path / "a", "--out", tmp_path / "a.json")
    result = json.loads((tmp_path / "a.json").read_text())
    assert (result["num_train"], result["num_val"], result["num_classes"]) == (18, 9, 3)
    assert result["selection"] == "none: the last epoch, val scored once"
    exported = torch.load(tmp_path / "a" / "finetuned.pth", weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in exported.values())
    assert os.listdir(tmp_path / "a") == ["finetuned.pth"]
    assert _torchvision_scores(tmp_path / "a" / "finetuned.pth", image_folders / "val", 3) == (result["top1"],
                                                                                              result["top5"])


@pytest.mark.parametrize("fraction, epochs", [(0.04, 60), (0.1, 30)])
def test_finetune_default_epochs_follow_simclrs_1_and_10_percent(fraction, epochs, monkeypatch):
    """Without --epochs: 60 epochs when the labelled images are under 5 % of train (SimCLR's 1 %), else 30 (10 %)."""
    seen = []
    monkeypatch.setattr(eval_finetune, "fine_tune", lambda args, *rest: seen.append(args.epochs))
    run_main(eval_finetune, monkeypatch, "--dataset", "fake", "--fake-size", 500, "--label-fraction", fraction)
    assert seen == [epochs]


@pytest.mark.parametrize("extra, env, fragment", [
    (["--batch-size", "5"], {"WORLD_SIZE": "2"}, "--batch-size 5 is the global batch: it must split evenly over the 2"),
    (["--batch-size", "64"], {}, "18 train images make no full batch of --batch-size 64"),
    (["--amp", "fp16"], {}, "--amp fp16 needs a GPU"),
    (["--label-list", "x.txt", "--label-fraction", "0.5"], {}, "not allowed with argument"),
])
def test_finetune_bad_input_is_one_line(extra, env, fragment, image_folders, tmp_path, monkeypatch, capsys):
    """eval_finetune refuses a batch that does not split over the processes or makes no full batch, fp16 on a CPU and
    both label flags, in one line before any training step."""
    if torch.cuda.is_available() and "fp16" in extra:
        pytest.skip("fp16 runs on a GPU")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(eval_finetune.torch.optim.SGD, "step", lambda *a, **k: pytest.fail("a step ran"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        run_main(eval_finetune, monkeypatch, "--data", image_folders / "train", *extra)
    message = str(done.value.code) if done.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert fragment in message and "\n" not in message, message


def test_batch_size_is_the_global_batch_of_every_evaluation_script(monkeypatch):
    """process_batch: --batch-size over WORLD_SIZE processes (torchrun's), 1 without it; a batch that does not split,
    or one under 1, is a one-line SystemExit naming both."""
    assert eval_knn.process_batch(256) == 256
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert eval_knn.process_batch(256) == 32
    for batch in (100, 0):
        with pytest.raises(SystemExit) as error:
            eval_knn.process_batch(batch)
        assert_one_line_error(error.value, f"--batch-size {batch} is the global batch: it must split evenly over the 8")


def test_linear_holdout_selects_on_train_then_scores_val_once(image_folders, tmp_path, monkeypatch, capsys):
    """eval_linear --holdout 0.34: lr and epochs chosen on 2 of the 6 train images of each class (every epoch scored
    on them), refitted on all 18, the val split scored once; output and JSON say which selection ran. Without it, they
    say that the best lr and epoch are chosen on the val split."""
    run_main(eval_linear, monkeypatch, "--data", image_folders / "train", "--val-data", image_folders / "val",
             "--epochs", 3, "--lr", 0.1, 1, "--holdout", 0.34, "--out", tmp_path / "held.json")
    shown = capsys.readouterr().out
    result = json.loads((tmp_path / "held.json").read_text())
    chosen = max(result["heads"], key=lambda r: r["best_top1"])
    assert result["selection"] == (f"lr {chosen['lr']:g} and {chosen['best_epoch']} epochs chosen on a held-out 34 % "
                                   "of train (6 images), refitted on all 18, val scored once")
    assert shown.count("held-out top-1 per lr") == 3 and shown.count("val top-1 per lr") == 1
    assert f"selection: {result['selection']}" in shown
    run_main(eval_linear, monkeypatch, "--data", image_folders / "train", "--val-data", image_folders / "val",
             "--epochs", 1, "--lr", 0.1, "--out", tmp_path / "val.json")
    result = json.loads((tmp_path / "val.json").read_text())
    assert result["selection"] == "the best lr and epoch on the val split it reports"
    assert result["val"] == {"top1": result["best"]["best_top1"], "top5": result["best"]["best_top5"]}
    assert "selection: the best lr and epoch on the val split it reports" in capsys.readouterr().out


# ==================================================================================================
# every evaluation script under torchrun: 2 processes give the 1-process result
# ==================================================================================================

# One process group for all the scripts of a launch (runtime.distributed joins it and leaves the leaving to us): a group
# left and joined again per script races on torchrun's store.
RUN_MAINS = """
import json, sys
sys.path.insert(0, {here!r})
import torch.distributed as dist
import eval_finetune, eval_knn, eval_linear, eval_transfer
dist.init_process_group("gloo")
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
for module, argv in json.loads(sys.argv[1]):
    sys.argv = [module + ".py", *argv]
    sys.modules[module].main()
destroy()
"""


def _two_process_runs(folders, out):
    """{name: (module, flags)}: each script on tiny data, resnet18 at 32 px (imagenet stem), a global batch of 8."""
    tiny = ["--weights", "random", "--arch", "resnet18", "--image-size", "32", "--workers", "0", "--batch-size", "8"]
    fake = ["--dataset", "fake", "--fake-size", "40"]   # 40 train / 16 val images: 2 x 4 per step, 5 steps an epoch
    probe = [*tiny, *fake, "--epochs", "2", "--lr", "0.1", "1"]
    runs = {"knn": ("eval_knn", [*tiny, "--dataset", "fake", "--fake-size", "33", "--k", "1", "5", "20"]),
            "linear": ("eval_linear", probe), "linear_augment": ("eval_linear", [*probe, "--augment"]),
            "linear_holdout": ("eval_linear", [*probe, "--augment", "--holdout", "0.5"]),
            "transfer": ("eval_transfer", [*tiny, "--datasets", "imagefolder", "--data", str(folders / "train"),
                                           "--test-data", str(folders / "val")]),
            "finetune": ("eval_finetune", [*tiny, *fake, "--epochs", "2", "--lr", "1", "--save", str(out / "ft")])}
    return {name: (module, [*flags, "--out", str(out / f"{name}.json")]) for name, (module, flags) in runs.items()}


@pytest.fixture(scope="module")
def two_and_one_process(image_folders, tmp_path_factory):
    """{name: (JSON of 2 processes, JSON of 1)}: every run of _two_process_runs in one torchrun --nproc_per_node 2
    launch (gloo), then the same in this process; and torchrun's output."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    script = two / "run_mains.py"
    script.write_text(RUN_MAINS.format(here=HERE))
    runs = _two_process_runs(image_folders, two)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), json.dumps(list(runs.values()))], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module, flags in _two_process_runs(image_folders, one).values():
            monkeypatch.setattr(sys, "argv", [module + ".py", *flags])
            sys.modules[module].main()
    read = lambda folder, name: json.loads((folder / f"{name}.json").read_text())
    return {name: (read(two, name), read(one, name)) for name in runs}, done.stdout + done.stderr


def test_two_processes_print_no_warning(two_and_one_process):
    """The torchrun launch of every evaluation script prints no warning."""
    assert "Warning" not in two_and_one_process[1], two_and_one_process[1][-3000:]


@pytest.mark.parametrize("name", ["knn", "linear", "linear_augment", "linear_holdout", "transfer"])
def test_two_processes_give_the_one_process_result(name, two_and_one_process):
    """eval_knn (odd split sizes: padded shards), eval_linear cached, --augment and --augment --holdout, and
    eval_transfer under torchrun with 2 processes give the 1-process result on the same flags: each process extracts
    (and, --augment, views) its half of each global batch, and every process trains the heads on the whole of it, in
    the 1-process order. Only the
    convolutions' summation order differs (it follows the per-process batch): the features agree to ~1e-7, the
    accuracies, best lr / epoch / lambda and val curves are equal (transfer's val curve within one of its 3 val
    images, where logits nearly tie), the training losses agree to 1e-5."""
    two, one = two_and_one_process[0][name]
    if name == "transfer":   # 3 val images: at near-tied logits (lambda 1e5: W ~ 0) ~1e-7 flips one prediction
        two, one = two["datasets"]["imagefolder"], one["datasets"]["imagefolder"]
        assert max(two["relative_gradient"], one["relative_gradient"]) <= eval_transfer.TOLERANCE   # both converged
        for (lam_two, val_two), (lam_one, val_one) in zip(two.pop("val_curve"), one.pop("val_curve"), strict=True):
            assert lam_two == lam_one and abs(val_two - val_one) <= 100 / one["num_val"] + 1e-9
    if name.startswith("linear"):
        for two_head, one_head in zip(two["heads"], one["heads"]):
            assert two_head.pop("last_loss") == pytest.approx(one_head.pop("last_loss"), rel=1e-5)
    drop = lambda result: {k: v for k, v in result.items()   # fits: per-fit solver steps and seconds
                           if k not in ("args", "relative_gradient", "fits") and "seconds" not in k}
    assert drop(two) == drop(one)


SLOW_FIT = """
import sys, time, datetime
sys.path.insert(0, {here!r})
import torch, torch.distributed as dist
import eval_transfer
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))   # a --dist-timeout of 3 s
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
fit = eval_transfer.transfer_fit
eval_transfer.transfer_fit = lambda *args, **kwargs: (time.sleep(6), fit(*args, **kwargs))[1]   # a 6 s fit
sys.argv = ["eval_transfer.py", *sys.argv[1:]]
eval_transfer.main()
dist.all_reduce(torch.ones(1))   # the next collective, as the next dataset's feature gathering would be
destroy()
"""


def test_a_fit_longer_than_the_process_group_timeout_ends_well_under_torchrun(image_folders, tmp_path):
    """eval_transfer under torchrun --nproc_per_node 2 whose fit lasts twice the group's timeout: every rank fits,
    so none waits for rank 0 in the next collective; the run ends with 0 and rank 0 prints the results once."""
    script = tmp_path / "slow_fit.py"
    script.write_text(SLOW_FIT.format(here=HERE))
    flags = ["--weights", "random", "--arch", "resnet18", "--image-size", "32", "--workers", "0", "--batch-size", "8",
             "--datasets", "imagefolder", "--data", str(image_folders / "train"), "--test-data",
             str(image_folders / "val")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), *flags], cwd=HERE, capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("imagefolder: test top1") == 1 and done.stdout.count("refit, test") == 1, done.stdout


def test_two_process_finetune_scores_the_network_it_exports(two_and_one_process, tmp_path):
    """eval_finetune under torchrun with 2 processes (DDP; BatchNorm per process on CPUs, as without SyncBatchNorm):
    its top-1 and top-5 are those of the exported finetuned.pth scored in one process, rank 1's half of the val split
    included (rank 0's BN statistics are broadcast before scoring)."""
    two, _ = two_and_one_process[0]["finetune"]
    assert (two["num_train"], two["num_val"], two["args"]["epochs"]) == (40, 16, 2)
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(torch.load(os.path.join(os.path.dirname(two["args"]["out"]), "ft", "finetuned.pth"),
                                   weights_only=True))
    transform = data.eval_transform(32)
    _, val_set, _ = data.build_splits("fake", None, None, transform, transform, 32, 40)
    images, labels = zip(*val_set)
    with torch.no_grad():
        assert accuracy(net.eval()(torch.stack(images)), torch.tensor(labels)) == (two["top1"], two["top5"])


# train.py end to end: frameworks x view modes, DDP, resume, --mix, export, bad input, failures
# ==================================================================================================

TINY = ["--dataset", "fake", "--fake-size", "32", "--arch", "resnet18", "--stem", "cifar", "--image-size", "32",
        "--crop-size", "16", "--batch-size", "8", "--workers", "0", "--log-every", "1"]   # 4 steps per epoch


def read_log(out):
    """(step records, final records) of out/log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if not r.get("final")], [r for r in records if r.get("final")]


def checkpoint_step(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]


def snapshot(out):
    """File name -> bytes of every file in out (to show that a refused command changed nothing)."""
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch (4-step) BYOL + mosaic TINY run: (its --out, its flags without --out). Read-only: a test
    that changes it takes it through `borrowed_run`."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    flags = TINY + ["--epochs", "1"]
    assert train.main(flags + ["--out", out]) == 0
    return out, flags


@pytest.fixture
def borrowed_run(finished_run, tmp_path):
    """A copy of finished_run for a test to change (a run folder resumes wherever it was copied or moved)."""
    out, flags = finished_run
    shutil.copytree(out, str(tmp_path / "run"))
    return str(tmp_path / "run"), flags


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("views", ["two", "multicrop", "mosaic"])
def test_every_framework_and_view_mode_trains(tmp_path, framework, views):
    """train.main runs every framework x view mode: finite losses, target_std, lr, ema logged; a checkpoint."""
    out = str(tmp_path)
    assert train.main(TINY + ["--framework", framework, "--views", views, "--queue-size", "32",
                              "--max-steps", "2", "--out", out]) == 0
    steps, (final,) = read_log(out)
    assert [r["step"] for r in steps] == [1, 2] and final["step"] == 2
    assert all({"loss", "loss_global", "loss_local", "target_std", "lr", "ema"} <= set(r) for r in steps)
    assert "momentum" not in steps[0]
    assert all(math.isfinite(r["loss"]) and 0 < r["target_std"] < 2 for r in steps)
    assert all((r["loss_local"] == 0) == (views == "two") for r in steps)
    state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert state["step"] == 2 and state["args"]["views"] == views and "learner" in state and "model" not in state


def test_console_shows_target_std(tmp_path, capsys):
    """Each console step line shows target-std with the logged value."""
    out = str(tmp_path)
    train.main(TINY + ["--views", "two", "--max-steps", "1", "--out", out])
    line, = [l for l in capsys.readouterr().out.splitlines() if " step 1/1 " in l]
    (record,), _ = read_log(out)
    assert f"target-std {record['target_std']:.3f}" in line


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """Stopping after 3 steps and resuming gives the same losses, lr and ema at steps 4-6 (across an epoch end)."""
    flags = TINY + ["--framework", "byol"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(flags + ["--max-steps", "6", "--out", straight])
    train.main(flags + ["--max-steps", "3", "--out", split])
    train.main(flags + ["--max-steps", "6", "--out", split, "--resume"])
    expected, _ = read_log(straight)
    got, finals = read_log(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6] and len(finals) == 1
    for a, b in zip(expected, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["lr"] == b["lr"] and a["ema"] == b["ema"]


MIX_TINY = ["--dataset", "fake", "--fake-size", "32", "--arch", "resnet18", "--stem", "cifar", "--image-size", "16",
        "--crop-size", "8", "--jitter", "2", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--queue-size", "32"]   # 4 steps per epoch


def _read_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if not r.get("final")]


@pytest.mark.parametrize("framework,mix", [("moco", "cutmix"), ("byol", "flatten")])
def test_resume_with_a_mixture_repeats_the_uninterrupted_run(tmp_path, framework, mix):
    """With --mix (and mosaic views), stopping after 1 step and resuming gives the same losses at steps 2-3."""
    flags = MIX_TINY + ["--framework", framework, "--mix", mix]
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


def test_compile_repeats_the_eager_losses(tmp_path):
    """--compile (torch.compile of the encoders' trunks and heads) gives the eager run's losses at steps 1-3 (BYOL,
    two views: the fewest graphs to compile; the smallest geometry), within 1e-4."""
    flags = MIX_TINY + ["--framework", "byol", "--views", "two", "--max-steps", "3"]
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    try:
        train.main(flags + ["--out", eager])
        train.main(flags + ["--out", compiled, "--compile"])
    finally:
        torch._dynamo.reset()   # the compiled code of this test's learners
    expected, got = _read_steps(eager), _read_steps(compiled)
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["loss"] != 0


def test_exported_backbone_loads_into_torchvision(tmp_path):
    """backbone.pth is a torchvision resnet18 state_dict (only fc.* missing), equal to the online trunk."""
    out = str(tmp_path)
    train.main(["--dataset", "fake", "--fake-size", "8", "--arch", "resnet18", "--image-size", "64",
                "--crop-size", "32", "--batch-size", "4", "--workers", "0", "--max-steps", "1", "--out", out])
    state = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    learner = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["learner"]
    assert torch.equal(state["layer4.1.conv2.weight"], learner["online.trunk.layer4.1.conv2.weight"])


QUEUE_WRAPPER = """
import os, sys
sys.path.insert(0, HERE)
import torch, models, train
last, enqueue, finish = [], models.MoCo.enqueue, train.finish
def enqueue_and_keep(self, keys, *more):   # keys: what this rank enqueues, the global batch's in gathered order
    last[:] = [keys.clone()]
    return enqueue(self, keys, *more)
def dump_then_finish(learner, args, *rest):   # each rank's queue, pointer and last keys, at the end of the run
    torch.save(dict(queue=learner.queue, ptr=learner.queue_ptr, keys=last[0]),
               os.path.join(args.out, "queue%s.pt" % os.environ["RANK"]))
    return finish(learner, args, *rest)
models.MoCo.enqueue, train.finish = enqueue_and_keep, dump_then_finish
sys.exit(train.main(sys.argv[1:]))
"""
DDP_FLAGS = [*TINY, "--framework", "moco", "--queue-size", "32", "--max-steps", "3"]   # 3 steps, 24 of 32 queue rows


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_launcher_run(tmp_path_factory):
    """DDP_FLAGS under one torchrun --nproc_per_node=2 (gloo), each rank's MoCo queue saved at the end by
    QUEUE_WRAPPER: (its --out, the launcher's CompletedProcess)."""
    tmp = tmp_path_factory.mktemp("one_launcher")
    wrapper, out = tmp / "queues.py", str(tmp / "run")
    wrapper.write_text(QUEUE_WRAPPER.replace("HERE", repr(HERE)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(wrapper), *DDP_FLAGS, "--out", out], cwd=HERE, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_process_torchrun_keeps_ranks_identical(one_launcher_run):
    """torchrun --nproc_per_node=2 (gloo) trains and ends with bit-identical weights on both ranks, printing no
    warning."""
    out, result = one_launcher_run
    steps, (final,) = read_log(out)
    assert len(final["rank_checksums"]) == 2 and final["ranks_identical"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert "Warning" not in result.stdout + result.stderr, result.stderr[-3000:]


def test_two_launchers_as_two_nodes_train_the_one_launcher_run(one_launcher_run, tmp_path):
    """Two torchrun launchers, --nnodes 2 --nproc_per_node 1 with a c10d rendezvous on localhost (two nodes on one
    machine, gloo, one shared --out), train the run of one launcher with --nproc_per_node 2 on the same flags: one
    log.jsonl with each step once, one checkpoint (world size 2), the same losses (the log's 5 decimals) and final
    weight checksums (1e-9 relative). Every rank holds the same MoCo queue and pointer, its last rows the last
    step's keys gathered from both ranks in rank order, and it is the one launcher's queue (1e-6)."""
    wrapper, out, port = tmp_path / "queues.py", str(tmp_path / "run"), _free_port()
    wrapper.write_text(QUEUE_WRAPPER.replace("HERE", repr(HERE)))
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend",
            "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "two-nodes", str(wrapper), *DDP_FLAGS,
            "--out", out]
    launchers = [subprocess.Popen(node, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=ENV) for _ in range(2)]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    reference, _ = one_launcher_run
    (steps, (final,)), (expected, (expected_final,)) = read_log(out), read_log(reference)
    assert [r["step"] for r in steps] == [1, 2, 3] and final["ranks_identical"] and len(final["rank_checksums"]) == 2
    for got, want in zip(steps, expected):
        assert {k: got[k] for k in ("loss", "loss_global", "loss_local", "lr")} == \
               {k: want[k] for k in ("loss", "loss_global", "loss_local", "lr")}
    assert final["rank_checksums"] == pytest.approx(expected_final["rank_checksums"], rel=1e-9)
    assert sorted(os.listdir(out)) == [".lock", "args.json", "backbone.pth", "checkpoint.pth", "log.jsonl",
                                       "queue0.pt", "queue1.pt"]
    state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert (state["step"], state["world_size"]) == (3, 2)
    ranks = [torch.load(os.path.join(out, f"queue{r}.pt"), weights_only=True) for r in range(2)]
    one = torch.load(os.path.join(reference, "queue0.pt"), weights_only=True)
    assert all(int(rank["ptr"]) == 24 for rank in ranks)
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"]) and torch.equal(ranks[0]["keys"], ranks[1]["keys"])
    assert torch.equal(ranks[0]["queue"][16:24], ranks[0]["keys"])   # the last step's 8 keys, in gathered order
    torch.testing.assert_close(ranks[0]["queue"], one["queue"], atol=1e-6, rtol=0)


KILL_RANK_WRAPPER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import models, train
calls, forward = [], models.MoCo.forward
def forward_then_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 6 and os.environ["RANK"] == "1":   # the 6th step, after the checkpoint of step 4
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, *args, **kwargs)
models.MoCo.forward = forward_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_killed_rank_ends_torchrun_and_the_survivor_in_one_line(tmp_path):
    """With rank 1 SIGKILLed at step 6 of a 2-process gloo run (moco + mosaic), torchrun exits non-zero within 60 s
    and rank 0's own output ends in one line: a peer exited, rank 0 noticed, the step-4 checkpoint is intact, rerun
    with --resume. No traceback."""
    wrapper, logs = tmp_path / "die.py", tmp_path / "logs"
    wrapper.write_text(KILL_RANK_WRAPPER.format(here=HERE))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             "--log-dir", str(logs), "--redirects", "3", str(wrapper), *TINY, "--framework", "moco",
                             "--queue-size", "32", "--out", str(tmp_path / "run")],
                            cwd=HERE, capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode != 0
    survivor, = [os.path.join(root, "stderr.log") for root, _, files in os.walk(logs)
                 if root.endswith(os.path.join("attempt_0", "0")) and "stderr.log" in files]
    output = open(survivor).read()
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 lost its peers: a peer process exited"), output[-3000:]
    assert "checkpoint.pth) is intact" in last and last.endswith("rerun the same command with --resume")
    assert checkpoint_step(str(tmp_path / "run")) == 4


def _corrupt_folder(tmp):
    folder = tmp / "corrupt" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not an image")
    return ["--dataset", "imagefolder", "--data", str(tmp / "corrupt")]


def _existing_file(tmp):
    (tmp / "afile").write_text("keep me")
    return ["--out", str(tmp / "afile")]


def _inside_a_file(tmp):
    (tmp / "afile").write_text("keep me")
    return ["--out", str(tmp / "afile" / "run")]


BAD_INPUTS = [   # (id, extra flags or a function of tmp_path giving them, fragment of the one-line error)
    ("negative-lr", ["--lr", "-1"], "--lr -1.0 must be positive"),
    ("negative-jitter", ["--jitter", "-5"], "--jitter -5.0 must be at least 0"),
    ("zero-epochs", ["--epochs", "0"], "--epochs 0 must be positive"),
    ("negative-crops", ["--crops", "-4"], "--crops -4 must be positive"),
    ("ema-above-1", ["--ema", "1.5"], "--ema 1.5 must be within [0, 1]"),
    ("zero-batch", ["--views", "two", "--batch-size", "0"], "--batch-size 0 must be positive"),
    ("batch-of-one", ["--views", "two", "--batch-size", "1"], "--batch-size 1 must split evenly"),
    ("negative-batch", ["--views", "two", "--batch-size", "-8"], "--batch-size -8 must be positive"),
    ("out-is-a-file", _existing_file, "cannot make the output folder"),
    ("out-inside-a-file", _inside_a_file, "cannot make the output folder"),
    ("corrupt-images-only", _corrupt_folder, "no images found"),
    ("empty-data-folder", lambda tmp: (tmp / "empty").mkdir() or ["--dataset", "imagefolder", "--data",
                                                                   str(tmp / "empty")], "no images found"),
    ("missing-data-folder", lambda tmp: ["--dataset", "imagefolder", "--data", str(tmp / "nope")], "does not exist"),
    ("batch-below-crops", ["--batch-size", "2"], "per-process batch 2 is smaller than --crops 4"),
    ("crops-not-square", ["--crops", "3"], "--crops 3 is not a perfect square"),
    ("jitter-too-large", ["--jitter", "16"], "must be smaller than --crop-size 16"),
    ("image-vs-crop-size", ["--image-size", "64"], "set --crop-size 32"),
    ("queue-below-batch", ["--framework", "moco", "--queue-size", "4"], "smaller than the global batch"),
    ("fp16-without-gpu", ["--amp", "fp16"], "--amp fp16 needs a GPU"),
    ("no-full-batch", ["--fake-size", "4"], "4 images make no full batch of 8"),
]


@pytest.mark.parametrize("extra,fragment", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_one_line_error_before_any_step(tmp_path, monkeypatch, extra, fragment):
    """Bad flags or data stop train.main with SystemExit('error: ...'), one line naming the fix, before any step."""
    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran")
    monkeypatch.setattr(models.MoCo, "forward", no_step)
    monkeypatch.setattr(models.BYOL, "forward", no_step)
    extra = extra(tmp_path) if callable(extra) else extra
    out = str(tmp_path / "run")
    with warnings.catch_warnings(), pytest.raises(SystemExit) as error:
        warnings.simplefilter("ignore")                      # SafeImageFolder warns about each corrupt file
        train.main(TINY + ["--out", out] + extra)
    assert_one_line_error(error.value, fragment)
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))
    assert not os.path.exists(os.path.join(out, "log.jsonl")) or os.path.getsize(os.path.join(out, "log.jsonl")) == 0
    if (tmp_path / "afile").exists():
        assert (tmp_path / "afile").read_text() == "keep me"


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
        train.main(MIX_TINY + ["--views", "two", "--out", str(tmp_path / "run")] + extra)
    message = str(error.value.code)
    assert message.startswith("error:") and "\n" not in message and fragment in message, message


def test_demo_without_its_data_and_offline_says_how_to_provide_it(tmp_path, monkeypatch):
    """python train.py --demo with no data/cifar10-jpg and no internet ends in one line naming data/cifar10-jpg."""
    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as error:
        train.main(["--demo", "--max-steps", "1"])
    assert_one_line_error(error.value, "could not load cifar10 from data")
    assert "data/cifar10-jpg/{train,test}/<class>/*.jpg" in str(error.value.code)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    """A corrupt JPEG among good images is skipped with a warning naming it, and training runs."""
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        assert train.main(TINY + ["--dataset", "imagefolder", "--data", str(tmp_path / "images"),
                                  "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0


def test_fresh_run_refuses_to_overwrite_a_checkpoint(finished_run):
    """Without --resume, an --out that holds a checkpoint is a one-line error and nothing is overwritten."""
    out, flags = finished_run
    before = snapshot(out)
    with pytest.raises(SystemExit) as error:
        train.main(flags + ["--out", out])
    assert_one_line_error(error.value, "exists; pass --resume")
    assert snapshot(out) == before


@pytest.mark.parametrize("change,flag", [
    (["--framework", "moco", "--queue-size", "32"], "--framework"), (["--arch", "resnet34"], "--arch"),
    (["--batch-size", "4"], "--batch-size"), (["--seed", "1"], "--seed"),
    (["--crop-size", "8", "--image-size", "16"], "--crop-size"), (["--jitter", "3"], "--jitter")])
def test_resume_refuses_changed_flags(finished_run, change, flag):
    """--resume with another framework/arch/batch/seed/crop size/jitter is refused naming it; nothing changes."""
    out, flags = finished_run
    before = snapshot(out)
    with pytest.raises(SystemExit) as error:
        train.main(flags + change + ["--resume", "--out", out])
    assert_one_line_error(error.value, flag)
    assert "--resume" in str(error.value.code)
    assert snapshot(out) == before


def test_resume_with_longer_epochs_is_accepted_with_a_note(borrowed_run, capsys):
    """--resume with a longer --epochs continues the run (steps 5-8) and prints a note naming --epochs."""
    out, flags = borrowed_run
    assert train.main(TINY + ["--epochs", "2", "--resume", "--out", out]) == 0
    note, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert "--epochs 2" in note and "--epochs 1" in note
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 9)) and len(finals) == 1
    assert checkpoint_step(out) == 8


def test_resume_of_a_byol_run_with_a_longer_epochs_keeps_its_derived_ema_and_rewrites_args_json(tmp_path, capsys):
    """BYOL's default --ema comes from --epochs (0.99 up to 300 epochs, 0.996 beyond). --resume on an empty --out
    starts the run (300 epochs: 0.99); the same flags with --epochs 400 continue it with the run's 0.99, not the
    0.996 a fresh 400-epoch run derives, and the note names only the flags given: a default derived from another
    flag is the run's. args.json, written at each start, holds every flag, the torch and torchvision versions,
    the world size, the git commit and the start step."""
    out = str(tmp_path / "run")
    flags = [*TINY, "--framework", "byol", "--views", "two", "--resume", "--out", out]
    assert train.main(flags + ["--epochs", "300", "--max-steps", "1"]) == 0
    first = json.load(open(os.path.join(out, "args.json")))
    assert train.main(flags + ["--epochs", "400", "--max-steps", "2"]) == 0
    note, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == "note: resuming with --epochs 400 --max-steps 2 (was --epochs 300 --max-steps 1)"
    assert train.parse_args(flags + ["--epochs", "400"]).ema == 0.996
    state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert (state["args"]["ema"], state["args"]["epochs"], state["step"], state["world_size"]) == (0.99, 400, 2, 1)
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == [1, 2] and len(finals) == 1
    assert steps[1]["ema"] == pytest.approx(1 - 0.01 * 0.5 * (1 + math.cos(math.pi * 1 / 1600)))   # step 1 of 1600
    second = json.load(open(os.path.join(out, "args.json")))
    assert (first["start_step"], second["start_step"]) == (0, 1)
    assert (first["args"]["epochs"], second["args"]["epochs"], second["args"]["ema"]) == (300, 400, 0.99)
    assert second["args"] == {**state["args"], "max_steps": 2}   # every flag, as the checkpoint has them
    assert (second["torch"], second["torchvision"], second["world_size"]) == \
           (torch.__version__, torchvision.__version__, 1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    assert second["git_commit"] in ((head, head + "-dirty") if head else (None,))   # None outside a git checkout


def test_resume_on_another_world_size_goes_on_with_a_note(one_launcher_run, tmp_path, capsys):
    """The 2-process run's checkpoint (world size 2 saved with it), resumed in one process: the run goes on (step 4)
    after one note naming both world sizes; the global batch is the same, what each process sees is not."""
    out = str(tmp_path / "run")
    shutil.copytree(one_launcher_run[0], out)
    assert train.main(DDP_FLAGS + ["--max-steps", "4", "--resume", "--out", out]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and notes[0].startswith("note: resuming with --out ")   # (a moved folder) --max-steps
    assert notes[1] == "note: resuming on 1 process(es), not 2: new BN groups"
    assert checkpoint_step(out) == 4 and [r["step"] for r in read_log(out)[0]] == [1, 2, 3, 4]


def test_ranks_that_found_different_checkpoints_stop_in_one_line(borrowed_run, monkeypatch):
    """Where --out is not one folder for all ranks (no shared file system: rank 0 resumes at step 4, another finds no
    checkpoint and starts at 0), the ranks compare their steps before any step and stop in one line; the folder is
    as it was. (gather_all stands in for a second rank that found nothing.)"""
    out, flags = borrowed_run
    before = checkpoint_step(out)
    monkeypatch.setattr(runtime, "gather_all", lambda tensor: torch.cat([tensor, torch.zeros_like(tensor)]))
    with pytest.raises(SystemExit) as error:
        train.main(flags + ["--epochs", "2", "--resume", "--out", out])
    assert_one_line_error(error.value, f"the ranks found different checkpoints in --out {out}: put it on a file "
                                       f"system every node shares")
    assert checkpoint_step(out) == before and [r["step"] for r in read_log(out)[0]] == [1, 2, 3, 4]


def test_resume_of_a_finished_run_keeps_one_final_record(borrowed_run):
    """--resume of a finished run trains nothing and leaves steps 1..N and exactly one final record."""
    out, flags = borrowed_run
    assert train.main(flags + ["--resume", "--out", out]) == 0
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(finals) == 1
    assert checkpoint_step(out) == 4


def _nan_loss(monkeypatch):
    """Make BYOL's loss NaN (whatever computes it inside forward)."""
    forward = models.BYOL.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}
    monkeypatch.setattr(models.BYOL, "forward", nan_forward)


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    """A non-finite loss in a fresh run stops with a one-line error saying no checkpoint was written yet."""
    _nan_loss(monkeypatch)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--max-steps", "3", "--out", str(tmp_path)])
    assert_one_line_error(error.value, "non-finite loss nan at step 1;")
    assert "no checkpoint was written yet" in str(error.value.code)
    assert not os.path.exists(tmp_path / "checkpoint.pth")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(borrowed_run, monkeypatch):
    """A non-finite loss after a resume stops with a one-line error saying the last checkpoint is intact, and it is."""
    out, flags = borrowed_run
    _nan_loss(monkeypatch)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--epochs", "2", "--resume", "--out", out])
    assert_one_line_error(error.value, "non-finite loss nan at step 5;")
    assert "is intact" in str(error.value.code)
    assert checkpoint_step(out) == 4


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 1 vs 0")])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(borrowed_run, monkeypatch, failure):
    """A full disk at a save stops with one line giving the free space; the previous checkpoint stays, no .tmp."""
    out, flags = borrowed_run
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("checkpoint.pth", "backbone.pth")}
    _fill_disk(monkeypatch, error=failure)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--epochs", "2", "--max-steps", "5", "--resume", "--out", out])
    monkeypatch.undo()
    assert_one_line_error(error.value, "could not write the checkpoint")
    assert f"({type(failure).__name__}, " in str(error.value.code) and " MB free there)" in str(error.value.code)
    assert {name: open(os.path.join(out, name), "rb").read() for name in before} == before
    assert checkpoint_step(out) == 4
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    """SIGTERM to the whole process group (workers too) lets the run finish its step, save a checkpoint and exit 1."""
    out = str(tmp_path)
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--fake-size", "4096", "--workers", "2",
                                "--out", out], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env=ENV)
    watchdog = threading.Timer(240, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in process.stdout:
            if "step 2/" in line:
                os.killpg(process.pid, signal.SIGTERM)
                break
        output = process.communicate(timeout=120)[0]
    finally:
        watchdog.cancel()
    assert process.returncode == 1 and "checkpoint saved" in output
    assert checkpoint_step(out) >= 2
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_sigusr1_stops_with_a_checkpoint_and_says_requeue_me(tmp_path, monkeypatch, capsys):
    """SIGUSR1 (a scheduler's "time limit near") during step 2 stops like SIGTERM: step 2 finishes, the checkpoint
    is saved, the last line says "requeue me", and train.main returns 75 (EX_TEMPFAIL); the same command then
    continues the run to its end, each step logged once."""
    calls, forward = [], models.MoCo.forward
    def forward_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(models.MoCo, "forward", forward_then_signal)
    flags = [*TINY, "--framework", "moco", "--queue-size", "32", "--views", "two", "--epochs", "1", "--resume",
             "--out", str(tmp_path / "run")]
    assert train.main(flags) == 75
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "requeue me: stopped by signal at step 2; checkpoint saved, continue with --resume"
    assert checkpoint_step(str(tmp_path / "run")) == 2
    assert train.main(flags) == 0
    steps, finals = read_log(str(tmp_path / "run"))
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(finals) == 1


def _session_processes(session):
    """Live (non-zombie) processes whose session id is session."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(pid))
    return alive


HANG_WRAPPER = """
import sys
sys.path.insert(0, {here!r})
import models, train
calls, forward = [], models.BYOL.forward
def failing_forward(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected failure at the second step")
    return forward(self, *args, **kwargs)
models.BYOL.forward = failing_forward
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_crash_with_loader_workers_exits_instead_of_hanging(tmp_path):
    """An exception in a step with 2 loader workers ends the run (non-zero) within 60 s, workers included."""
    wrapper = tmp_path / "crash.py"
    wrapper.write_text(HANG_WRAPPER.format(here=HERE))
    flags = ["--dataset", "fake", "--fake-size", "256", "--arch", "resnet18", "--stem", "cifar", "--image-size", "32",
             "--crop-size", "16", "--batch-size", "8", "--workers", "2", "--out", str(tmp_path / "run")]
    process = subprocess.Popen([sys.executable, str(wrapper), *flags],
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=ENV)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("train.py hung after an exception in a step (killed after 60 s)")
    assert process.returncode != 0 and "injected failure at the second step" in stderr
    deadline = time.time() + 10
    while _session_processes(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    leftover = _session_processes(process.pid)
    if leftover:
        os.killpg(process.pid, signal.SIGKILL)
    assert not leftover, f"processes of the run still alive: {leftover}"


def test_log_after_sigkill_and_resume_has_each_step_once(tmp_path):
    """A run SIGKILLed after an epoch-end checkpoint, then resumed, logs steps 1..N once and one final record; the
    lock file it left (naming it) does not block the resume."""
    out = str(tmp_path / "run")
    flags = ["--dataset", "fake", "--fake-size", "40", "--batch-size", "8", "--epochs", "6", "--arch", "resnet18",
             "--stem", "cifar", "--image-size", "32", "--framework", "moco", "--queue-size", "16", "--views", "two",
             "--workers", "0", "--log-every", "1", "--out", out]      # 5 steps per epoch, 30 in all
    process = subprocess.Popen([sys.executable, "train.py", *flags], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV)
    watchdog = threading.Timer(240, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in process.stdout:
            if " step 7/30 " in line:                             # logged after the checkpoint of step 5
                os.killpg(process.pid, signal.SIGKILL)
                break
        process.communicate(timeout=60)
    finally:
        watchdog.cancel()
    assert process.returncode == -signal.SIGKILL
    logged, _ = read_log(out)
    saved = checkpoint_step(out)
    assert saved % 5 == 0 and max(r["step"] for r in logged) > saved      # steps the resume must not log twice
    assert open(os.path.join(out, ".lock")).read().startswith(f"pid {process.pid} on ")
    assert train.main(flags + ["--resume"]) == 0
    assert open(os.path.join(out, ".lock")).read() == ""                    # emptied when the run released it
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 31)) and len(finals) == 1 and finals[0]["step"] == 30
    assert train.main(flags + ["--resume"]) == 0                    # resuming a finished run
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 31)) and len(finals) == 1


def test_a_second_run_on_a_busy_out_stops_in_one_line_and_changes_nothing(tmp_path):
    """While a run holds --out (paused after step 1), the same train.py command exits non-zero within 30 s in one
    line naming the folder and the holder's pid, and so does its --resume: the folder unchanged. The first then
    finishes and logs each step once."""
    out = str(tmp_path / "run")
    flags = [*TINY, "--max-steps", "3", "--out", out]
    first = subprocess.Popen([sys.executable, "train.py", *flags], cwd=HERE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV)
    busy = (f"error: --out {out} is in use by another run (pid {first.pid} on {os.uname().nodename}); wait for it to "
            f"end, or choose another --out")
    try:
        for line in first.stdout:
            if " step 1/3 " in line:
                os.kill(first.pid, signal.SIGSTOP)   # the holder stays alive, doing nothing, while the others try
                break
        before = snapshot(out)
        second = subprocess.run([sys.executable, "train.py", *flags], cwd=HERE, capture_output=True, text=True,
                                timeout=30, env=ENV)
        assert (second.returncode, second.stdout, second.stderr) == (1, "", busy + "\n")
        with pytest.raises(SystemExit) as error:   # --resume would trim log.jsonl if it got that far
            train.main(flags + ["--resume"])
        assert error.value.code == busy
        assert snapshot(out) == before
        os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == [1, 2, 3] and len(finals) == 1


def test_out_on_a_file_system_without_flock_runs_unlocked_with_a_note(tmp_path, monkeypatch, capsys):
    """Where flock fails (ENOLCK), runtime.folder_lock yields the reason and writes nothing; train.main prints one
    note and goes on (here to its next check, a checkpoint already in --out)."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runtime.fcntl, "flock", no_locks)
    with runtime.folder_lock(str(tmp_path)) as unlocked:
        assert unlocked == "No locks available"
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--out", str(tmp_path)])
    assert_one_line_error(error.value, "checkpoint.pth exists")
    assert capsys.readouterr().out == (f"note: cannot lock --out {tmp_path} (No locks available); running unlocked: "
                                       f"start no other run on this folder\n")
    assert (tmp_path / ".lock").read_text() == ""


# ==================================================================================================
# real CIFAR-10 end to end
# ==================================================================================================

def cifar_subset(root, per_class):
    """Copy `per_class[split]` JPEGs per class of real CIFAR-10 into root/cifar10-jpg/<split>/<class>/, from
    data/cifar10-jpg (where .ci/run extracts it) or straight from the archive in ../shared/data."""
    extracted = os.path.join(HERE, "data", "cifar10-jpg")
    archive = os.path.join(HERE, "..", "shared", "data", "cifar10-jpg.tar.gz")
    if os.path.isdir(extracted):
        for split, count in per_class.items():
            for label in sorted(os.listdir(os.path.join(extracted, split))):
                os.makedirs(os.path.join(root, "cifar10-jpg", split, label))
                for name in sorted(os.listdir(os.path.join(extracted, split, label)))[:count]:
                    shutil.copy(os.path.join(extracted, split, label, name),
                                os.path.join(root, "cifar10-jpg", split, label))
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


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """200 train (20 per class) and 100 test (10 per class) real CIFAR-10 JPEGs."""
    return cifar_subset(str(tmp_path_factory.mktemp("cifar")), {"train": 20, "test": 10})


def test_end_to_end_moco_on_real_cifar10(cifar, tmp_path):
    """MoCo demo on real CIFAR-10: loss falls below chance; eval_knn on backbone.pth repeats the final k-NN."""
    out = str(tmp_path / "run")
    assert train.main(["--demo", "--data", os.path.join(cifar, "train"), "--batch-size", "16", "--epochs", "3",
                       "--workers", "0", "--log-every", "1", "--out", out, "--knn-samples", "200"]) == 0
    steps, (final,) = read_log(out)
    loss = [r["loss"] for r in steps]
    assert len(loss) == 36
    # Step 1 is special (the key encoder is still an exact copy of the query encoder, so its loss is low); the
    # loss then rises as the encoders part, and falls as they learn. Compare with steps 2-7.
    assert sum(loss[-6:]) / 6 < sum(loss[1:7]) / 6
    assert sum(loss[-6:]) / 6 < 2 * math.log(16)   # below chance for 16 in-batch keys, global + local
    assert set(final["knn_top1"]) == {"trained", "random-init"}
    result = subprocess.run([sys.executable, "eval_knn.py", "--weights", os.path.join(out, "backbone.pth"), "--arch",
                             "resnet18", "--stem", "imagenet", "--data", os.path.join(cifar, "train"), "--val-data",
                             os.path.join(cifar, "test"), "--image-size", "64", "--workers", "0", "--k", "20",
                             "--out", str(tmp_path / "knn.json")], cwd=HERE, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert (knn["num_train"], knn["num_test"], knn["num_classes"]) == (200, 100, 10)
    assert knn["knn"]["20"]["top1"] == pytest.approx(final["knn_top1"]["trained"], abs=1.0)   # 1 image of 100


def test_end_to_end_byol_demo_learns_without_collapse(cifar, tmp_path):
    """BYOL demo recipe on real CIFAR-10: the loss falls clearly and target_std stays above 0.2."""
    out = str(tmp_path / "run")
    assert train.main(["--demo", "--framework", "byol", "--data", os.path.join(cifar, "train"), "--batch-size", "16",
                       "--epochs", "1", "--workers", "0", "--log-every", "1", "--out", out,
                       "--knn-samples", "100"]) == 0
    steps, (final,) = read_log(out)
    loss = [r["loss"] for r in steps]
    assert len(loss) == 12 and all(math.isfinite(v) for v in loss)
    # The predictor starts random, so the first steps' loss is high whatever the recipe; it must fall clearly.
    assert sum(loss[-4:]) / 4 < 0.85 * sum(loss[:3]) / 3, loss
    assert all(r["loss_local"] > 0 for r in steps)
    assert all(r["target_std"] > 0.2 for r in steps), [r["target_std"] for r in steps]
    assert set(final["knn_top1"]) == {"trained", "random-init"}


# ==================================================================================================
# the CUDA checks (MOSREP_TEST_DEVICE=cuda; tools/check_gpu.py runs them on a GPU): roi_align, host syncs, nccl
# ==================================================================================================

def test_roi_align_on_the_device_equals_the_cpu(device):
    """roi_align as Encoder.embed_local calls it, forward and backward, on the device with a channels_last input (as
    training gives it) equals the CPU's on contiguous maps: the same maps, mosaic rois and output gradients, at the
    paper's geometry (C5 7x7, stride 32) and the CIFAR one (4x4, stride 8). Tolerance 1e-5: each output is a mean of
    4 bilinear samples, so reordering moves it by ~1e-6; a wrong box convention (half a pixel, a bin) by ~0.1."""
    for channels, side, stride, crop in ((256, 7, 32, 112), (256, 4, 8, 16)):   # the channels change nothing
        torch.manual_seed(0)
        rois = make_mosaic(torch.zeros(16, 4, 1, crop, crop), default_jitter(2 * crop)).rois   # [64, 5]
        maps, grads = torch.randn(16, channels, side, side), torch.randn(64, channels, 7, 7)
        results = []
        for where, layout in ((torch.device("cpu"), torch.contiguous_format), (device, torch.channels_last)):
            x = maps.to(where).contiguous(memory_format=layout).detach().requires_grad_()   # a leaf of its own
            out = roi_align(x, rois.to(where), output_size=7, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
            out.backward(grads.to(where))
            results.append((out.detach().cpu(), x.grad.cpu()))
        for on_cpu, on_device in zip(*results):
            torch.testing.assert_close(on_device, on_cpu, atol=1e-5, rtol=1e-5)


def test_no_host_sync_but_the_documented_one(device, tmp_path, monkeypatch):
    """train.py's loop, 3 steps per framework (MoCo; BYOL with LARS; mosaic views, bf16), with train.train_step and
    the EMA update under torch.cuda.set_sync_debug_mode: the first step in "warn" mode (a warm-up), the later ones in
    "error" mode, where a host sync raises. Excluded: the documented sync, train_step's status all-reduce and its
    .tolist() (every rank stops at the same step), which follow scaler.update(): its wrapper turns the mode off."""
    if device.type != "cuda":
        pytest.skip("host syncs are a CUDA matter (torch.cuda.set_sync_debug_mode)")
    real_step, modes = train.train_step, []

    def step_in_debug_mode(*call, **kwargs):
        given = inspect.signature(real_step).bind(*call, **kwargs).arguments
        if given["step"] == 0:   # wrap once per run: the loop passes the same scaler and model at every step
            scaler, model = given["scaler"], given["model"]
            real_update, real_ema = scaler.update, model.update_target

            def update_then_off(*a, **k):
                real_update(*a, **k)
                torch.cuda.set_sync_debug_mode(0)   # what follows is the documented status readback

            def ema_in_debug_mode(ema):
                torch.cuda.set_sync_debug_mode(modes[-1])
                try:
                    real_ema(ema)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            scaler.update, model.update_target = update_then_off, ema_in_debug_mode
        modes.append("warn" if given["step"] == 0 else "error")
        torch.cuda.set_sync_debug_mode(modes[-1])
        try:
            return real_step(*call, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(train, "train_step", step_in_debug_mode)
    for framework in ("moco", "byol"):
        modes.clear()
        train.main([*TINY, "--fake-size", "768", "--batch-size", "64", "--workers", "2", "--framework", framework,
                    "--views", "mosaic", "--amp", "bf16", "--max-steps", "3", "--out", str(tmp_path / framework)])
        assert modes == ["warn", "error", "error"], (framework, modes)


def _nccl_worker(rank, world, port):
    """One process of test_nccl_...: join the group as train.py does, check all_reduce, gather_all and SyncBatchNorm
    on this rank's share of one batch against BatchNorm on all of it (forward and input gradient)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with runtime.distributed() as device:
        total = torch.full((4,), rank + 1.0, device=device)
        torch.distributed.all_reduce(total)
        assert (total == world * (world + 1) / 2).all(), total
        gathered = runtime.gather_all(torch.full((2, 3), float(rank), device=device))   # [2 * world, 3], rank order
        assert gathered[:, 0].tolist() == [float(r // 2) for r in range(2 * world)], gathered
        torch.manual_seed(0)   # the same batch on every rank; each normalises its share with SyncBatchNorm
        batch = torch.randn(8 * world, 16, 4, 4, device=device, requires_grad=True)
        share = slice(8 * rank, 8 * (rank + 1))
        mine = batch[share].detach().requires_grad_()
        out = nn.SyncBatchNorm(16).to(device)(mine)
        ref = F.batch_norm(batch, None, None, training=True)[share]
        weights = torch.randn_like(out)
        ((out * weights).sum() + (ref * weights).sum()).backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.grad, batch.grad[share], atol=1e-5, rtol=1e-5)


def test_nccl_all_reduce_gather_all_and_syncbn_on_every_gpu(device):
    """One process per GPU in an nccl group (runtime.distributed, as under torchrun): all_reduce, runtime.gather_all in
    rank order, SyncBatchNorm = BatchNorm of the whole batch. CUDA only: SyncBatchNorm needs it."""
    if device.type != "cuda":
        pytest.skip("nccl and SyncBatchNorm need CUDA")
    with socket.socket() as s:   # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_nccl_worker, args=(torch.cuda.device_count(), port), nprocs=torch.cuda.device_count())


def test_a_byol_mosaic_step_runs_278_syncbn_forwards_of_three_host_syncs_each():
    """BYOL under DDP on GPUs trains with SyncBatchNorm (train.build_learner). A BYOL + mosaic step on ResNet-50
    runs it 278 times: the online encoder's 55 BN layers (trunk 53, head 2) on x1, x2 and the mosaic, the
    predictor's one on each, the target's 55 on x1 and x2. torch's SyncBatchNorm forward indexes with a boolean mask
    3 times (count_all, mean_all, invstd_all[mask]: empty ranks out), each a host sync on CUDA: 834 per step, the
    cost docs/performance.md states. Counted on the CPU at world size 1, where SyncBatchNorm runs BatchNorm's code;
    the 3 read from the installed torch's source."""
    learner, calls = nn.SyncBatchNorm.convert_sync_batchnorm(models.BYOL("resnet50", "imagenet")), []
    for module in (module for module in learner.modules() if isinstance(module, nn.SyncBatchNorm)):
        module.register_forward_hook(lambda *hooked: calls.append(1))
    torch.manual_seed(0)
    learner(*torch.randn(2, 4, 3, 32, 32), make_mosaic(torch.randn(4, 4, 3, 16, 16), 0))
    assert len(calls) == 278
    masked = re.findall(r"\w+_all\[mask\]", inspect.getsource(torch.nn.modules._functions.SyncBatchNorm.forward))
    assert masked == ["count_all[mask]", "mean_all[mask]", "invstd_all[mask]"]


def test_the_device_switch_defaults_to_cpu_and_names_the_device_in_the_test_id(device, request):
    """MOSREP_TEST_DEVICE sets the device of the device-switched tests, cpu when it is unset (as CI runs), and their
    ids end in [on_<device type>], which tools/check_gpu.py's `MOSREP_TEST_DEVICE=cuda ... -k on_cuda` selects; the
    three CUDA checks above are among them."""
    assert device == torch.device(os.environ.get("MOSREP_TEST_DEVICE", "cpu"))
    assert request.node.callspec.id == f"on_{device.type}"
    for check in (test_roi_align_on_the_device_equals_the_cpu, test_no_host_sync_but_the_documented_one,
                  test_nccl_all_reduce_gather_all_and_syncbn_on_every_gpu):
        assert "device" in inspect.signature(check).parameters, check.__name__



# ==================================================================================================
# README
# ==================================================================================================

def test_readme_code_links_name_functions_that_exist_in_their_files():
    """Every "[`file.py`](file.py) `name`" link of the README names a function, class or Class.method defined in that
    file, and every file the README links exists: links name code, not line numbers, so edits don't move them."""
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    links = re.findall(r"\[`([\w/]+\.py)`\]\(\1\) `([\w.]+)`", readme)
    assert len(links) >= 15 and not re.search(r"\.py:\d+|#L\d+", readme)
    for path, name in links:
        with open(os.path.join(HERE, path)) as file:
            tree = ast.parse(file.read())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
                names.update(f"{node.name}.{inner.name}" for inner in node.body if isinstance(inner, ast.FunctionDef))
        assert name in names, (path, name)
    for target in re.findall(r"\]\(([\w/.-]+\.(?:py|md|txt|png|sbatch))[)#]", readme):
        assert os.path.exists(os.path.join(HERE, target)), target
