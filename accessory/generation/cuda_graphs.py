"""Decode steps replayed as CUDA graphs: one launch per token instead of hundreds.

A decode step of a small batch is a few hundred small kernels; launched one by one from Python
they leave a fast GPU idle most of the time (measured on an H200: a 7B bf16 step took 10-17 ms
eager, 5.2 ms replayed). Captured once into a CUDA graph, the step replays with one launch.
Inputs (the step's tokens and positions) are copied into static tensors the graph reads; the KV
cache is the engine's own, written in place at each row's position, and attention covers the
whole cache with the position mask (no length read back from the device).

A graph belongs to one batch size and one cache (its tensors' addresses): when rows finish and
the cache shrinks, the next step is captured again, into the same memory pool. Models whose step
cannot be captured (data-dependent shapes, such as the mixture-of-experts routing) fall back to
ordinary launches, once and for good, with a warning.

On by default on a GPU (``ACCESSORY_CUDA_GRAPHS=0`` turns it off), except for a model cut across
a model-parallel group, whose collectives inside a graph have not been run here (``=1`` turns it
on). tests/test_cuda.py checks it against ordinary launches, for llama, quantized, internlm and
falcon models, and the fallback for a mixture of experts.
"""

import itertools
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..kernels import switched_on

log = logging.getLogger(__name__)


def cuda_graphs_enabled(device: torch.device, wanted: Optional[bool] = None, model_parallel: bool = False) -> bool:
    """Whether decode steps on ``device`` replay as graphs: ``wanted`` when given, else
    ``ACCESSORY_CUDA_GRAPHS`` (``0`` turns them off, ``1`` on), else on, except for a model cut
    across a model-parallel group (its collectives inside a graph have not been run here)."""
    if wanted is None:
        setting = os.environ.get("ACCESSORY_CUDA_GRAPHS", "").strip()
        wanted = switched_on("ACCESSORY_CUDA_GRAPHS") if setting else not model_parallel
    return device.type == "cuda" and wanted


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor  # read by the graph: it must live as long as the graph does
    logits: torch.Tensor


def weights_state(model, count_writes: bool = False) -> tuple:
    """What work done with ``model`` relies on: the memory, dtype and shape of every parameter and
    buffer (a cast, a reload or a replaced module changes them), the modules' hooks and, with
    ``count_writes``, the in-place writes torch counts on each tensor. A captured graph replays
    what it captured, whatever the model has become since, and reads the weights' memory as it
    is (so it needs no write count); the engine's kept prompt caches hold values computed from
    the weights (so they do)."""
    def writes(t: torch.Tensor):
        if not count_writes:
            return None
        try:
            return t._version
        except RuntimeError:  # an inference tensor counts no writes
            return None
    tensors = tuple((t.data_ptr(), writes(t), t.dtype, tuple(t.shape))
                    for t in itertools.chain(model.parameters(), model.buffers()))
    hooks = tuple((tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in model.modules())
    return tensors, hooks


class GraphedDecoder:
    """``step(cache, tokens, positions) -> logits`` of ``model.forward_tokens`` for (batch, 1)
    inputs, replayed from a CUDA graph (or run directly when graphs cannot be used)."""

    MAX_GRAPHS = 4

    def __init__(self, model):
        self.model = model
        self.graphs = {}
        self.pool = None
        self.disabled = False
        self.captures = 0  # graphs captured so far (a new one per batch size and cache)
        self._fingerprint = None  # the model's, when the graphs were captured
        self._checked = None  # (a weak reference to) the cache the fingerprint was last checked for

    def _direct(self, cache, tokens, positions):
        index = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return self.model.forward_tokens(tokens, positions, cache, output_index=index)

    def __call__(self, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self._direct(cache, tokens, positions)
        if self._checked is None or self._checked() is not cache:  # once per cache: a new call, rows dropped
            fingerprint = weights_state(self.model)
            if fingerprint != self._fingerprint:
                self.graphs.clear()
                self._fingerprint = fingerprint
            self._checked = weakref.ref(cache)
        # the graph addresses every cache tensor: any new one (a new call, rows dropped) is a new graph
        key = (tokens.shape[0], cache.max_len, tuple(t.data_ptr() for t in cache.keys + cache.values))
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(cache, tokens, positions)
            except RuntimeError as exc:  # e.g. an operation that synchronises with the host
                log.warning("decode steps run without CUDA graphs: capturing one failed (%s)", exc)
                self.disabled = True
                self._synchronize()
                return self._direct(cache, tokens, positions)
            if len(self.graphs) >= self.MAX_GRAPHS:
                self.graphs.clear()
            self.graphs[key] = captured
        captured.tokens.copy_(tokens)
        captured.positions.copy_(positions)
        captured.graph.replay()
        return captured.logits.clone()

    # reading tokens back and handing positions over without waiting for the GPU's queue (the
    # engine replays the next step meanwhile); tests/test_cuda_graphs.py stands in for them on the CPU

    def read_back(self, *tensors: torch.Tensor) -> Callable[[], List[list]]:
        """Start copying ``tensors`` (on the GPU) to the host; the function returned waits for those
        copies alone, not for work queued after them, and gives each one's values as a list."""
        hosts = []
        for tensor in tensors:
            hosts.append(torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True))
            hosts[-1].copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> List[list]:
            copied.synchronize()
            return [host.tolist() for host in hosts]
        return wait

    def positions_tensor(self, values: list, device: torch.device) -> torch.Tensor:
        """``values`` as a (rows, 1) tensor on ``device``, copied from pinned memory without waiting."""
        return torch.tensor(values, dtype=torch.long)[:, None].pin_memory().to(device, non_blocking=True)

    def _capture(self, cache, tokens, positions) -> _Captured:
        index = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        # warm-up, outside the graph (lazy set-up, compilation): writes this step's keys/values,
        # as the replay will again
        self._warm_up(lambda: self.model.forward_tokens(tokens.clone(), positions.clone(), cache, output_index=index))
        # A graph reads its inputs at the addresses they had when it was captured: every tensor made
        # here and read by it (the token and position copies, the output index) is kept with it.
        # The rotary rows, the attention mask and the cache's write plan are worked out once per
        # forward and kept for the same positions tensor (by identity): the capture gets tensors
        # no eager forward has seen, so that all three are computed inside the graph, from the
        # positions each replay copies in, rather than taken from the warm-up as constants.
        static_tokens, static_positions = tokens.clone(), positions.clone()
        self.captures += 1
        graph, logits = self._record(
            lambda: self.model.forward_tokens(static_tokens, static_positions, cache, output_index=index))
        return _Captured(graph, static_tokens, static_positions, index, logits)

    # the CUDA calls (tests/test_cuda_graphs.py stands in for them on the CPU)

    def _warm_up(self, step: Callable[[], torch.Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, step: Callable[[], torch.Tensor]) -> Tuple["torch.cuda.CUDAGraph", torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()
        return graph, out

    def _synchronize(self) -> None:
        torch.cuda.synchronize()
