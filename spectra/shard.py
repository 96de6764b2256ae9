"""An analysis spread over processes: torch.distributed's process group, joined or started here.

Two ways to get several processes (:func:`spectra.pipeline.analyze_run` uses whichever applies):

- **launched**: ``torchrun --nproc_per_node N -m spectra.cli.main analyze RUN`` or ``accelerate launch``
  starts N copies of the command; the launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``) says which one this is. :func:`launched` joins the default process
  group (initialising it with ``env://`` when the launcher has not) and returns this rank's :class:`Group`.
- **spawned**: ``spectra analyze RUN --devices cuda:0,cuda:1`` (or ``cpu,cpu``): :func:`spawned` starts
  one worker per device after the first with ``torch.multiprocessing`` (spawn), rendezvous through a
  ``FileStore`` in a temporary folder; this process is rank 0 and keeps the first device.

Ranks exchange only small JSON texts (the plan, the rows of metrics) through a gloo group, whatever the
devices: rows are a few kB per module, and gloo needs no CUDA. Every rank computes; rank 0 alone
writes files. A rank that dies makes the others' next exchange fail (gloo sees the closed connection),
and a spawned worker that dies is noticed between chunks (:meth:`Group.check`); either way the error
names the worker and nothing is written.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectra.errors import SpectraError, first_line

#: Ranks may wait long for each other (rank 0 computes W0's spectra of a 7B model alone): collectives
#: wait this long, a dead peer is noticed at once all the same (its socket closes).
EXCHANGE_TIMEOUT = timedelta(hours=12)
#: How long the processes of a spawned analysis wait for each other to start.
START_TIMEOUT = timedelta(minutes=10)


class ShardError(SpectraError):
    """A process of a sharded analysis failed, or the sharding options do not fit together."""


@dataclass
class Group:
    """This process's place in an analysis over ``world`` processes (rank 0 writes), and its device."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    pg: Any = None  # the gloo process group rows travel through (None for one process)
    alive: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON-able) on every rank."""
        if self.world == 1:
            return obj
        box = [json.dumps(obj) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return json.loads(box[0])

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, json.dumps(obj), group=self.pg)
        return [json.loads(text) for text in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.pg)

    def check(self) -> None:
        """Raise :class:`ShardError` if a spawned worker has died (called between chunks)."""
        if self.alive is not None:
            self.alive()


ONE = Group()


def is_main_process() -> bool:
    """False in the processes of a torchrun / ``accelerate launch`` launch other than rank 0 (they
    analyse their share and write nothing)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def parse_devices(devices: str | Sequence[str] | None) -> list[str]:
    """``"cuda:0,cuda:1"`` or a list → ``["cuda:0", "cuda:1"]`` (empty for None)."""
    if devices is None:
        return []
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out = [d.strip() for d in items if d.strip()]
    if isinstance(devices, str) and not out:
        raise ShardError(f"--devices {devices!r}: expected a comma-separated list such as cuda:0,cuda:1")
    return out


def launched(device: str | None) -> Group | None:
    """This rank's group when the process was started by torchrun / ``accelerate launch`` (WORLD_SIZE > 1
    in the environment), else None. The device: ``device`` when it names one (``cuda:1``, ``cpu``), else
    ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return None
    if not dist.is_initialized():  # the launcher left it to us: ours to close at exit
        dist.init_process_group(backend="gloo", init_method="env://", timeout=EXCHANGE_TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = _exchange_group()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"
    elif device is None:
        device = "cpu"
    return Group(rank, world, device, pg)


_EXCHANGE: dict[int, Any] = {}


def _exchange_group() -> Any:
    """A gloo group over all ranks (the default group itself when it is gloo), made once per process."""
    if dist.get_backend() == "gloo":
        return None  # None: the default group
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _EXCHANGE:
        _EXCHANGE[key] = dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
    return _EXCHANGE[key]


@contextmanager
def spawned(devices: list[str], worker: Callable[..., None], args: tuple[Any, ...]) -> Iterator[Group]:
    """Start ``len(devices) - 1`` workers, ``worker(i, store, world, devices, threads, *args)`` for rank
    ``i + 1`` (each runs inside :func:`join_spawned`), and yield rank 0's group (device ``devices[0]``).
    On CPU devices each process gets an equal share of the cores. On leaving, waits for the workers; on
    an error or Ctrl-C, stops them, and raises :class:`ShardError` naming a worker that failed."""
    if dist.is_available() and dist.is_initialized():
        raise ShardError(
            "--devices starts its own processes; under torchrun or accelerate launch leave it out "
            "(each launched process analyses its share on its own device)"
        )
    world = len(devices)
    folder = tempfile.mkdtemp(prefix="spectra-shard-")
    store = os.path.join(folder, "store")
    cpus = sum(torch.device(d).type == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // max(cpus, 1))
    before = torch.get_num_threads()
    args = (store, world, devices, threads, *args)
    context = mp.start_processes(worker, args=args, nprocs=world - 1, join=False, start_method="spawn")

    def alive(wait: float = 0.0) -> None:
        for i, process in enumerate(context.processes):
            process.join(wait)
            if process.exitcode is not None and process.exitcode != 0:
                raise ShardError(_worker_failure(folder, i, process.exitcode, devices))

    try:
        if torch.device(devices[0]).type == "cpu":
            torch.set_num_threads(threads)
        deadline = time.monotonic() + START_TIMEOUT.total_seconds()
        while not all(os.path.exists(os.path.join(folder, f"worker{r}.ready")) for r in range(1, world)):
            alive(wait=0.1)  # a worker that dies before joining is named, not waited for
            if time.monotonic() > deadline:
                raise ShardError(f"--devices {','.join(devices)}: workers not started after {START_TIMEOUT}")
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=0, world_size=world, timeout=START_TIMEOUT
        )
        try:
            yield Group(0, world, devices[0], _long_lived(), alive)
        except Exception as e:
            alive(wait=5.0)  # a worker that died is the cause: name it
            raise e
        for process in context.processes:
            process.join()
        alive()
    except BaseException:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(30)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(before)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def join_spawned(rank: int, store: str, world: int, devices: list[str], threads: int) -> Iterator[Group]:
    """In a worker started by :func:`spawned`: join the group as ``rank``, yield it, and leave it; an
    exception is written (one line) where rank 0 reads it, then raised."""
    try:
        if torch.device(devices[rank]).type == "cpu":
            torch.set_num_threads(threads)
        with open(os.path.join(os.path.dirname(store), f"worker{rank}.ready"), "w"):
            pass  # rank 0 joins once every worker has got this far
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=START_TIMEOUT
        )
        yield Group(rank, world, devices[rank], _long_lived())
    except Exception as e:
        error = os.path.join(os.path.dirname(store), f"worker{rank}.error")
        with open(error, "w") as fh:
            fh.write(first_line(e) if isinstance(e, SpectraError) else f"{type(e).__name__}: {first_line(e)}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _long_lived() -> Any:
    """The group rows travel through once everyone has started: the same ranks, a long timeout."""
    return dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)


def _worker_failure(folder: str, index: int, code: int, devices: list[str]) -> str:
    """One line: which worker failed and how (its exception, or the signal that ended it)."""
    rank = index + 1
    where = f"analysis worker {rank} ({devices[rank]})"
    error = os.path.join(folder, f"worker{rank}.error")
    if os.path.exists(error):
        with open(error) as fh:
            return f"{where} failed: {fh.read().strip()}; nothing was written"
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return f"{where} {how}; nothing was written (run the analysis again)"
