"""Check a GPU machine end to end in one command, within a time budget, and write one markdown report.

    python tools/check_gpu.py --minutes 8    # the default; report in runs/check_gpu/report.md
    python tools/check_gpu.py --dry-run      # the plan, every command checked to parse; runs nothing, needs no GPU

The plan (`plan()`) is a table of plain commands in four stages: the environment; correctness on CUDA; bench.py at
the paper's geometry; with the minutes left, cifar_table.py's view modes on CIFAR-10. They run one after another, from
the repository root: a step that would overrun the time left is skipped, a step gets the time left as its timeout, a
failed one is reported with the end of its log (kept beside the report as <step>.log) and the next one runs.
"""
import argparse
import collections
import contextlib
import functools
import io
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where every step runs
sys.path.insert(0, ROOT)   # the repository root: the dry run runs its scripts (train.py, ...) in this process
import cifar_table  # noqa: E402
from cifar_table import FRAMEWORK, RECIPE  # noqa: E402  (the README's CIFAR recipe, per framework)

PY = sys.executable
VIEWS = ("two", "multicrop", "mosaic")
STAGES = {"1": "Environment", "2": "Correctness on CUDA", "3": "Speed at the paper's geometry",
          "4": "CIFAR-10: a first comparison of the view modes"}
# Stage 2's small runs: the CIFAR geometry on synthetic images, 64 per process and 768 per process in all (tiny()):
# 12 steps per epoch whatever the number of processes, so that 20 steps cross an epoch end (a checkpoint save) and
# the 10-step half of the resume check stops mid-epoch.
TINY = ["--dataset", "fake", *RECIPE, "--epochs", "10", "--log-every", "1", "--workers", "2", "--seed", "0"]
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mosrep.py", "-k", "on_cuda"]
BENCH = ["tools/bench.py", "--device", "cuda", "--supervised", "--arch", "resnet50", "--image-size", "224",
         "--crop-size", "112"]   # the batch per GPU: bench_batch(); the amp: train.py's default for this GPU
# GPU memory (GiB) a bench.py step at the paper's geometry takes, per batch per GPU: BYOL + mosaic, the largest. Not
# yet measured on a GPU: the CPU's fp32 figure (0.5 GiB + 0.255 GiB per image, docs/performance.md), which bf16
# activations should undercut.
BENCH_MEMORY_GB = {128: 34, 64: 17, 32: 9}
CIFAR_NEED_S = 240     # stage 4: cifar_table's calibration, then three runs of an epoch and their k-NN, at least
RESERVE_S = 5          # seconds kept back from the budget for writing the report


class CheckFailed(Exception):
    """A step ran but its output shows the check failed; the message says how."""


# A command of the plan, skipped when less than need_s seconds are left; verdict: log path -> summary or (summary, md).
Step = collections.namedtuple("Step", "stage name need_s argv verdict env", defaults=(None, {}))


def shown(step) -> str:
    """The command as a user would type it."""
    return "".join(f"{k}={v} " for k, v in step.env.items()) + "python " + shlex.join(step.argv[1:])


# ---- the plan

def tiny(framework, views, amp=None, world=1):
    """train.py flags of stage 2's small runs on `world` processes: 64 images per process and step, 12 steps per
    epoch; amp None: train.py's default for the GPU (bf16 where it is native, else fp16)."""
    return [*TINY, *FRAMEWORK[framework], "--framework", framework, "--views", views, "--batch-size", str(64 * world),
            "--fake-size", str(768 * world), *(["--amp", amp] if amp else [])]


def bench_batch(gpu_gb) -> int:
    """The largest batch per GPU of BENCH_MEMORY_GB that fits in gpu_gb GiB with a tenth to spare (128 when unknown:
    the dry run), so that the bench runs on 24 GB cards too (at 64); 32 at least."""
    return max([batch for batch, need in BENCH_MEMORY_GB.items() if gpu_gb is None or need <= 0.9 * gpu_gb] or [32])


