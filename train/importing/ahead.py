"""Doing the next thing while this one is done: the disk reads the tensors to come, and the next ΔW is
formed while the last is written.

An import does three things per tensor: read both models' bytes (the disk), form the exact ΔW (the CPU,
in torch, which releases the GIL) and write it (HDF5 through h5py, which releases the GIL while it
writes). Done one after the other, a first import waits for the disk and then for the CPU; here
:class:`ReadAhead` keeps the disk reading ahead, and :func:`formed_ahead` forms tensor i + 1 on a worker
thread while the caller writes tensor i, on the second core.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

import torch
from spectra.train.importing.weights import TensorEntry

T = TypeVar("T")


class ReadAhead:
    """Keeps the disk reading ahead of an importer that goes through tensors in order.

    ``parts[i]``: the tensors the importer reads together at its step ``i`` (a tensor of BASE and the
    same tensor of the other model). A thread asks the kernel to read them (``posix_fadvise(WILLNEED)``,
    ``chunk`` bytes at a time, the parts' tensors interleaved as the importer reads them): the whole of
    the step the importer is on (:meth:`at`) and at most ``window`` bytes beyond it. Nothing is copied
    and no memory of the process is used: the pages land in the page cache. So a first import, whose
    models are on disk, reads them while it computes instead of before. Use it as a context manager;
    where ``posix_fadvise`` does not exist it does nothing.
    """

    def __init__(self, parts: list[list[TensorEntry]], window: int = 512 * 2**20, chunk: int = 16 * 2**20):
        self.parts, self.window, self.chunk = parts, window, chunk
        self._starts = [0]
        for part in parts:
            self._starts.append(self._starts[-1] + sum(e.nbytes for e in part))
        self._step = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        if hasattr(os, "posix_fadvise"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def at(self, step: int) -> None:
        """The importer has reached step ``step``."""
        with self._cond:
            self._step = step
            self._cond.notify_all()

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for i, part in enumerate(self.parts):
                position = self._starts[i]
                for offset in range(0, max((e.nbytes for e in part), default=0), self.chunk):
                    for e in part:
                        if offset >= e.nbytes:
                            continue
                        with self._cond:
                            while not self._closed and position - self._starts[self._step + 1] > self.window:
                                self._cond.wait()
                            if self._closed:
                                return
                        if e.file not in fds:
                            fds[e.file] = os.open(e.file, os.O_RDONLY)
                        size = min(self.chunk, e.nbytes - offset)
                        os.posix_fadvise(fds[e.file], e.begin + offset, size, os.POSIX_FADV_WILLNEED)
                        position += size
        except OSError:
            return  # only advice: the importer reads (and reports) for itself
        finally:
            for fd in fds.values():
                os.close(fd)


class _Slot(Generic[T]):
    """The hand-over between the worker and the caller: one formed item at most, and what the caller
    holds (its size), under one condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.item: T | None = None
        self.error: BaseException | None = None
        self.done = False
        self.stop = False
        self.held = 0


def formed_ahead(
    count: int,
    form: Callable[[int], T],
    size: Callable[[T], int],
    may_start: Callable[[int, int], bool],
) -> Iterator[T]:
    """``form(0)``, …, ``form(count − 1)`` in order, each formed on a worker thread while the caller
    uses the one before: at most two items alive, the caller's and the one being formed.

    ``may_start(i, held)``: whether ``form(i)`` may start while the caller holds an item of ``held``
    bytes (``size``); if not, it waits until the caller has let go (memory: an importer lets the next
    ΔW be formed beside the last only when both fit its budget). An exception in ``form`` is raised in
    the caller at that item; a caller that stops early stops the worker. The worker computes with one
    torch thread (the caller's writing is the other core's work).
    """
    slot: _Slot[T] = _Slot()

    def work() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(count):
                with slot.cond:
                    while not slot.stop and (slot.item is not None or not may_start(i, slot.held)):
                        slot.cond.wait()
                    if slot.stop:
                        return
                item = form(i)
                with slot.cond:
                    slot.item = item
                    slot.cond.notify_all()
        except BaseException as e:  # handed to the caller, raised there
            with slot.cond:
                slot.error = e
        finally:
            torch.set_num_threads(threads)
            with slot.cond:
                slot.done = True
                slot.cond.notify_all()

    worker = threading.Thread(target=work, name="form-ahead", daemon=True)
    worker.start()
    try:
        for _ in range(count):
            with slot.cond:
                slot.held = 0  # the caller is done with the item before
                slot.cond.notify_all()
                while slot.item is None and slot.error is None and not slot.done:
                    slot.cond.wait()
                if slot.error is not None:
                    raise slot.error
                if slot.item is None:
                    return
                item, slot.item = slot.item, None
                slot.held = size(item)
                slot.cond.notify_all()
            yield item
    finally:
        with slot.cond:
            slot.stop = True
            slot.cond.notify_all()
        worker.join()
