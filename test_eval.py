"""Tests of eval_knn.py and eval_linear.py: CPU, tiny tensors and images, the whole file in seconds."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from eval_knn import accuracy, build_trunk, evaluate_knn, extract_features, knn_predict
from eval_linear import balanced_subset, cached_batches, frozen_features, train_probe
from models import Trunk

HERE = os.path.dirname(os.path.abspath(__file__))


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
    done = run("eval_knn.py", "--dataset", "imagefolder", "--train-dir", image_folders / "train",
               "--val-dir", image_folders / "val", "--k", 1, 5, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (18, 9, 3)
    assert set(result["knn"]) == {"1", "5"}
    assert all(0 <= r[key] <= 100 for r in result["knn"].values() for key in ("top1", "top5"))


def test_linear_cli_cached(image_folders, tmp_path):
    out = tmp_path / "linear.json"
    done = run("eval_linear.py", "--dataset", "imagefolder", "--train-dir", image_folders / "train",
               "--val-dir", image_folders / "val", "--epochs", 2, "--lr", 0.1, 1, "--label-fraction", 0.5, "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["num_train"], result["num_val"], len(result["heads"])) == (9, 9, 2)
    for head in result["heads"]:
        assert 1 <= head["best_epoch"] <= 2
        assert all(0 <= head[key] <= 100 for key in ("best_top1", "best_top5", "last_top1", "last_top5"))


def test_missing_val_dir_is_a_one_line_error(image_folders):
    missing = image_folders / "no-such-split"
    done = run("eval_knn.py", "--dataset", "imagefolder", "--train-dir", image_folders / "train", "--val-dir", missing)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(missing) in done.stderr