def world_note(nproc: int, gpus: int) -> str:
    """The report's warning when the multi-process steps run at world size 1 (one GPU: NCCL takes one per process),
    else ''."""
    steps = [name for name, world in (("the torchrun step (2c)", nproc), ("pytest's nccl test (2a)", gpus))
             if world < 2]
    if not steps:
        return ""
    return (f"**At world size 1: {' and '.join(steps)}**, so DDP, SyncBatchNorm and shuffle-BN across processes go "
            f"unchecked here (NCCL takes one GPU per process): check a machine with 2 GPUs or more for them.")


def plan(args):
    """Stages 1 to 3, in the order they run (stage 4's steps depend on the time left: cifar_step)."""
    n, outputs = args.nproc, os.path.join(args.out, "outputs")
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]

    def train(name, flags, steps, *more, launch=(PY,), world=1):
        """argv and verdict of a train.py step that must log steps 1..steps into outputs/<name>."""
        out = os.path.join(outputs, name)
        argv = [*launch, "train.py", *flags, "--max-steps", str(steps), "--out", out, *more]
        return argv, train_verdict(out, steps, world)
    fp32 = tiny("moco", "mosaic", "off")   # where the GPU's nondeterminism is small enough to see a resume fault
    gpu_gb = getattr(args, "gpu_gb", None)   # the GPU's memory (GiB), None in the dry run
    batch = bench_batch(gpu_gb)
    why = "" if batch == 128 else (f" (batch {batch} per GPU: {gpu_gb:.0f} GiB of GPU memory; batch 128 takes "
                                   f"~{BENCH_MEMORY_GB[128]} GiB)")
    return [Step(*row) for row in [
        ("1", "env", 10, [PY, "-m", "torch.utils.collect_env"], env_verdict),
        # test_mosrep.py's device-independent tests, among them roi_align on CUDA against the CPU, no host sync in a
        # training step but the documented one, nccl's all_reduce, gather_all and SyncBatchNorm on every GPU
        ("2a", "pytest-on-cuda", 60, [PY, *PYTEST], last_line, {"MOSREP_TEST_DEVICE": "cuda"}),
        *[("2b", f"train-{f}-{v}", 20, *train(f"{f}-{v}", tiny(f, v), 20)) for f in ("moco", "byol") for v in VIEWS],
        ("2b", "train-byol-mosaic-fp16", 20, *train("fp16", tiny("byol", "mosaic", "fp16"), 20)),
        ("2b", "train-moco-mosaic-fp32", 20, *train("fp32", fp32, 20)),
        ("2b", "resume-first-10-steps", 20, *train("resumed", fp32, 10)),
        ("2b", "resume-to-20-steps", 20, train("resumed", fp32, 20, "--resume")[0],
         resume_verdict(os.path.join(outputs, "fp32"), os.path.join(outputs, "resumed"), 10, 20)),
        # each process adds its start (imports, CUDA context, NCCL's rendezvous): a couple of seconds
        ("2c", f"torchrun-byol-{n}-process", 30 + 2 * n, *train("torchrun", tiny("byol", "mosaic", world=n), 20,
                                                               launch=torchrun, world=n)),
        ("3", "bench", 60, [PY, *BENCH, "--batch-size", str(batch)],
         functools.partial(bench_verdict, note=why)),
    ]]


def cifar_step(args, framework, minutes):
    """Stage 4's cifar_table.py run of one framework's three view modes and their k-NN, fit in `minutes`."""
    argv = [PY, "tools/cifar_table.py", "--data", args.data, "--out",
            os.path.join(args.out, "outputs", f"cifar-{framework}"), "--minutes", f"{minutes:.1f}", "--runs",
            *[f"{framework}-{v}" for v in VIEWS], "--probe-epochs", "0"]
    return Step("4", f"cifar-{framework}", CIFAR_NEED_S, argv, last_line)


