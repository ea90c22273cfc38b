"""Run functions on N local ranks (gloo on the CPU) from a notebook or a test, or under torchrun.

    with LocalRanks(4) as ranks:              # 4 processes, one gloo process group
        results = ranks.run(fn, *args)        # fn(*args) on every rank, results in rank order

`fn` must be importable by name (a module-level function of an installed module: functions defined
in a notebook cannot travel to another process); inside it torch.distributed is initialised
(`dist.get_rank()`, `dist.get_world_size()`). An exception on any rank raises `RankError` with
every rank's traceback. The process group's `timeout` bounds every collective, so a rank that never
joins or stops answering makes the others fail within it instead of hanging; the parent also gives
up on a rank that has not answered after `wait` seconds, and stops all of them.

Processes start from a fork server that has already imported torch and moe_lib, so a pool starts in
about a second instead of paying torch's import once per rank.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

PRELOAD = ["torch", "torch.distributed", "moe_lib.parallel"]


class RankError(RuntimeError):
    """One or more ranks raised; `errors` maps each failed rank to its traceback or message."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        details = "\n".join(f"--- rank {rank} ---\n{text.rstrip()}" for rank, text in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed: {sorted(errors)}\n{details}")


def init_process_group(rank: int, world_size: int, address: str, timeout: float,
                       backend: str = "gloo") -> None:
    """`dist.init_process_group`, with a message that says which set-up did not form in time."""
    try:
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as err:  # DistStoreError, DistNetworkError, gloo's errors
        raise TimeoutError(f"rank {rank}: the process group of {world_size} ranks at {address} did not "
                           f"form within {timeout:g} s (a rank never joined?): {type(err).__name__}: "
                           f"{err}") from err


def init_from_env(timeout: float = 30.0) -> torch.device:
    """Initialise from torchrun's environment: NCCL on GPUs (one per local rank), gloo otherwise."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return device


def _worker(rank: int, world_size: int, address: str, timeout: float, threads: int,
            tasks, results) -> None:
    torch.set_num_threads(threads)
    try:
        init_process_group(rank, world_size, address, timeout)
    except TimeoutError as err:
        results.put((rank, False, str(err)))
        return
    results.put((rank, True, None))
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except Exception:  # every error goes back to the parent, with its traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def free_address() -> str:
    """A tcp:// address on localhost with a port the OS just reported free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class LocalRanks:
    """A pool of `world_size` local processes in one gloo process group.

    Args:
        world_size: ranks in the group.
        timeout: seconds every collective (and forming the group) may wait.
        threads: torch intra-op threads per rank.
        ranks: the ranks to start here (default all; the others must join from elsewhere).
        wait: seconds the parent waits for each answer before stopping every rank
            (default 4 x timeout).
    """

    def __init__(self, world_size: int, timeout: float = 30.0, threads: int = 1,
                 ranks: Sequence[int] | None = None, wait: float | None = None):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self.world_size, self.wait = world_size, wait or 4 * timeout
        self.ranks = list(range(world_size)) if ranks is None else list(ranks)
        self._results = context.Queue()
        self._tasks = {rank: context.Queue() for rank in self.ranks}
        address = free_address()
        self._processes = [context.Process(target=_worker, daemon=True, args=(
            rank, world_size, address, timeout, threads, self._tasks[rank], self._results))
            for rank in self.ranks]
        for process in self._processes:
            process.start()
        try:
            self._collect()
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank started here; the results in rank order."""
        for rank in self.ranks:
            self._tasks[rank].put((fn, args, kwargs))
        return self._collect()

    def _collect(self) -> list:
        answers, errors = {}, {}
        while len(answers) + len(errors) < len(self.ranks):
            try:
                rank, ok, value = self._results.get(timeout=self.wait)
            except queue.Empty:
                missing = sorted(set(self.ranks) - set(answers) - set(errors))
                self.close()
                raise TimeoutError(f"rank(s) {missing} did not answer within {self.wait:g} s; "
                                   "all ranks were stopped") from None
            (answers if ok else errors)[rank] = value
        if errors:
            raise RankError(errors)
        return [answers[rank] for rank in self.ranks]

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for rank, process in zip(self.ranks, self._processes, strict=True):
            if process.is_alive():
                self._tasks[rank].put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> LocalRanks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local(fn: Callable, world_size: int, *args, timeout: float = 30.0, **kwargs) -> list:
    """fn(*args, **kwargs) on `world_size` fresh local gloo ranks; each rank's result, in order."""
    with LocalRanks(world_size, timeout=timeout) as ranks:
        return ranks.run(fn, *args, **kwargs)
