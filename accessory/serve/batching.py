"""Requests that wait for the model together run as one engine batch.

One worker thread owns the model. A request is a :class:`Job`: its prompts (one per choice), token
budgets, sampling settings, stop strings and pictures (rows of one batch may each have their own). When the worker is free it takes the oldest waiting job
and every other waiting job that can share a batch with it (same sampling settings, stop strings
and logprob settings; a seeded sampling job always runs alone, since the engine seeds batch row r
with seed + r), up to ``max_rows`` rows, and runs them through ``engine.run`` at once. After each
decode step every job receives a snapshot of its own rows; a job whose rows are all done gets its
end at once, even while the rest of the batch goes on. Jobs that arrive while a batch runs wait
for the next one (no joining mid-run: the engine's batch is fixed when it starts).

A job cancelled by its consumer (a client that left) has its rows marked finished between two steps,
so the engine drops them from the batch; with no rows left the run ends.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Sequence
from typing import Callable, Iterator, List, Optional, Tuple

from ..generation.sampling import SamplingParams

_END = object()


class _Prefix(Sequence):
    """The first ``n`` items of a list that only ever grows (the engine appends, never rewrites)."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list):
        self._items, self._n = items, len(items)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._items[slice(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return self._items[index % self._n]


@dataclasses.dataclass(frozen=True)
class RowSnapshot:
    """One row's state after a step. The engine goes on changing its own row, so this keeps the
    strings and flags, and views of the token lists as long as they were then (O(1) per step)."""
    visible: str
    finished: bool
    finish_reason: Optional[str]
    new_tokens: Sequence[int]
    logprobs: Sequence[float]
    top_logprobs: Sequence[Sequence[Tuple[int, float]]]
    cached_tokens: int = 0  # prompt tokens served by the engine's prompt cache

    @classmethod
    def of(cls, row) -> "RowSnapshot":
        return cls(row.visible, row.finished, row.finish_reason, _Prefix(row.new_tokens), _Prefix(row.logprobs),
                   _Prefix(row.top_logprobs), row.cached_tokens)


class Job:
    """One request's rows; iterate it for the snapshots of its rows after each step."""

    _ids = itertools.count()

    def __init__(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], sampling: SamplingParams,
                 stops: Sequence[str], logprobs: bool, top_logprobs: int, images: Optional[Sequence] = None):
        """``images``: per row, a picture (whatever ``run`` takes as ``images``) or None; None for all."""
        self.prompts = [list(p) for p in prompts]
        self.images = None if images is None else list(images)
        self.max_new_tokens = list(max_new_tokens)
        self.sampling, self.stops = sampling, list(stops)
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.id = next(self._ids)
        self.cancelled = False
        self._events: "queue.Queue" = queue.Queue()

    @property
    def key(self):
        """Jobs with equal keys may share a batch."""
        alone = self.sampling.seed is not None and not self.sampling.greedy
        return (dataclasses.astuple(self.sampling), tuple(self.stops), self.logprobs, self.top_logprobs,
                self.id if alone else None)

    def cancel(self) -> None:
        """Stop generating for this job (its rows leave the batch after the current step)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[List[RowSnapshot]]:
        """Snapshots of this job's rows after each step, until all are finished; re-raises a failure."""
        while True:
            item = self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class BatchScheduler:
    """The worker thread that runs jobs through ``run`` (``GenerationEngine.run``'s signature)."""

    def __init__(self, run: Callable, max_rows: int = 16):
        self.run = run
        self.max_rows = max_rows
        self._waiting: List[Job] = []
        self._condition = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        #: rows of each batch run so far (for tests and logs)
        self.batch_sizes: List[int] = []

    def submit(self, job: Job) -> Job:
        with self._condition:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="accessory-serve-batcher", daemon=True)
                self._thread.start()
            self._condition.notify()
        return job

    def _next_batch(self) -> List[Job]:
        with self._condition:
            while not self._waiting:
                self._condition.wait()
            first = self._waiting.pop(0)
            batch, rows = [first], len(first.prompts)
            for job in list(self._waiting):
                if job.key == first.key and rows + len(job.prompts) <= self.max_rows:
                    self._waiting.remove(job)
                    batch.append(job)
                    rows += len(job.prompts)
            return batch

    def _work(self) -> None:
        while True:
            batch = [job for job in self._next_batch() if not job.cancelled]  # a cancelled one's reader left
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: List[Job]) -> None:
        first = batch[0]
        spans, start = [], 0
        for job in batch:
            spans.append((job, start, start + len(job.prompts)))
            start += len(job.prompts)
        prompts = [p for job in batch for p in job.prompts]
        budgets = [n for job in batch for n in job.max_new_tokens]
        self.batch_sizes.append(len(prompts))
        open_jobs = {job.id for job in batch}
        images = {}
        if any(job.images is not None for job in batch):  # (rows of jobs without pictures: None)
            images["images"] = [image for job in batch for image in (job.images or [None] * len(job.prompts))]
        steps = self.run(prompts, budgets, first.sampling, first.stops, logprobs=first.logprobs,
                         top_logprobs=first.top_logprobs, **images)
        try:
            for states in steps:
                for job, begin, end in spans:
                    if job.id not in open_jobs:
                        continue
                    rows = states[begin:end]
                    if job.cancelled:
                        for row in rows:  # the engine drops finished rows before its next step
                            row.finished = True
                        open_jobs.discard(job.id)
                        job._events.put(_END)
                        continue
                    job._events.put([RowSnapshot.of(row) for row in rows])
                    if all(row.finished for row in rows):
                        open_jobs.discard(job.id)
                        job._events.put(_END)
                if not open_jobs:
                    break
        except Exception as exc:  # each waiting consumer re-raises it
            for job, _, _ in spans:
                if job.id in open_jobs:
                    job._events.put(exc)
        else:
            for job, _, _ in spans:
                if job.id in open_jobs:
                    job._events.put(_END)
        finally:
            steps.close()