def cifar_data(args) -> str:
    """'' when args.data holds train/ and test/, else why stage 4 cannot run."""
    if all(os.path.isdir(os.path.join(args.data, split)) for split in ("train", "test")):
        return ""
    return f"no CIFAR-10 ImageFolder at {args.data} (train/, test/): pass --data (extract cifar10-jpg.tar.gz)"


# ---- verdicts: read a finished step's outputs

def read_log(out):
    """(per-step records, final record or None) of a train.py --out folder's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if not r.get("final")], next((r for r in records if r.get("final")), None)


def train_verdict(out, steps, world=1):
    """A train.py run that logged steps 1..steps and ends with ranks that agree (it stops on a non-finite loss)."""
    def verdict(log_path):
        logged, final = read_log(out)
        if final is None or [r["step"] for r in logged] != list(range(1, steps + 1)):
            raise CheckFailed(f"log.jsonl holds steps {[r['step'] for r in logged]}, not 1..{steps}")
        if len(final["rank_checksums"]) != world or not final["ranks_identical"]:
            raise CheckFailed(f"ranks: {final['rank_checksums']} (identical: {final['ranks_identical']})")
        last = logged[-1]
        return (f"loss {logged[0]['loss']:.3f} -> {last['loss']:.3f}, target_std {last['target_std']:.2f}, max memory "
                f"{last['max_memory_gb']} GB, {last['images_per_s']:.0f} img/s, {world} rank(s) identical")
    return verdict


def resume_verdict(baseline, resumed, split, steps):
    """The resumed run's losses repeat the uninterrupted run's (both fp32): steps 1..split differ by the GPU's own
    nondeterminism (atomics, cuDNN's algorithms), ~1e-6; a resume that restores a wrong state (queue, RNG, schedule,
    data order) moves the later losses by ~1e-2. Tolerance: 10x that floor + 1e-4 of the loss."""
    def verdict(log_path):
        a = {r["step"]: r["loss"] for r in read_log(baseline)[0]}
        b = {r["step"]: r["loss"] for r in read_log(resumed)[0]}
        if sorted(b) != list(range(1, steps + 1)) or sorted(a) != sorted(b):
            raise CheckFailed(f"steps logged: uninterrupted {sorted(a)}, resumed {sorted(b)}")
        floor = max(abs(a[s] - b[s]) for s in range(1, split + 1))
        after = max(abs(a[s] - b[s]) for s in range(split + 1, steps + 1))
        tolerance = 10 * floor + 1e-4 * max(abs(v) for v in a.values())
        summary = (f"max |loss difference| steps {split + 1}-{steps} after the resume: {after:.2e}; steps 1-{split} "
                   f"(nondeterminism floor): {floor:.2e}; tolerance {tolerance:.2e}")
        if after > tolerance:
            raise CheckFailed(summary)
        return summary
    return verdict


def last_line(log_path):
    """A command's last line as its summary (pytest's counts, a probe's or cifar_table's verdict); its '- ' and
    '|' lines (bullets, a table) for the report."""
    with open(log_path) as f:
        lines = [line.rstrip() for line in f.read().split("\n", 2)[-1].splitlines() if line.strip()]   # no "$ ..."
    return (lines or ["no output"])[-1], "\n".join(line for line in lines if line.startswith(("- ", "|")))


def env_verdict(log_path):
    """torch's environment report: its lines of torch, CUDA, cuDNN, the GPUs, driver, CPU, NCCL for the report."""
    with open(log_path) as f:
        text = f.read()
    keep = r"^(PyTorch version|CUDA|cuDNN|GPU|Nvidia driver|Model name|CPU\(s\)|\[pip3\] (torch|nvidia-nccl))"
    gpus = re.findall(r"GPU \d+: ([^\n]+)", text)
    return f"{len(gpus)} x {gpus[0] if gpus else 'no GPU'}, {os.cpu_count()} CPU cores", "\n".join(
        f"- {line.strip()}" for line in text.splitlines() if re.match(keep, line))


