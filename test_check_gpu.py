"""Specs of check_gpu.py that a CPU machine can check: the dry run, the no-GPU stop, the budget and failure handling
of the step runner, the verdicts that read the runs' outputs, and test_mosrep.py's device switch."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import check_gpu
from check_gpu import PY, CheckFailed, Runner, Step

HERE = os.path.dirname(os.path.abspath(__file__))


def all_steps(args):
    """Every step of the plan, stage 4 with E = 1, as the dry run lists them."""
    return [s for group in check_gpu.static_plan(args) for s in group] + [check_gpu.calibration_step(args)] + [
        s for f in ("moco", "byol") for v in check_gpu.VIEWS for s in check_gpu.cifar_steps(args, f, v, 1)]


def dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(HERE)
    code = check_gpu.main(["--dry-run", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    return code, out, err


def plan_args(out):
    """The arguments main() gives the plan on this machine (no GPU: one torchrun process)."""
    return argparse.Namespace(out=str(out), data=os.path.join("data", "cifar10-jpg"), archive=None, nproc=1,
                              workers=check_gpu.build_parser().parse_args([]).workers, minutes=8.0)


def test_dry_run_lists_every_stage_and_command_and_all_parse(tmp_path, capsys, monkeypatch):
    """--dry-run on a CPU machine exits 0, shows the four stages and every command of the plan, each marked ok."""
    code, out, err = dry_run(tmp_path, capsys, monkeypatch)
    assert code == 0, err
    for number, title in check_gpu.STAGES.items():
        assert f"\n{number}. {title}\n" in out
    steps = all_steps(plan_args(tmp_path))
    assert len(steps) == 30
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
    assert err.startswith("error: 12 of 30 commands do not parse (") and err.count("\n") == 1, err
    assert "FAILS: train.py refuses it: error: unrecognized arguments: --no-such-flag" in out
    assert "torchrun-byol-1-process" in err and "sync" in err and "cifar-moco-two" not in err


def test_every_command_of_the_plan_is_really_parsed():
    """check_command accepts each command of the plan, and refuses each one given an unknown flag."""
    for step in all_steps(plan_args("runs/check_gpu")):
        assert check_gpu.check_command(step.argv, step.env)[0], step.name
        ok, message = check_gpu.check_command(step.argv + ["--no-such-flag"], step.env)
        assert not ok and "--no-such-flag" in message, (step.name, message)


def test_bench_is_parsed_as_on_a_cuda_machine_and_a_bad_value_is_caught():
    """bench.py's --device cuda parses on a CPU-only machine (as on a GPU one); a bad --amp value does not."""
    bench = [PY, *check_gpu.BENCH]
    assert check_gpu.check_command(bench) == (True, "bench.parse_args accepts it")
    ok, message = check_gpu.check_command(bench + ["--amp", "fp8"])
    assert not ok and "invalid choice: 'fp8'" in message


def test_without_cuda_the_check_stops_with_one_line(tmp_path, monkeypatch):
    """Without a CUDA GPU the check stops before any work: one line 'error: no CUDA GPU ...', exit status 1."""
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        check_gpu.main(["--out", str(tmp_path / "report")])
    message = stopped.value.code
    assert isinstance(message, str)   # a str exit code: Python prints it and exits with status 1
    assert message.startswith("error: no CUDA GPU") and "\n" not in message and "--dry-run" in message
    assert not (tmp_path / "report").exists()


def test_test_device_switch_defaults_to_cpu_and_selects_the_same_tests():
    """Without MOSREP_TEST_DEVICE the device-switched tests of test_mosrep.py get [on_cpu] ids and none is on cuda;
    they are the tests that the check selects with MOSREP_TEST_DEVICE=cuda and -k on_cuda."""
    env = {k: v for k, v in os.environ.items() if k != "MOSREP_TEST_DEVICE"}
    listed = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "test_mosrep.py",
                             "-k", "on_cpu or on_cuda"], cwd=HERE, capture_output=True, text=True,
                            env={**env, "OMP_NUM_THREADS": "1"}).stdout
    ids = [line for line in listed.splitlines() if line.startswith("test_mosrep.py::")]
    assert ids and all(re.search(r"\[(.+-)?on_cpu(-.+)?\]$", line) for line in ids), listed[-500:]
    ok, message = check_gpu.check_command([PY, *check_gpu.PYTEST], {"MOSREP_TEST_DEVICE": "cuda"})
    assert ok and message.startswith(f"collects {len(ids)} tests")


# ---- the runner: budget, failures, timeouts, report

def runner(tmp_path, minutes=1.0):
    return Runner(argparse.Namespace(out=str(tmp_path), minutes=minutes), time.monotonic())


def python_step(name, code, need_s=0, cap_s=60, verdict=None):
    return Step("2d", name, [PY, "-c", code], need_s, cap_s, verdict)


def test_a_failing_step_is_reported_with_its_log_and_the_next_still_runs(tmp_path):
    """A step that exits non-zero is FAILED with its error line and log tail in the report; the next step runs."""
    run = runner(tmp_path)
    run.run([python_step("breaks", "import sys; print('working'); sys.exit('error: boom, fix the flag')")])
    run.run([python_step("works", "print('fine')", verdict=lambda log: "it said " + open(log).read().split()[-1])])
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
    [result] = run.run([python_step("short", "pass", verdict=verdict)])
    assert result["status"] == "FAILED" and result["summary"] == "CheckFailed: the run ended at step 3, not 20"


