"""Tests of the tools under tools/: bench.py (the op count of a step), check_gpu.py (the plan, its dry run, the
runner, the verdicts), cifar_table.py (its commands and epoch fit), convert_detectron2.py and slurm.sbatch (under
a fake srun and scontrol). The method's
specification is test_mosrep.py; `python -m pytest -q` at the repository root runs both."""
import argparse
import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root, where the tools run
sys.path.insert(0, ROOT)   # its modules, and test_mosrep's shared helpers

import bench  # noqa: E402
import check_gpu  # noqa: E402
import cifar_table  # noqa: E402
import convert_detectron2  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from check_gpu import PY, CheckFailed, Runner, Step  # noqa: E402
from test_mosrep import _one_intra_op_thread, assert_one_line_error  # noqa: E402, F401 (an autouse fixture)
from test_mosrep import ENV, TINY, _free_port, checkpoint_step, read_log  # noqa: E402


# ==================================================================================================
# tools/bench.py
# ==================================================================================================

@pytest.mark.parametrize("framework", ["byol", "moco"])
def test_one_train_step_dispatches_few_optimizer_and_augment_ops(framework):
    """bench.count_ops counts the aten ops of one train.py mosaic step (resnet18, views and crops of 64 px, all
    blurred as at 224 / 112 px): the optimizer (LARS / SGD, foreach) at most 40, the augmentation of all views at
    most 300, the EMA 1, whatever the number of tensors."""
    args = argparse.Namespace(arch="resnet18", stem="imagenet", image_size=64, crop_size=64, crops=4, jitter=0,
                              batch_size=4, amp="off")
    counts = bench.count_ops(framework, "mosaic", args, torch.device("cpu"))
    assert counts["optimizer"] <= 40 and counts["augment"] <= 300 and counts["ema"] == 1, counts


def test_bench_transfer_sets_the_sweep_beside_scikit_learns_or_says_it_is_missing(monkeypatch, capsys):
    """bench.py --transfer 400 8 3: the TRANSFER line has our seconds, lambda, top-1 and worst relative gradient;
    with scikit-learn, its lbfgs sweep over the same protocol picks the same lambda and top-1, none at
    max_iter, and the speed-up; without it (import blocked here), the line says so."""
    bench.bench_transfer(400, 8, 3, torch.device("cpu"))
    line = capsys.readouterr().out.splitlines()[-1]
    ours = re.match(r"TRANSFER features=400x8 classes=3 device=cpu threads=\d+ sweep\+refit=[\d.]+s lambda=(\S+) "
                    r"test_top1=(\S+) relative_gradient=(\S+) \| ", line)
    assert ours and float(ours[3]) <= 1e-5
    if importlib.util.find_spec("sklearn") is not None:
        theirs = re.search(r"\| scikit-learn lbfgs: sweep\+refit=[\d.]+s lambda=(\S+) test_top1=(\S+) "
                           r"relative_gradient=(\S+) fits_at_max_iter=0 \| speed-up=[\d.]+x ", line)
        assert theirs and theirs.groups()[:2] == ours.groups()[:2] and float(theirs[3]) < 1e-4
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    bench.bench_transfer(400, 8, 3, torch.device("cpu"))
    assert capsys.readouterr().out.splitlines()[-1].endswith("| scikit-learn not installed (pip install scikit-learn)")


# ==================================================================================================
# tools/check_gpu.py
# ==================================================================================================

def all_steps(args):
    """Every step of the plan, stage 4 given the whole budget, as the dry run lists them."""
    return check_gpu.plan(args) + [check_gpu.cifar_step(args, f, args.minutes) for f in ("moco", "byol")]


def dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = check_gpu.main(["--dry-run", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    return code, out, err


def plan_args(out):
    """The arguments main() gives the plan on this machine (no GPU: one torchrun process)."""
    return argparse.Namespace(out=str(out), data=os.path.join("data", "cifar10-jpg"), nproc=1, minutes=8.0)


# ---- the dry run, the no-GPU stop

def test_dry_run_lists_every_stage_and_command_and_all_parse(tmp_path, capsys, monkeypatch):
    """--dry-run on a CPU machine exits 0, shows the four stages and every command of the plan, each marked ok."""
    code, out, err = dry_run(tmp_path, capsys, monkeypatch)
    assert code == 0, err
    for number, title in check_gpu.STAGES.items():
        assert f"\n{number}. {title}\n" in out
    steps = all_steps(plan_args(tmp_path))
    assert len(steps) == 16
    for step in steps:
        assert f"$ {check_gpu.shown(step)}\n      ok: " in out, step.name
    assert out.count("      ok: ") == len(steps) and "FAILS" not in out
    assert re.search(r"pytest-on-cuda\n.*\n      ok: collects [1-9]\d* tests", out)
    assert not os.listdir(tmp_path)   # nothing ran, nothing written


def test_dry_run_catches_a_broken_command(tmp_path, capsys, monkeypatch):
    """A flag that train.py does not know, in the plan's small runs, fails the dry run: exit 1, one error line."""
    monkeypatch.setattr(check_gpu, "TINY", check_gpu.TINY + ["--no-such-flag"])
    code, out, err = dry_run(tmp_path, capsys, monkeypatch)
    assert code == 1
    assert err.startswith("error: 11 of 16 commands do not parse (") and err.count("\n") == 1, err
    assert "FAILS: train.py refuses it: error: unrecognized arguments: --no-such-flag" in out
    assert "torchrun-byol-1-process" in err and "resume-to-20-steps" in err and "cifar-moco" not in err


def test_every_command_of_the_plan_is_really_parsed():
    """check_command accepts each command of the plan, and refuses each one given an unknown flag."""
    for step in all_steps(plan_args("runs/check_gpu")):
        env = tuple(step.env.items())
        assert check_gpu.check_command(tuple(step.argv), env)[0], step.name
        ok, message = check_gpu.check_command((*step.argv, "--no-such-flag"), env)
        assert not ok and "--no-such-flag" in message, (step.name, message)


def test_bench_is_parsed_as_on_a_cuda_machine_and_a_bad_value_is_caught():
    """bench.py's --device cuda parses on a CPU-only machine (as on a GPU one); a bad --amp value does not; the
    commands cifar_table.py runs in its turn (train.py's, eval_knn.py's) are parsed too."""
    bench = (PY, *check_gpu.BENCH)
    assert check_gpu.check_command(bench) == (True, "parsed by tools/bench.py")
    ok, message = check_gpu.check_command(bench + ("--amp", "fp8"))
    assert not ok and "invalid choice: 'fp8'" in message
    cifar = tuple(check_gpu.cifar_step(plan_args("runs/check_gpu"), "byol", 8.0).argv)
    assert check_gpu.check_command(cifar) == (True, "parsed by tools/cifar_table.py, train.py, eval_knn.py")


def test_without_cuda_the_check_stops_with_one_line(tmp_path, monkeypatch):
    """Without a CUDA GPU the check stops before any work: one line 'error: no CUDA GPU ...', exit status 1."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        check_gpu.main(["--out", str(tmp_path / "report")])
    message = stopped.value.code
    assert isinstance(message, str)   # a str exit code: Python prints it and exits with status 1
    assert message.startswith("error: no CUDA GPU") and "\n" not in message and "--dry-run" in message
    assert not (tmp_path / "report").exists()


def test_the_plan_is_consistent_for_every_number_of_gpus(tmp_path, monkeypatch):
    """For every process count n in 1..16, each train.py step of the plan passes train.py's own checks at its world
    size (n for the torchrun step, else 1) with 64 images per process and 12 steps per epoch, enough steps for what
    its verdict expects, and that verdict passes a log of those steps from that many ranks; the steps of stages 1-3
    fit the default budget (8 min) less the report's reserve when each takes the time it asks for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # as on the GPU machine: --amp fp16 is allowed
    for n in range(1, 17):
        args = argparse.Namespace(**{**vars(plan_args(tmp_path)), "nproc": n})
        steps = check_gpu.plan(args)
        assert sum(step.need_s for step in steps) + check_gpu.RESERVE_S <= 8 * 60, n
        assert [s.name for s in steps if s.stage == "2c"] == [f"torchrun-byol-{n}-process"]
        for step in (step for step in steps if "train.py" in step.argv):
            world = n if step.stage == "2c" else 1
            flags = train.parse_args(step.argv[step.argv.index("train.py") + 1:])
            train.check_args(flags, world)   # a refusal is a SystemExit
            per_epoch = flags.fake_size // flags.batch_size
            assert (flags.batch_size // world, per_epoch) == (64, 12), (n, step.name)
            assert flags.max_steps <= flags.epochs * per_epoch, (n, step.name)
            if not flags.resume:   # resume-to-20-steps compares two runs' losses (its own test above)
                write_log(flags.out, [1.0] * flags.max_steps, ranks=world)
                assert f"{world} rank(s) identical" in step.verdict(None), (n, step.name)


def test_the_report_says_when_the_multi_process_steps_ran_at_world_size_1(tmp_path):
    """On one GPU (or --nproc 1) the report's head says which multi-process steps ran at world size 1 and that
    DDP, SyncBatchNorm and shuffle-BN across processes went unchecked; with 2 GPUs or more it says nothing."""
    assert check_gpu.world_note(8, 8) == ""
    assert "the torchrun step (2c)**" in check_gpu.world_note(1, 8) and "nccl" not in check_gpu.world_note(1, 8)
    run = runner(tmp_path)
    run.args.world_note = check_gpu.world_note(1, 1)
    run.run(python_step("works", "pass"))
    head = (tmp_path / "report.md").read_text().split("| stage |")[0]
    assert "**At world size 1: the torchrun step (2c) and pytest's nccl test (2a)**, so DDP, SyncBatchNorm and " \
           "shuffle-BN across processes go unchecked here" in head


def test_the_bench_batch_fits_the_gpus_memory_and_the_report_says_why(tmp_path):
    """bench.py runs at 128 images per GPU where its estimated need fits with a tenth to spare (80 GB cards), at 64
    on 24 GB cards, at 32 below; the plan passes that batch, and the step's summary says why when it is not 128."""
    assert [check_gpu.bench_batch(gb) for gb in (None, 79.2, 44.4, 23.6, 15.8, 8.0)] == [128, 128, 128, 64, 32, 32]
    args = argparse.Namespace(**{**vars(plan_args(tmp_path)), "gpu_gb": 23.6})
    bench_step, = (step for step in check_gpu.plan(args) if step.name == "bench")
    assert bench_step.argv[-2:] == ["--batch-size", "64"]
    log = tmp_path / "bench.log"
    log.write_text(BENCH_OUTPUT + "LOADER loader=640.0\n")
    summary, _ = bench_step.verdict(str(log))
    assert summary.endswith(" (batch 64 per GPU: 24 GiB of GPU memory; batch 128 takes ~34 GiB)"), summary


# ---- the runner: budget, failures, timeouts, report

def runner(tmp_path, minutes=1.0):
    return Runner(argparse.Namespace(out=str(tmp_path), minutes=minutes), time.monotonic())


def python_step(name, code, need_s=0, verdict=None):
    return Step("2d", name, need_s, [PY, "-c", code], verdict)


def test_a_failing_step_is_reported_with_its_log_and_the_next_still_runs(tmp_path):
    """A step that exits non-zero is FAILED with its error line and log tail in the report; the next step runs."""
    run = runner(tmp_path)
    run.run(python_step("breaks", "import sys; print('working'); sys.exit('error: boom, fix the flag')"))
    run.run(python_step("works", "print('fine')", verdict=lambda log: "it said " + open(log).read().split()[-1]))
    assert [(r["name"], r["status"]) for r in run.results] == [("breaks", "FAILED"), ("works", "passed")]
    assert run.results[0]["summary"] == "exit code 1: error: boom, fix the flag"
    assert run.results[1]["summary"] == "it said fine"
    log = (tmp_path / "breaks.log").read_text()
    assert log.startswith("$ python -c ") and "working\nerror: boom, fix the flag\n" in log
    report = (tmp_path / "report.md").read_text()
    assert "| 2d | [breaks](breaks.log) | FAILED |" in report and "```\n$ python -c" in report


def test_a_verdict_that_finds_a_fault_fails_the_step(tmp_path):
    """A step that exits 0 but whose outputs fail their check is FAILED with the verdict's message."""
    def verdict(log):
        raise CheckFailed("the run ended at step 3, not 20")
    run = runner(tmp_path)
    result = run.run(python_step("short", "pass", verdict=verdict))
    assert result["status"] == "FAILED" and result["summary"] == "CheckFailed: the run ended at step 3, not 20"


def test_a_step_that_would_overrun_the_budget_is_skipped_and_reported(tmp_path):
    """A step needing more than the time left is not started: 'skipped', with the time it needs and the time left."""
    run = runner(tmp_path, minutes=0.5)   # 30 s, 5 of them kept for the report
    result = run.run(python_step("long", "open('ran', 'w')", need_s=60))
    assert result["status"] == "skipped" and re.fullmatch(r"would overrun the budget: needs ~60 s, 2\d s left",
                                                          result["summary"])
    assert not os.path.exists(os.path.join(ROOT, "ran")) and not (tmp_path / "long.log").exists()
    assert "| 2d | [long](long.log) | skipped |" in (tmp_path / "report.md").read_text()


def test_a_step_gets_its_timeout_from_the_budget_left_and_takes_its_process_group_with_it(tmp_path):
    """A step runs at most the time left (here the budget's ~3 s), then its process group is killed: a child it
    started (a loader worker, torchrun's) goes too."""
    child = "import subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', 'import time; " \
            "time.sleep(60)']).pid, flush=True); time.sleep(60)"
    run = runner(tmp_path, minutes=8 / 60)   # 8 s, 5 of them kept for the report
    began = time.monotonic()
    result = run.run(python_step("hangs", child))
    assert result["status"] == "timed out" and 2 < time.monotonic() - began < 20
    assert re.fullmatch(r"stopped at its limit of [23] s", result["summary"])
    pid = int((tmp_path / "hangs.log").read_text().split()[-1])
    time.sleep(0.5)   # the orphan is reaped by init
    status = open(f"/proc/{pid}/status").read() if os.path.exists(f"/proc/{pid}") else "gone"
    assert "gone" in status or "zombie" in status, (pid, status)


# ---- verdicts and choices

def write_log(out, losses, final_step=None, ranks=1):
    os.makedirs(out, exist_ok=True)
    records = [{"step": s, "loss": v, "target_std": 1.0, "max_memory_gb": 1.0, "images_per_s": 100.0}
               for s, v in enumerate(losses, 1)]
    records.append({"final": True, "step": final_step or len(losses), "rank_checksums": [0.5] * ranks,
                    "ranks_identical": True})
    with open(os.path.join(out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_resume_verdict_passes_repeated_losses_and_fails_a_drift(tmp_path):
    """The resumed losses pass within 10x the nondeterminism of steps 1-10 + 1e-4 of the loss, and fail beyond."""
    losses = [8.0 - 0.01 * s for s in range(20)]
    write_log(tmp_path / "a", losses)
    write_log(tmp_path / "b", [v + 1e-7 for v in losses[:10]] + [v + 5e-4 for v in losses[10:]])
    check = check_gpu.resume_verdict(str(tmp_path / "a"), str(tmp_path / "b"), 10, 20)
    assert check(None).startswith("max |loss difference| steps 11-20 after the resume: 5.00e-04; steps 1-10")
    write_log(tmp_path / "b", [v + 1e-7 for v in losses[:10]] + [v + 2e-3 for v in losses[10:]])
    with pytest.raises(CheckFailed, match="tolerance 8.01e-04"):
        check(None)
    write_log(tmp_path / "b", losses[:15])
    with pytest.raises(CheckFailed, match="steps logged"):
        check(None)


BENCH_OUTPUT = """# device: NVIDIA H200 | torch 2.14.1 | python 3.11
framework  views            step ms    img/s  mem MiB  x two   U  ideal  effic.
-------------------------------------------------------------------------------
byol       supervised          40.0   3200.0    20000          3
byol       two                110.0   1163.6    40000   1.00   8  1.000    0.97
byol       multicrop          150.0    853.3    50000   1.36  11  1.375    0.97
byol       mosaic             160.0    800.0    50000   1.45  11  1.375    0.91
byol       two+flatten        111.0   1153.2    40000   1.01   8  1.000    0.96
  make_mosaic alone: 0.50 ms = 0.3 % of the mosaic step
  of which the device augmentation (2 views + 4 crops from uint8, 2 calls): 40.0 ms = 25.0 % of the mosaic step; make_mosaic 0.50 ms = 0.3 %
moco       supervised          40.0   3200.0    20000          3
moco       two                 55.0   2327.3    30000   1.00   4  1.000    0.97
moco       multicrop           95.0   1347.4    40000   1.73   7  1.750    0.97
moco       mosaic             100.0   1280.0    40000   1.82   7  1.750    0.89
moco       mosaic+cutmix      150.0    853.3    50000   2.73  11  2.750    0.89
  make_mosaic alone: 0.50 ms = 0.5 % of the mosaic step
  device augmentation (2 views + 4 crops from uint8; not in the steps above): 28.0 ms = 21.9 % of a mosaic step with it
# loader at the paper's geometry: 2 views of 224 px + 4 crops of 112 px, BYOL recipe, one thread; synthetic JPEGs
# total time 80 s
RATIO framework=byol multicrop/two=1.36 mosaic/two=1.45 ideal=1.375
RATIO framework=moco multicrop/two=1.73 mosaic/two=1.82 ideal=1.75
"""


def test_bench_answer_from_the_loader_line():
    """Cores per GPU = ceil(img/s of a mosaic step, its device augmentation included / one worker's img/s of the
    LOADER line); the loader feeds the GPU when one more core per GPU, for the training process, is left."""
    text = BENCH_OUTPUT + "LOADER loader=640.0\n"
    summary, markdown = check_gpu.bench_answer(text, cores=16, gpus=1)
    assert summary == "loader feeds the GPU: yes (needs 2 cores per GPU)"   # moco: 1280 / 640
    assert "byol + mosaic takes 800 img/s per GPU (step 160.0 ms, device augmentation included): **2 worker core(s)" \
           in markdown and "moco + mosaic takes 1280 img/s" in markdown
    assert "RATIO framework=moco multicrop/two=1.73 mosaic/two=1.82 ideal=1.75\nLOADER" in markdown
    assert "One loader worker makes 640 img/s. Does the loader feed the GPU? **yes**" in markdown
    summary, markdown = check_gpu.bench_answer(BENCH_OUTPUT + "LOADER loader=900.0\n", 16, 1)
    assert summary == "loader feeds the GPU: yes (needs 2 cores per GPU)"   # byol 800 / 900 -> 1, moco 1280 / 900 -> 2
    summary, markdown = check_gpu.bench_answer(text, cores=16, gpus=8)   # 1 core per GPU left after the training's
    assert summary.startswith("loader feeds the GPU: no") and "16 cores for 8 GPU(s)" in markdown
    with pytest.raises(CheckFailed, match="no LOADER line"):
        check_gpu.bench_answer(BENCH_OUTPUT, cores=16, gpus=1)


# ==================================================================================================
# tools/cifar_table.py
# ==================================================================================================

def test_cifar_table_choose_epochs_fits_the_runs_and_their_evaluations():
    """E = floor((0.9 x left - runs (start-up + evaluation)) / (runs x epoch)); 0 when one epoch each does not fit."""
    assert cifar_table.choose_epochs(1000, epoch_s=50, run_s=20, eval_s=10) == 5   # (900 - 90) / 150 = 5.4
    assert cifar_table.choose_epochs(1000, epoch_s=50, run_s=20, eval_s=10, runs=1) == 17   # (900 - 30) / 50
    assert cifar_table.choose_epochs(200, epoch_s=50, run_s=20, eval_s=10) == 0


def test_cifar_table_commands_select_runs_and_keep_byols_warmup_share():
    """--runs picks the runs; BYOL warms up for 10 of 200 epochs, the same share at --epochs 20; --probe-epochs 0
    leaves the linear probe out."""
    args = cifar_table.parse_args(["--data", "d", "--epochs", "20", "--runs", "byol-mosaic-jitter0", "--probe-epochs",
                                   "0", "--out", "o"])
    out, (train_cmd, knn_cmd, *rest) = cifar_table.commands(args, *args.runs, 3)
    assert out == os.path.join("o", "byol-mosaic-jitter0-seed3") and rest == []
    assert train_cmd[train_cmd.index("--warmup-epochs") + 1] == "1" and train_cmd[-2:] == ["--jitter", "0"]
    assert knn_cmd[1] == "eval_knn.py" and knn_cmd[knn_cmd.index("--weights") + 1] == os.path.join(out, "backbone.pth")
    assert len(cifar_table.commands(cifar_table.parse_args(["--data", "d"]), "moco-two", 0)[1]) == 3


# ==================================================================================================
# tools/convert_detectron2.py
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


# ==================================================================================================
# tools/slurm.sbatch
# ==================================================================================================

FAKE_SRUN = r"""#!/bin/bash
# A stand-in for SLURM's srun in a batch job: runs the command (its first argument that is not an option) once per
# node of the job with that node's SLURM_NODEID, records each node's command line in $FAKE_SLURM_LOG, passes USR1
# and TERM on to them (srun forwards signals to its tasks) and exits with the first non-zero status.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    echo "node $node: $*" >> "$FAKE_SLURM_LOG"
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
    [ "$status" = 0 ] && status=$code
done
exit "$status"
"""
FAKE_SCONTROL = r"""#!/bin/bash
# A stand-in for SLURM's scontrol: `show hostnames LIST` prints LIST's comma-separated names one a line; `requeue ID`
# is recorded in $FAKE_SLURM_LOG.
case "$1" in
    show) tr , '\n' <<< "$3" ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
esac
"""


def test_slurm_script_runs_a_torchrun_per_node_and_requeues_itself_after_sigusr1(tmp_path):
    """tools/slurm.sbatch under a fake srun and scontrol (2 nodes of 1 CPU "GPU" each, on this machine): srun
    starts on each node torchrun with 2 nodes, the rendezvous on the first host scontrol names, the job id, SIGUSR1
    passed on to the ranks, train.py --resume and the flags. SIGUSR1 to the batch shell (sbatch --signal=B:USR1)
    stops both ranks at the same step with the checkpoint saved and "requeue me" (their loader workers survive
    torchrun's signal to their process groups), and the script runs `scontrol requeue <job id>`. The requeued job,
    the same command, continues the run to its end: each step logged once, one final record, no second requeue."""
    bin_dir, log, port = tmp_path / "bin", tmp_path / "slurm.log", _free_port()
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1,localhost",
           "SLURM_GPUS_ON_NODE": "1", "MASTER_PORT": str(port), "FAKE_SLURM_LOG": str(log)}
    out = str(tmp_path / "run")
    flags = [*TINY, "--fake-size", "64", "--workers", "1", "--framework", "moco", "--queue-size", "32", "--views",
             "two", "--epochs", "1", "--out", out]   # 8 steps
    job = subprocess.Popen(["bash", "tools/slurm.sbatch", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    watchdog = threading.Timer(240, os.killpg, (job.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in job.stdout:
            if " step 1/8 " in line:
                job.send_signal(signal.SIGUSR1)   # what SLURM sends the batch shell 120 s before the time limit
                break
        output = job.communicate(timeout=120)[0]
    finally:
        watchdog.cancel()
    command = (f"torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{port} "
               f"--rdzv_id 4242 --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 train.py --resume "
               + " ".join(flags))
    assert log.read_text().splitlines() == [f"node 0: {command}", f"node 1: {command}", "requeue 4242"], output[-3000:]
    stopped = [line for line in output.splitlines() if "stopped by signal" in line]
    assert len(stopped) == 1 and stopped[0].startswith("requeue me: stopped by signal at step "), output[-3000:]
    saved = checkpoint_step(out)
    assert job.returncode != 0 and stopped[0].split(" at step ")[1].startswith(f"{saved};") and 1 <= saved < 8
    assert "lost its peers" not in output and "Traceback" not in output.split("requeue me")[0]
    requeued = subprocess.run(["bash", "tools/slurm.sbatch", *flags], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=env)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    steps, finals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 9)) and len(finals) == 1 and finals[0]["ranks_identical"]
    assert log.read_text().count("requeue") == 1