def bench_answer(text, cores, gpus):
    """bench.py's output -> (summary, markdown): its table, and whether the loader feeds the GPU. A GPU takes the img/s
    of a mosaic step (train.py's step, the device augmentation included); one loader worker makes the 2 + 4 views of
    the LOADER line's img/s (JPEGs per worker-second of train.py's loader); one core stays with the training."""
    rows = {row[1]: (float(row[2]), float(row[3]))   # (step ms, img/s)
            for row in re.finditer(r"^(byol|moco)\s+mosaic\s+([\d.]+)\s+([\d.]+)", text, re.M)}
    loader = re.search(r"^LOADER loader=([\d.]+)", text, re.M)
    if not rows or not loader or float(loader[1]) <= 0:
        raise CheckFailed("no mosaic row or no LOADER line in bench.py's output")
    lines, needs, rate = [f"```\n{text[text.find('# device'):].strip()}\n```", ""], [], float(loader[1])
    for framework, (step_ms, ips) in sorted(rows.items()):
        needs.append(math.ceil(ips / rate))
        lines.append(f"- {framework} + mosaic takes {ips:.0f} img/s per GPU (step {step_ms:.1f} ms, device "
                     f"augmentation included): **{needs[-1]} worker core(s) per GPU**")
    feeds = "yes" if max(needs) <= cores // gpus - 1 else "no"
    return f"loader feeds the GPU: {feeds} (needs {max(needs)} cores per GPU)", "\n".join(lines + [
        f"\nOne loader worker makes {rate:.0f} img/s. Does the loader feed the GPU? **{feeds}**: one more core per "
        f"GPU for the training process; {cores} cores for {gpus} GPU(s)."])


def bench_verdict(log_path, note=""):
    """bench_answer of the step's log, the note (a smaller batch, and why) after its summary."""
    with open(log_path) as f:
        summary, markdown = bench_answer(f.read(), os.cpu_count() or 1, max(1, torch.cuda.device_count()))
    return summary + note, markdown


# ---- running: the budget, the subprocesses, the report

class Runner:
    """Runs steps one at a time as subprocesses within the budget; rewrites the report after each."""
    def __init__(self, args, started: float):
        self.args, self.started, self.deadline, self.results = args, started, started + args.minutes * 60, []

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def record(self, step, status, seconds, summary, markdown=""):
        self.results.append(dict(stage=step.stage, name=step.name, command=shown(step), status=status,
                                 seconds=seconds, summary=summary, markdown=markdown, log=f"{step.name}.log"))
        write_report(self)
        print(f"[{step.stage}] {step.name}: {status} ({seconds:.0f} s) {summary}", flush=True)
        return self.results[-1]

    def run(self, step) -> dict:
        """Run a step with the time left as its timeout; its result's status: passed, FAILED, timed out or skipped."""
        left, began, log_path = self.remaining(), time.monotonic(), os.path.join(self.args.out, f"{step.name}.log")
        if step.need_s > left:
            return self.record(step, "skipped", 0.0, f"would overrun the budget: needs ~{step.need_s:.0f} s, "
                                                     f"{max(0, left):.0f} s left")
        with open(log_path, "w") as log:
            log.write(f"$ {shown(step)}\n\n")
            log.flush()   # its own session, so that its whole process group can be stopped
            process = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **step.env})
        try:
            code = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            code = None
        finally:   # at its timeout, and on Ctrl-C: no process of ours outlives the check
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)   # the whole group: torchrun's workers, loader workers
            process.wait()
        seconds = time.monotonic() - began
        if code is None:
            return self.record(step, "timed out", seconds, f"stopped at its limit of {left:.0f} s")
        if code != 0:
            with open(log_path, errors="replace") as f:
                return self.record(step, "FAILED", seconds, f"exit code {code}: {telling_line(f.read())[:300]}")
        try:
            outcome = step.verdict(log_path) if step.verdict else "exit code 0"
        except (CheckFailed, OSError, ValueError, KeyError, TypeError, IndexError) as error:
            return self.record(step, "FAILED", seconds, f"{type(error).__name__}: {error}")
        return self.record(step, "passed", seconds, *(outcome if isinstance(outcome, tuple) else (outcome,)))


