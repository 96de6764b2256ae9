"""The sandboxed math-verify worker: a long-lived process that compares answers, with timeouts that work.

This file is both sides of it: the worker's main loop (:func:`_serve`), and the caller's handle on it
(:func:`verify_pairs`, :func:`shutdown_worker`). It imports only the standard library (and math-verify
inside the worker), because the worker loads this file by path in a fresh interpreter.

Why a worker process
--------------------
math-verify guards parsing and comparison with ``signal.alarm``. That works only in the main thread
of the main interpreter, and TRL, vLLM servers and evaluation loops may call a reward from any thread.
A hostile answer such as ``9^{9^{9^{9^{9}}}}`` makes sympy compute for minutes (``9!!!!``: gigabytes),
so an answer must never be checked without a timeout that really works. The design:

1. Cheap filters run in the caller (:mod:`spectra.train.answers`): no boxed answer, or one longer than
   ``MAX_ANSWER_CHARS``, scores 0 without parsing; so does a relation against a truth that is not one;
   two exact numbers (``85`` vs ``85.0``, ``1.965e3`` vs ``1965``) are compared exactly in the caller,
   which can not hang and keeps the arithmetic model organism fast.
2. Everything else goes to one long-lived worker process that runs math-verify with its own signal
   timeouts switched off. It is a fresh interpreter (``python -c``, never a fork or a multiprocessing
   "spawn", which would re-run the user's ``__main__`` script); it loads this file by path, so it
   imports math-verify but not torch, and it starts once (about half a second), not per call.
3. The caller sends a whole batch in one message and reads one result per item, waiting at most
   ``timeout`` seconds for each. If an item runs past it (or crashes the worker), that item scores 0,
   the worker is killed, a new one is started and the rest of the batch goes on there: a hostile item
   does not zero its neighbours. A lock serialises callers, so this is safe from any thread; after a
   ``fork`` the child forgets its parent's worker and starts its own; ``atexit`` kills the worker.
   If the parent is killed outright (SIGKILL), an idle worker exits at once (its stdin closes), but one
   busy on a hostile answer runs on until that computation ends.

POSIX only (pipes as :class:`multiprocessing.connection.Connection` over file descriptors).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger("spectra.train.rewards")

WORKER_START_TIMEOUT = 120.0
"""Seconds to wait for a new worker to import math-verify and say it is ready."""

WORKER_MEMORY_LIMIT = 4 * 2**30
"""Address-space limit (bytes) of the worker, so a runaway sympy computation fails instead of swapping."""

Verdict = tuple[float, bool]
"""(score, whether the answer parsed): 1.0 or 0.0, and False when math-verify read nothing."""

# ---------------------------------------------------------------------------------------------------
# The worker process: its side
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _parse_boxed(text: str) -> list[Any]:
    """math-verify's parse of ``\\boxed{text}`` with LaTeX extraction only (worker side, no timeout).

    Wrapping a bare answer in a box makes the extraction read all of it: parsed with math-verify's
    default settings, the bare text ``3, 5`` would read as 5 and ``2\\sqrt{3}`` as 2.
    """
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None)


def _verify_pair(answer: str, truth: str) -> Verdict:
    """(1.0 if math-verify finds ``answer`` equal to ``truth`` else 0.0, whether ``answer`` parsed);
    worker side, no timeout."""
    from math_verify import verify

    predicted: list[Any] = []
    try:
        predicted = _parse_boxed(answer)
        gold = _parse_boxed(truth)
        return (1.0 if gold and predicted and verify(gold, predicted, timeout_seconds=None) else 0.0), bool(
            predicted
        )
    except Exception:
        return 0.0, bool(predicted)


def _limit_memory() -> None:
    """Cap the worker's address space at WORKER_MEMORY_LIMIT where the platform allows it."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass


def _serve() -> None:
    """The worker's main loop: read a JSON batch of [answer, truth] pairs, send ``[index, score, parsed]``
    per item.

    Requests arrive on stdin and results leave on the original stdout; stdout itself is pointed at
    stderr so that anything a library prints can not corrupt the results. Exits when stdin closes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then kills us
    _limit_memory()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the parent times us
    requests = Connection(0, writable=False)
    results = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    if _verify_pair("1/2", "0.5") != (1.0, True):  # imports and warms up math-verify before saying ready
        raise RuntimeError("math-verify does not work in the reward worker")
    results.send_bytes(b'"ready"')
    while True:
        try:
            batch = json.loads(requests.recv_bytes())
        except EOFError:
            return
        for index, (answer, truth) in enumerate(batch):
            results.send_bytes(json.dumps([index, *_verify_pair(answer, truth)]).encode())


# ---------------------------------------------------------------------------------------------------
# The worker process: the caller's side
# ---------------------------------------------------------------------------------------------------

# Loads this file as a module by path (not through the spectra package, which would import torch) and
# calls its _serve(). The first sys.path entry of ``python -c`` is the working directory; it is dropped
# so that a file there can not shadow a module that math-verify imports.
_BOOTSTRAP = (
    "import importlib.util, sys; del sys.path[0]; "
    "spec = importlib.util.spec_from_file_location('spectra_reward_worker', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module._serve()"
)


class _Worker:
    """One math-verify worker process and the two pipes to it."""

    def __init__(self) -> None:
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__)],
            stdin=request_read,
            stdout=result_write,
            close_fds=True,
        )
        os.close(request_read)
        os.close(result_write)
        self.requests = Connection(request_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self.owner_pid = os.getpid()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        try:
            ready = self.results.poll(WORKER_START_TIMEOUT) and self.results.recv_bytes() == b'"ready"'
        except EOFError:
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(
                "spectra.train.rewards: the math-verify worker did not start (see its error above); "
                "is math-verify installed? pip install 'spectra-rlvr[train]'"
            )

    def is_usable(self) -> bool:
        """Alive, and started by this process (not inherited through a fork)."""
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def verify(self, pairs: Sequence[tuple[str, str]], timeout: float) -> list[Verdict]:
        """Verdicts on the longest prefix of ``pairs`` that finishes within ``timeout`` seconds per item.

        If the result is shorter than ``pairs``, the next item ran past the timeout or crashed the
        worker, and the worker has been killed. Any exception (Ctrl-C included) also kills it, so
        that no stale result is read by the next batch.
        """
        scores: list[Verdict] = []
        try:
            self.requests.send_bytes(json.dumps(list(pairs)).encode())
            for index in range(len(pairs)):
                if not self.results.poll(timeout):
                    break
                got_index, score, parsed = json.loads(self.results.recv_bytes())
                if got_index != index:
                    raise RuntimeError(f"reward worker answered item {got_index}, expected {index}")
                scores.append((float(score), bool(parsed)))
        except (EOFError, OSError):
            pass  # the worker died: scored as a failure of the current item
        except BaseException:
            self.kill()
            raise
        if len(scores) < len(pairs):
            self.kill()
        return scores

    def kill(self) -> None:
        """Kill the process, reap it and close the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.requests.close()
        self.results.close()


_lock = threading.Lock()
_worker: _Worker | None = None


def _usable_worker() -> _Worker:
    """The current worker, started (or replaced) if needed. Call with ``_lock`` held."""
    global _worker
    if _worker is None or not _worker.is_usable():
        if _worker is not None and _worker.owner_pid == os.getpid():
            _worker.kill()
        _worker = _Worker()
    return _worker


def verify_pairs(pairs: Sequence[tuple[str, str]], timeout: float) -> list[Verdict]:
    """math-verify verdicts on ``(answer, truth)`` pairs; an item past ``timeout`` seconds scores 0."""
    scores: list[Verdict] = []
    with _lock:
        while len(scores) < len(pairs):
            done = _usable_worker().verify(pairs[len(scores) :], timeout)
            scores.extend(done)
            if len(scores) < len(pairs):
                answer = pairs[len(scores)][0]
                logger.warning(
                    "reward: math-verify ran past %.1f s (or crashed) on a %d-character answer; scored 0",
                    timeout,
                    len(answer),
                )
                scores.append((0.0, False))
    return scores


def shutdown_worker() -> None:
    """Kill the worker process if there is one; a later call starts a new one."""
    global _worker
    with _lock:
        if _worker is not None and _worker.owner_pid == os.getpid():
            _worker.kill()
        _worker = None


def _kill_worker_at_exit() -> None:
    """At interpreter exit: kill the worker without taking the lock, which a daemon thread may hold
    while it waits on a hung answer."""
    worker = _worker
    if worker is not None and worker.owner_pid == os.getpid() and worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


def _forget_worker_after_fork() -> None:
    """In a forked child: drop the parent's worker and lock; the child starts its own when needed."""
    global _worker, _lock
    _worker = None
    _lock = threading.Lock()


atexit.register(_kill_worker_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)
