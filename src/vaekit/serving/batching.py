"""Micro-batching: concurrent requests for the same operation are run as one model call.

One worker thread owns the model calls. It takes the oldest job, then gathers queued jobs with
the same ``key`` until the batch holds ``max_batch_size`` images or ``max_wait_ms`` has passed
since it started gathering. A lone client pays no wait: when the previous batch held one job and
nothing else is queued, the batch runs at once (the wait only pays off under concurrency).
``max_batch_size=1`` turns coalescing off (every job runs alone, in arrival order).

``try_inline(job)`` runs a job in the caller's thread when the worker is idle and nothing is
queued (the two never run at once): a caller that knows it is alone (the HTTP app checks that no
other request is in flight) skips the thread hand-off, which on a busy machine costs more than a
small model's forward pass.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vaekit.errors import check_positive


@dataclass
class Job:
    """One request's work. Jobs with equal, non-None ``key`` may share a batch; ``n`` is its images."""

    key: Hashable | None
    n: int
    payload: Any
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Runs ``run(jobs)`` on a worker thread for batches of compatible jobs; ``run`` must set every
    job's future (result or exception)."""

    def __init__(self, run: Callable[[list[Job]], None], max_batch_size: int = 16, max_wait_ms: float = 2.0,
                 name: str = "vaekit-batcher", init: Callable[[], None] | None = None):
        check_positive("max_batch_size", max_batch_size, integer=True)
        check_positive("max_wait_ms", max_wait_ms, allow_zero=True)
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000.0
        self._init = init
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._running = False  # a batch is running (on the worker, or inline in a caller)
        self._last_jobs = 1
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet in a running batch)."""
        return len(self._queue)

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def _take_matching(self, key: Hashable, room: int) -> list[Job]:
        """Remove and return queued jobs with ``key`` that fit in ``room`` images (queue order kept)."""
        taken, kept = [], deque()
        while self._queue:
            job = self._queue.popleft()
            if job.key == key and job.n <= room:
                taken.append(job)
                room -= job.n
            else:
                kept.append(job)
        self._queue = kept
        return taken

    def try_inline(self, job: Job) -> bool:
        """Run ``job`` now in this thread if the worker is idle and nothing waits; False otherwise
        (then ``submit`` it). Its future is set either way when this returns True."""
        with self._cv:
            if self._running or self._queue or self._closed:
                return False
            self._running = True
        try:
            self._run_guarded([job])
        finally:
            with self._cv:
                self._running = False
                self._last_jobs = 1
                if self._queue or self._closed:  # wake the worker only when it has work waiting on us:
                    self._cv.notify_all()  # a needless wake costs a thread switch per request
        return True

    def _run_guarded(self, jobs: list[Job]) -> None:
        """``run(jobs)``; an exception it lets out (it must set every future: this is the last line
        of defence) becomes the result of every job whose future is still unset."""
        try:
            self.run(jobs)
        except BaseException as exc:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while (not self._queue or self._running) and not self._closed:
                self._cv.wait()
            while self._running:  # closing: let an inline job finish first
                self._cv.wait()
            if not self._queue:
                return None
            self._running = True
            first = self._queue.popleft()
            batch, n = [first], first.n
            if first.key is None or self.max_batch_size == 1:
                return batch
            deadline = time.perf_counter() + (self.max_wait if (self._last_jobs > 1 or self._queue) else 0.0)
            while n < self.max_batch_size:
                more = self._take_matching(first.key, self.max_batch_size - n)
                batch += more
                n += sum(j.n for j in more)
                left = deadline - time.perf_counter()
                if n >= self.max_batch_size or left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            return batch

    def _loop(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._last_jobs = len(batch)
            self.batches += 1
            try:
                self._run_guarded(batch)
            finally:
                with self._cv:
                    self._running = False

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
