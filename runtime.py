"""What a run needs around the method: the process group, and the guards that keep a run's output folder whole.

- `distributed()` joins torchrun's process group (or stays a world of one), so that every later code path is
  the same on a laptop and on many GPUs; `world_size`, `rank` and `gather_all` work in both.
- `folder_lock()` gives one run at a time its output folder; `download_lock()` one download at a time its dataset
  folder; `stop_requests()` turns SIGTERM, Ctrl-C and SIGUSR1 (a scheduler's warning that the time limit is near)
  into a request the loop polls.

Imports only torch. Nothing here prints or exits: the errors are `RunError` (or ValueError) with the fix in the
message, and the scripts turn them into their one line.
"""
import contextlib
import datetime
import os
import signal
import socket

import torch
import torch.distributed as dist

try:
    import fcntl
except ImportError:   # Windows has none: runs there go unlocked
    fcntl = None


class RunError(Exception):
    """A run cannot go on, for a reason the user can fix; the message says how."""


@contextlib.contextmanager
def distributed(timeout_minutes: float = 30):
    """Yields this process's device, having joined torchrun's process group when it set RANK (nccl on CUDA, gloo
    on CPU), else staying a world of one: every later code path is the same. Leaves the group at the end.
    timeout_minutes: how long a collective may wait for a peer before it raises (30: torch's default on gloo, and
    train.py's --dist-timeout default; NCCL's own would be 10)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        # On NCCL, torch's watchdog ends a process whose collective failed or ran over the timeout (its default
        # since torch 2.2, TORCH_NCCL_ASYNC_ERROR_HANDLING=3, skips the communicator abort that can itself hang).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def default_amp(device: torch.device) -> str:
    """--amp's default on device: bf16 where the GPU computes it natively (compute capability 8.0 and later: A100,
    H100, RTX 30xx on), fp16 (with a GradScaler) on older GPUs, off on the CPU. V100 and T4 have fp16
    tensor cores but no bf16 ones: torch.cuda.is_bf16_supported() says True there, for an emulation."""
    return "off" if device.type != "cuda" else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def world_size() -> int:
    """The number of processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n, ...] tensor from every process along dim 0, in rank order (no gradient): [n*world, ...]."""
    if world_size() == 1:
        return tensor
    gathered = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))   # written in place: no copy
    # plain layout: collectives copy raw bytes, channels_last would scramble; newer torch names it all_gather_single
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, tensor.contiguous())
    return gathered


@contextlib.contextmanager
def folder_lock(folder: str):
    """Makes folder if need be, then holds an exclusive flock on folder/.lock for the block, the holder's pid and
    host written in it (emptied at the end); yields None, or the reason the folder could not be locked (a file
    system without flock: the block runs unlocked). The kernel releases the lock however the process ends, so a
    killed run leaves no stale lock. RunError, the folder untouched, when another process holds it, or when the
    folder cannot be made or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunError(f"cannot make the output folder --out {folder}, or write in it ({error.strerror or error}); "
                       f"choose another --out") from None
    unlocked = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:   # another process holds it
        holder = os.pread(fd, 200, 0).decode(errors="replace") or "a run that is starting"
        os.close(fd)
        raise RunError(f"--out {folder} is in use by another run ({holder}); wait for it to end, or choose another "
                       f"--out") from None
    except (OSError, AttributeError) as error:   # ENOLCK, EOPNOTSUPP...; AttributeError: fcntl is None
        unlocked = getattr(error, "strerror", None) or "no flock here"
    else:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield unlocked
    finally:
        if unlocked is None:
            os.ftruncate(fd, 0)
        os.close(fd)


@contextlib.contextmanager
def download_lock(root: str):
    """Holds an exclusive flock on root/.download.lock for the block, waiting for it as long as it takes: around a
    torchvision dataset built with download=True, the first process of a machine downloads while the others (the
    ranks of a torchrun job, another run) wait, then find the files there and only check them; without it they all
    write the same archive at once and fail its integrity check on some ranks only. No collective: no timeout.
    A root that cannot be written to, or a file system without flock, runs the block unlocked."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError, AttributeError):   # AttributeError: fcntl is None (Windows)
            os.makedirs(root, exist_ok=True)
            fcntl.flock(stack.enter_context(open(os.path.join(root, ".download.lock"), "a")), fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def stop_requests():
    """Yields a list that SIGTERM (preemption), Ctrl-C and SIGUSR1 (a scheduler's "time limit near") append their
    names to during the block: the loop polls it after each step, saves, then exits. Install it only once the
    process group is joined, so that a signal before that (torchrun ending the ranks of a run whose rank 0
    stopped) ends the process at once."""
    requests = []   # a set of signals below: where there is no SIGUSR1 (Windows), SIGTERM stands in for it
    previous = {sig: signal.signal(sig, lambda number, frame: requests.append(signal.Signals(number).name))
                for sig in {signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGTERM)}}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