def telling_line(text: str) -> str:
    """A log's or a parser's most telling line: the last 'error:' (from there on) or exception line, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["(no output)"]
    line = ([line for line in lines if re.search(r"error:|[\w.]+(Error|Exception|Exit)\b", line)] or lines)[-1]
    return line[line.index("error:"):] if "error:" in line else line


def write_report(runner):
    """Rewrite <out>/report.md from the results so far (a check cut short still leaves its report)."""
    args, results = runner.args, runner.results
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "FAILED", "timed out", "skipped")}
    lines = ["# GPU check report", "", f"`{getattr(args, 'command', 'python tools/check_gpu.py')}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}: used {(time.monotonic() - runner.started) / 60:.1f} of "
             f"{args.minutes:g} min; " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", "",
             *([getattr(args, "world_note", ""), ""] if getattr(args, "world_note", "") else []),
             "| stage | step | result | s | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | [{r['name']}]({r['log']}) | {r['status']} | {r['seconds']:.0f} | "
              f"{r['summary'].replace('|', '/')} |" for r in results]
    for stage, title in STAGES.items():
        lines += ["", f"## {stage}. {title}"]
        for r in (r for r in results if r["stage"][0] == stage):
            lines += ["", f"- **{r['name']}** ({r['stage']}): {r['status']} in {r['seconds']:.0f} s. {r['summary']}  ",
                      f"  `{r['command']}`"] + (["", r["markdown"]] if r["markdown"] else [])
            if r["status"] in ("FAILED", "timed out"):
                with contextlib.suppress(OSError), open(os.path.join(args.out, r["log"]), errors="replace") as f:
                    lines += ["", "```", "".join(f.readlines()[-30:]).rstrip(), "```"]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the dry run: the plan, each command parsed by its script's own parser, nothing run

class Parsed(Exception):
    """Raised in place of a script's work once its parser has accepted the command."""


@functools.lru_cache(maxsize=None)
def check_command(argv, env=()) -> tuple:
    """(ok, message): does a command of the plan parse? pytest collects its tests (it runs none); the other scripts
    run here up to their first parse_args, which parses their flags and stops them; so do cifar_table.py's own."""
    if argv[1:3] == ("-m", "pytest"):
        result = subprocess.run([*argv, "--collect-only"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, **dict(env)})
        counted = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
        if result.returncode == 0 and counted:
            return True, f"collects {counted[1]} tests (collected, not run)"
        return False, ("pytest selects no test" if result.returncode == 5 else
                       f"pytest refuses it: {telling_line(result.stderr or result.stdout)}")
    if not any(word.endswith(".py") for word in argv):   # torch's collect_env: it takes no flags
        return len(argv) == 3, f"{argv[2]} takes no flags" + (f", not {shlex.join(argv[3:])}" if argv[3:] else "")
    commands, parsed, real, script = [list(argv[1:])], [], argparse.ArgumentParser.parse_args, argv[1]

    def parse_then_stop(parser, args=None, namespace=None):
        real(parser, command[command.index(script) + 1:], namespace)
        raise Parsed
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            if argv[1] == "tools/cifar_table.py":
                table = cifar_table.parse_args(list(argv[2:]))
                commands += [c[1:] for run in table.runs for c in cifar_table.commands(table, run, table.seeds[0])[1]]
            argparse.ArgumentParser.parse_args = parse_then_stop
            for command in commands:
                script = next(word for word in command if word.endswith(".py"))   # after torchrun's own flags
                with contextlib.suppress(Parsed):
                    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
                    raise SystemExit(f"{script} never parsed its flags")
                parsed.append(script)
        except SystemExit as error:
            said = error.code if isinstance(error.code, str) else telling_line(err.getvalue())
            return False, f"{script} refuses it: {said}"
        finally:
            argparse.ArgumentParser.parse_args = real
    return True, "parsed by " + ", ".join(dict.fromkeys(parsed))


