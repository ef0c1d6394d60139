"""Spec of issue 19: --dataset imagenet100 (data.py, imagenet100.txt) and convert_detectron2.py. CPU, small.
Run: python -m pytest -q test_in100.py"""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection"))
import convert_detectron2  # noqa: E402
import data
import eval_knn
import eval_linear
import models
import train

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA = "n99999999"   # a 101st class folder, not in the list


def assert_one_line_error(error, fragment):
    """error is a SystemExit 'error: ...' of one line, naming fragment."""
    message = str(error.code if isinstance(error, SystemExit) else error)
    assert message.startswith("error:") and "\n" not in message and fragment in message, message


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


# ==================================================================================================
# imagenet100.txt and data.py
# ==================================================================================================

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
    """A tree lacking 3 of the 100 classes: one-line SystemExit naming 3, the root and the first missing synset."""
    listed = sorted(_listed_classes())
    missing = [listed[5], listed[50], listed[97]]
    _tree(tmp_path, [c for c in listed if c not in missing], 1)
    with pytest.raises(SystemExit) as error:
        data.build_dataset("imagenet100", str(tmp_path), True, None)
    assert_one_line_error(error.value, f"3 of the 100 ImageNet-100 classes are missing under {tmp_path}, "
                                       f"e.g. {missing[0]}")


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


def test_train_accepts_dataset_imagenet100():
    """train.py parses --dataset imagenet100 (shared add_data_args)."""
    assert train.parse_args(["--dataset", "imagenet100", "--data", "imagenet/train"]).dataset == "imagenet100"


# ==================================================================================================
# convert_detectron2.py
# ==================================================================================================

# torchvision ResNet-50 key -> detectron2 key, written out by hand.
RESNET50_TABLE = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.running_var": "stem.conv1.norm.running_var",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.0.bn1.bias": "res2.0.conv1.norm.bias",
    "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
    "layer1.0.downsample.1.running_mean": "res2.0.shortcut.norm.running_mean",
    "layer1.2.bn3.weight": "res2.2.conv3.norm.weight",
    "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
    "layer2.0.downsample.1.weight": "res3.0.shortcut.norm.weight",
    "layer2.3.conv2.weight": "res3.3.conv2.weight",
    "layer3.0.downsample.0.weight": "res4.0.shortcut.weight",
    "layer3.0.downsample.1.bias": "res4.0.shortcut.norm.bias",
    "layer3.5.bn2.running_mean": "res4.5.conv2.norm.running_mean",
    "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
    "layer4.0.downsample.1.num_batches_tracked": "res5.0.shortcut.norm.num_batches_tracked",
    "layer4.2.conv3.weight": "res5.2.conv3.weight",
    "layer4.2.bn3.bias": "res5.2.conv3.norm.bias",
}


@pytest.fixture(scope="module")
def resnet50_state():
    """torchvision's resnet50 state_dict, fc included, with non-default values so that a mix-up would show."""
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            value.copy_(torch.randn_like(value))
    return state


def test_convert_renames_resnet50_keys_to_detectron2_and_drops_fc(resnet50_state):
    """convert: the hand-written torchvision -> detectron2 table holds, every tensor keeps its values, fc.* is
    dropped and nothing else: one output per torchvision key minus fc.weight and fc.bias."""
    converted = convert_detectron2.convert(resnet50_state)
    model = converted["model"]
    assert converted["__author__"] == "MosRep" and converted["matching_heuristics"] is True
    for old, new in RESNET50_TABLE.items():
        assert np.array_equal(model[new], resnet50_state[old].numpy()), (old, new)
    assert len(model) == len(resnet50_state) - 2 == 318
    assert not [key for key in model if "fc" in key or "layer" in key or "bn" in key or "downsample" in key]
    assert sorted({key.split(".")[0] for key in model}) == ["res2", "res3", "res4", "res5", "stem"]


def _backbone(tmp_path, stem="imagenet", checkpoint=False):
    """A resnet18 Trunk's state_dict saved as backbone.pth, or inside a train.py-style checkpoint.pth."""
    torch.manual_seed(1)
    state = models.Trunk("resnet18", stem).state_dict()
    path = tmp_path / ("checkpoint.pth" if checkpoint else "backbone.pth")
    torch.save({"learner": {}, "backbone": state, "args": {"arch": "resnet18", "stem": stem}} if checkpoint
               else state, path)
    return state, str(path)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_convert_cli_round_trips_every_tensor_through_pickle_and_numpy(tmp_path, checkpoint):
    """The CLI on a backbone.pth or checkpoint.pth writes a pickle that pickle + numpy alone read back: every
    trunk tensor under its detectron2 name, same dtype, shape and values, and matching_heuristics True."""
    state, path = _backbone(tmp_path, checkpoint=checkpoint)
    convert_detectron2.main([path, str(tmp_path / "d2.pkl")])
    with open(tmp_path / "d2.pkl", "rb") as file:
        written = pickle.load(file)
    assert set(written) == {"model", "__author__", "matching_heuristics"} and written["matching_heuristics"] is True
    assert len(written["model"]) == len(state)
    for key, tensor in state.items():
        array = written["model"][convert_detectron2.detectron2_key(key)]
        assert isinstance(array, np.ndarray) and array.dtype == tensor.numpy().dtype
        assert np.array_equal(array, tensor.numpy()), key


@pytest.mark.parametrize("checkpoint", [False, True])
def test_convert_refuses_cifar_stem_weights_in_one_line(tmp_path, checkpoint):
    """A --stem cifar trunk (3x3 conv1), as backbone.pth or checkpoint.pth: one-line error, nothing written."""
    _, path = _backbone(tmp_path, "cifar", checkpoint)
    with pytest.raises(SystemExit) as error:
        convert_detectron2.main([path, str(tmp_path / "d2.pkl")])
    assert_one_line_error(error.value, "--stem cifar")
    assert not (tmp_path / "d2.pkl").exists()


def test_convert_bad_input_and_output_fail_in_one_line(tmp_path):
    """A missing file, a file without a ResNet state_dict, an unwritable output: one-line errors naming the path."""
    out = str(tmp_path / "d2.pkl")
    with pytest.raises(SystemExit) as error:
        convert_detectron2.main([str(tmp_path / "nope.pth"), out])
    assert_one_line_error(error.value, "nope.pth does not exist")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as error:
        convert_detectron2.main([str(tmp_path / "other.pth"), out])
    assert_one_line_error(error.value, "other.pth holds no ResNet state_dict")
    _, path = _backbone(tmp_path)
    with pytest.raises(SystemExit) as error:
        convert_detectron2.main([path, str(tmp_path / "no" / "such" / "d2.pkl")])
    assert_one_line_error(error.value, "cannot write")