def test_a_step_that_would_overrun_the_budget_is_skipped_and_reported(tmp_path):
    """A step needing more than the time left is not started: 'skipped', with the time it needs and the time left."""
    run = runner(tmp_path, minutes=0.5)   # 30 s, 5 of them kept for the report
    [result] = run.run([python_step("long", "open('ran', 'w')", need_s=60)])
    assert result["status"] == "skipped" and re.fullmatch(r"would overrun the budget: needs ~60 s, 2\d s left",
                                                          result["summary"])
    assert not os.path.exists(os.path.join(HERE, "ran")) and not (tmp_path / "long.log").exists()
    assert "| 2d | [long](long.log) | skipped |" in (tmp_path / "report.md").read_text()


def test_a_step_gets_its_timeout_from_the_budget_left(tmp_path):
    """A step runs at most min(its cap, the time left): here the budget's ~3 s, then it is stopped."""
    run = runner(tmp_path, minutes=8 / 60)   # 8 s, 5 of them kept for the report
    began = time.monotonic()
    [result] = run.run([python_step("hangs", "import time; time.sleep(60)", cap_s=600)])
    assert result["status"] == "timed out" and 2 < time.monotonic() - began < 20
    assert re.fullmatch(r"stopped at its limit of [23] s", result["summary"])


def test_steps_of_one_group_run_at_the_same_time(tmp_path):
    """Steps handed to run() together run concurrently: three 2-second steps take well under 6 seconds."""
    run = runner(tmp_path)
    began = time.monotonic()
    results = run.run([python_step(f"s{i}", "import time; time.sleep(2)") for i in range(3)])
    assert [r["status"] for r in results] == ["passed"] * 3 and time.monotonic() - began < 5


# ---- verdicts and choices

def write_log(out, losses, final_step=None):
    os.makedirs(out, exist_ok=True)
    records = [{"step": s, "loss": v} for s, v in enumerate(losses, 1)]
    records.append({"final": True, "step": final_step or len(losses)})
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
  device augmentation (2 views + 4 crops from uint8; not in the steps above): 40.0 ms = 20.0 % of a mosaic step with it
  data (synthetic PIL, no decode): 150 img/s per worker with 2+4 views (300 with 2 views); x 16 workers = 2400 img/s
moco       supervised          40.0   3200.0    20000          3
moco       two                 55.0   2327.3    30000   1.00   4  1.000    0.97
moco       multicrop           95.0   1347.4    40000   1.73   7  1.750    0.97
moco       mosaic             100.0   1280.0    40000   1.82   7  1.750    0.89
moco       mosaic+cutmix      150.0    853.3    50000   2.73  11  2.750    0.89
  make_mosaic alone: 0.50 ms = 0.5 % of the mosaic step
  device augmentation (2 views + 4 crops from uint8; not in the steps above): 28.0 ms = 21.9 % of a mosaic step with it
  data (synthetic PIL, no decode): 160 img/s per worker with 2+4 views (320 with 2 views); x 16 workers = 2560 img/s
# loader at the paper's geometry: 2 views of 224 px + 4 crops of 112 px, BYOL recipe, one thread; synthetic JPEGs
# total time 80 s
RATIO framework=byol multicrop/two=1.36 mosaic/two=1.45 ideal=1.375
RATIO framework=moco multicrop/two=1.73 mosaic/two=1.82 ideal=1.75
"""


def test_bench_answer_from_the_data_lines_and_from_a_loader_line():
    """Cores per GPU = ceil(img/s of a mosaic step + its device augmentation / one worker's img/s): the data line
    per framework, or the LOADER line when bench prints one; one more core stays with the training process."""
    summary, text = check_gpu.bench_answer(BENCH_OUTPUT, cores=16, gpus=1)
    assert summary == "loader feeds the GPU: yes (needs 7 cores per GPU)"   # 1280 x 100 / 128 = 1000 img/s / 160
    assert "byol + mosaic takes 640 img/s per GPU (step 160.0 ms + device augmentation 40.0 ms); one loader " \
           "worker makes 150 img/s" in text
    assert "**5 worker core(s) per GPU**" in text and "**7 worker core(s) per GPU**" in text
    assert "RATIO framework=moco multicrop/two=1.73 mosaic/two=1.82 ideal=1.75\n```" in text
    summary, text = check_gpu.bench_answer(BENCH_OUTPUT, cores=32, gpus=8)   # 4 cores per GPU, one for training
    assert summary.startswith("loader feeds the GPU: no") and "has 32 cores for 8 GPU(s)" in text
    with_loader = BENCH_OUTPUT + "LOADER full_recipe=120.0 loader=640.0 speedup=5.33\n"
    summary, text = check_gpu.bench_answer(with_loader, cores=16, gpus=1)
    assert summary == "loader feeds the GPU: yes (needs 2 cores per GPU)"   # 1000 / 640
    assert "the full CPU recipe: 120.0 img/s" in text


def test_choose_epochs_fits_three_runs_and_their_knn():
    """E = floor((0.9 x left - 3 (start-up + k-NN)) / (3 x epoch)); 0 when one epoch each does not fit."""
    assert check_gpu.choose_epochs(1000, epoch_s=50, run_s=20, knn_s=10) == 5   # (900 - 90) / 150 = 5.4
    assert check_gpu.choose_epochs(1000, epoch_s=50, run_s=20, knn_s=10, runs=1) == 17   # (900 - 30) / 50
    assert check_gpu.choose_epochs(200, epoch_s=50, run_s=20, knn_s=10) == 0
