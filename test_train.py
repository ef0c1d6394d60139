"""train.py end to end on tiny inputs: every framework x view mode, DDP, resume, export, bad input."""
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
import torchvision

import models
import train

HERE = os.path.dirname(os.path.abspath(__file__))
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
        assert a["lr"] == b["lr"] and a["momentum"] == b["momentum"]


def test_exported_backbone_loads_into_torchvision(tmp_path):
    """backbone.pth is a plain torchvision state_dict: only fc.* is missing."""
    out = str(tmp_path)
    train.main(["--dataset", "fake", "--fake-size", "8", "--arch", "resnet18", "--image-size", "64",
                "--crop-size", "32", "--batch-size", "4", "--workers", "0", "--max-steps", "1", "--out", out])
    state = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    learner = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]
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
        torchvision.io.write_png(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), str(folder / f"{i}.png"))
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        assert train.main(TINY + ["--dataset", "imagefolder", "--data", str(tmp_path / "images"),
                                  "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0


def test_resume_refuses_another_framework_or_arch(tmp_path):
    out = str(tmp_path)
    train.main(TINY + ["--framework", "byol", "--max-steps", "1", "--out", out])
    with pytest.raises(SystemExit, match="--framework byol run"):
        train.main(TINY + ["--framework", "moco", "--queue-size", "32", "--resume", "--out", out])
    with pytest.raises(SystemExit, match="--arch resnet18 run"):
        train.main(TINY + ["--framework", "byol", "--arch", "resnet34", "--resume", "--out", out])


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
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--fake-size", "4096", "--out", out],
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "step 2/" in line:
            process.send_signal(signal.SIGTERM)
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
                     "--stem", "imagenet", "--dataset", "imagefolder", "--train-dir", os.path.join(root, "train"),
                     "--val-dir", os.path.join(root, "test"), "--image-size", "64", "--workers", "0",
                     "--out", str(tmp_path / "knn.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "knn.json") as f:
        text = f.read()
    numbers = [float(x) for x in re.findall(r'"top[15]": ([0-9.]+)', text)]
    assert numbers and all(0 <= x <= 100 for x in numbers)
