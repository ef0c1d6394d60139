"""Convert a MosRep backbone into detectron2's checkpoint format:

    python tools/convert_detectron2.py runs/byol/backbone.pth runs/byol/backbone_d2.pkl

The input is a backbone.pth (torchvision ResNet keys) or a train.py checkpoint.pth. The output is a pickle of
{"model": {detectron2 key: numpy array}, "__author__": "MosRep", "matching_heuristics": True}, the layout
detectron2's checkpointer reads for MODEL.WEIGHTS. The configuration the weights need is in docs/detection.md.
Weights trained with --stem cifar are refused: detectron2's stem is the 7x7 stride-2 conv and max-pool.
"""
import argparse
import os
import pickle
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root: its modules
from models import read_checkpoint  # noqa: E402

# torchvision name -> detectron2 name, applied in order to each key (fc.* is dropped before).
RENAMES = [(r"^conv1\.", "stem.conv1."), (r"^bn1\.", "stem.conv1.norm."),
           (r"^layer(\d)\.", lambda match: f"res{int(match[1]) + 1}."), (r"\.bn(\d)\.", r".conv\1.norm."),
           (r"\.downsample\.0\.", ".shortcut."), (r"\.downsample\.1\.", ".shortcut.norm.")]


def detectron2_key(key: str) -> str:
    """A torchvision ResNet state_dict key -> detectron2's ResNet key (stem, res2-res5, convK.norm, shortcut)."""
    for pattern, new in RENAMES:
        key = re.sub(pattern, new, key)
    return key


def read_backbone(path: str) -> dict:
    """The torchvision-keyed trunk state_dict {key: tensor} in a backbone.pth or checkpoint.pth; SystemExit with
    a one-line fix when the file is unreadable, holds no ResNet or holds a cifar-stem one."""
    try:
        state = read_checkpoint(path)
    except ValueError as error:
        raise SystemExit(f"error: {error}; pass a backbone.pth or checkpoint.pth written by train.py") from None
    if isinstance(state, dict) and "backbone" in state and "args" in state:   # a train.py checkpoint
        state = state["backbone"]
    if not isinstance(state, dict) or not {"conv1.weight", "layer4.0.conv1.weight"} <= state.keys():
        raise SystemExit(f"error: {path} holds no ResNet state_dict (no conv1.weight, layer4.0.*); pass a backbone.pth "
                         f"or checkpoint.pth written by train.py")
    if state["conv1.weight"].shape[-1] != 7:   # the cifar stem's conv1 is 3x3 (a backbone.pth has no args)
        raise SystemExit(f"error: {path} was trained with --stem cifar (3x3 conv1, no max-pool), which detectron2's "
                         f"7x7 stem cannot load; pre-train with --stem imagenet to transfer to detection")
    return state


def convert(state: dict) -> dict:
    """torchvision-keyed ResNet state_dict {key: tensor} -> detectron2's checkpoint dict, fc.* dropped."""
    model = {detectron2_key(k): v.detach().cpu().numpy() for k, v in state.items() if not k.startswith("fc.")}
    return {"model": model, "__author__": "MosRep", "matching_heuristics": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a backbone.pth or a train.py checkpoint.pth")
    parser.add_argument("output", help="the detectron2 .pkl to write")
    args = parser.parse_args(argv)
    converted = convert(read_backbone(args.input))
    try:
        with open(args.output, "wb") as file:
            pickle.dump(converted, file)
    except OSError as error:
        raise SystemExit(f"error: cannot write {args.output} ({error.strerror or error}); choose another output path")
    print(f"wrote {len(converted['model'])} tensors to {args.output}")


if __name__ == "__main__":
    main()
