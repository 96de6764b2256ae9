"""train/importing/ahead.py: the disk reads ahead of the importer, and the next ΔW is formed while the
last is written — in order, within the window and the memory rule, errors raised where they belong."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from spectra.train.importing.ahead import ReadAhead, formed_ahead
from spectra.train.importing.weights import ModelFiles


def test_read_ahead_asks_for_every_byte_in_order_and_stays_within_its_window(tmp_path, monkeypatch):
    """ReadAhead's advice covers each part's tensors exactly once, interleaved chunk by chunk as the
    importer reads them, and never runs more than ``window`` bytes past the end of the step the
    importer is on."""
    for folder in ("base", "other"):
        (tmp_path / folder).mkdir()
        save_file({f"t{i}": torch.zeros(10 * (i + 1)) for i in range(4)}, tmp_path / folder / "m.safetensors")
    base, other = ModelFiles(tmp_path / "base"), ModelFiles(tmp_path / "other")
    parts = [[other.entries[f"t{i}"], base.entries[f"t{i}"]] for i in range(4)]
    starts = [sum(2 * 40 * (j + 1) for j in range(i)) for i in range(5)]  # 4 bytes × 10(i+1) × 2 files
    calls, step, lock, advised = [], [0], threading.Lock(), threading.Event()

    def advise(fd, offset, size, how):
        with lock:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, size, step[0]))
            advised.set()

    monkeypatch.setattr(os, "posix_fadvise", advise)
    with ReadAhead(parts, window=100, chunk=16) as ahead:
        for i in range(4):
            advised.wait(5)
            threading.Event().wait(0.05)  # let the thread run as far as its window allows
            with lock:
                step[0] = i
            ahead.at(i)
        for _ in range(1000):  # until the last step is advised (10 s at most)
            with lock:
                if sum(c[2] for c in calls) == starts[-1]:
                    break
            threading.Event().wait(0.01)
    covered = {}
    position = 0
    for file, offset, size, at_step in calls:
        covered.setdefault(file, []).append((offset, size))
        position += size
        assert position - size - starts[at_step + 1] <= 100  # the current step, then the window
    for e in (x for part in parts for x in part):
        pieces = sorted((o, s) for o, s in covered[str(e.file)] if e.begin <= o < e.end)
        assert pieces[0][0] == e.begin and sum(s for _, s in pieces) == e.nbytes
        assert all(o + s == n for (o, s), (n, _) in itertools.pairwise(pieces))
    first = [Path(c[0]).parent.name for c in calls[:2]]
    assert first == ["other", "base"]  # interleaved as the importer reads: other's block, then base's



def test_formed_ahead_yields_in_order_with_at_most_two_items_alive():
    alive, most, lock = set(), [0], threading.Lock()

    def form(i: int) -> int:
        with lock:
            alive.add(i)
            most[0] = max(most[0], len(alive))
        threading.Event().wait(0.002)
        return i

    seen = []
    for item in formed_ahead(30, form, size=lambda i: 1, may_start=lambda i, held: True):
        threading.Event().wait(0.003)  # the caller "writes" while the next is formed
        seen.append(item)
        with lock:
            alive.discard(item)  # done with it: the caller asks for the next
    assert seen == list(range(30))
    assert most[0] == 2  # the caller's and the one being formed beside it: overlap, and no more


def test_formed_ahead_waits_for_the_caller_when_memory_does_not_allow_both():
    started_while_held = []

    def may_start(i: int, held: int) -> bool:
        return held + 10 <= 10  # room for one item of 10 bytes only

    def form(i: int) -> int:
        started_while_held.append(state["holding"])
        return i

    state = {"holding": False}
    out = []
    for item in formed_ahead(5, form, size=lambda i: 10, may_start=may_start):
        state["holding"] = True
        threading.Event().wait(0.01)
        out.append(item)
        state["holding"] = False
    assert out == list(range(5)) and not any(started_while_held)


def test_an_error_while_forming_is_raised_in_the_caller_at_that_item():
    def form(i: int) -> int:
        if i == 3:
            raise ValueError("tensor 3 is damaged")
        return i

    got = []
    with pytest.raises(ValueError, match="tensor 3 is damaged"):
        for item in formed_ahead(6, form, size=lambda i: 1, may_start=lambda i, held: True):
            got.append(item)
    assert got == [0, 1, 2]


def test_a_caller_that_stops_early_stops_the_worker():
    formed = []

    def form(i: int) -> int:
        formed.append(i)
        return i

    items = formed_ahead(1000, form, size=lambda i: 1, may_start=lambda i, held: True)
    assert next(items) == 0 and next(items) == 1
    items.close()  # what a writer that fails does to the generator it reads
    count = len(formed)
    threading.Event().wait(0.05)
    assert len(formed) == count <= 3