def dry_run(args) -> int:
    """Print the plan, every command with whether it parses; 0 when all do, else 1 with a one-line error."""
    steps, failures = plan(args) + [cifar_step(args, f, args.minutes) for f in ("moco", "byol")], []
    print(f"tools/check_gpu.py plan, budget {args.minutes:g} min, report in {args.out}: each command parsed, none run."
          f"\nThe bench's batch per GPU follows the GPU's memory: {BENCH_MEMORY_GB} (GiB, an estimate); this plan "
          f"shows the largest.\n{args.world_note}".rstrip())
    for i, step in enumerate(steps):
        if i == 0 or step.stage[0] != steps[i - 1].stage[0]:
            print(f"\n{step.stage[0]}. {STAGES[step.stage[0]]}" + (
                f"\n   data: {args.data} ({cifar_data(args) or 'present'}); each step is given the minutes left"
                if step.stage == "4" else ""))
        ok, message = check_command(tuple(step.argv), tuple(sorted(step.env.items())))
        failures += [] if ok else [step.name]
        print(f"   [{step.stage}] {step.name}\n      $ {shown(step)}\n      {'ok' if ok else 'FAILS'}: {message}")
    if failures:
        print(f"error: {len(failures)} of {len(steps)} commands do not parse ({', '.join(failures)}); fix them in "
              f"tools/check_gpu.py", file=sys.stderr)
        return 1
    print(f"\ndry run: all {len(steps)} commands parse")
    return 0


# ---- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8, help="time budget of the whole check (default 8)")
    p.add_argument("--out", default=os.path.join("runs", "check_gpu"),
                   help="folder for report.md, each step's <step>.log, and outputs/ (the runs, wiped at start)")
    p.add_argument("--data", help="stage 4's CIFAR-10 ImageFolder holding train/ and test/ (default data/cifar10-jpg)")
    p.add_argument("--nproc", type=int, help="processes of the torchrun step (default: the number of GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, check that each command parses, run nothing")
    return p


def repo_path(path: str) -> str:
    """A user's path as seen from the repository root, where every step runs (absolute when outside it)."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, ROOT) if absolute.startswith(ROOT + os.sep) else absolute


def main(argv=None) -> int:
    """Stages 1 to 4 within the budget (or the dry run); 0 when no step failed or timed out."""
    args = build_parser().parse_args(argv)
    args.command = "python tools/check_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.minutes <= 0:
        raise SystemExit(f"error: --minutes {args.minutes:g} must be positive")
    args.out, args.data = repo_path(args.out), repo_path(args.data or os.path.join(ROOT, "data", "cifar10-jpg"))
    args.nproc = args.nproc or max(1, torch.cuda.device_count())
    args.world_note = world_note(args.nproc, torch.cuda.device_count())
    os.chdir(ROOT)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        raise SystemExit(f"error: no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
                         f"False); run this on a GPU machine, or pass --dry-run to see the plan")
    args.gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    runner = Runner(args, time.monotonic())
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(os.path.join(args.out, "outputs"), ignore_errors=True)   # train.py refuses a used --out
    for name in (name for name in os.listdir(args.out) if name.endswith(".log")):
        os.remove(os.path.join(args.out, name))
    print(f"checking this machine within {args.minutes:g} min; report: {os.path.join(args.out, 'report.md')}")
    for step in plan(args):
        runner.run(step)
    missing = cifar_data(args)
    for framework in ("moco", "byol"):   # MoCo's three runs take the time left; BYOL's run if time remains
        step = cifar_step(args, framework, runner.remaining() / 60)
        runner.record(step, "skipped", 0.0, missing) if missing else runner.run(step)
    failed = [r["name"] for r in runner.results if r["status"] in ("FAILED", "timed out")]
    print(f"done: {len(runner.results)} steps, failed: {', '.join(failed) or 'none'}; report: {args.out}/report.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
