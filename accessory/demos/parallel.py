"""Several model-parallel processes behind one demo page.

The demos start N processes in one of two ways, as the original's did:

* ``torchrun --nproc-per-node N accessory/demos/single_turn.py ...`` (single_turn, single_turn_mm):
  torchrun starts every process and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
  each runs the demo's ``main`` and calls ``run_under_torchrun``.
* ``python accessory/demos/multi_turn.py --n_gpus N ...`` (multi_turn, multi_turn_mm): the demo's own
  process becomes rank 0 and ``run_with_spawned_followers`` starts ranks 1..N-1 itself (spawned, meeting
  on --master_addr / --master_port, default: a free port). Under torchrun these use torchrun's processes.

Every rank joins one process group (nccl on CUDA, one GPU per rank; gloo on the CPU) and loads its
slice of the model (``MetaModel.from_pretrained(mp_group=...)``). Rank 0 serves the page; the page's
model is a ``Leader``, which sends every ``generate`` / ``stream_generate`` call to the other ranks
(over a gloo group of its own) before making it, so every rank makes the same call with the same
arguments and their collectives meet. The engine already makes the ranks pick the same tokens (it
broadcasts rank 0's each step). A stream goes one step at a time: before every step after the first,
rank 0 sends "go on" or "stop", so when the Stop button ends rank 0's stream, the others stop after
the same step and wait for the next request. When rank 0 stops serving it sends "shut down"; when it
disappears instead, the others' next receive fails and they exit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, List, Optional

#: How long a follower may wait for rank 0's next request (the page may sit idle for days).
CONTROL_TIMEOUT = datetime.timedelta(days=365)

Loader = Callable[..., object]            # load(args, mp_group=...) -> MetaModel (exits with the reason)
Server = Callable[[object, argparse.Namespace], object]   # serve(model, args): build the page and launch it


class RankZeroGone(RuntimeError):
    """The control channel broke: rank 0 exited or was killed."""


# ------------------------------------------------------------------ the control channel

class Channel:
    """Rank 0's requests and go-on / stop flags, broadcast to the other ranks over a gloo group."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group = group
        self.src = dist.get_global_rank(group, 0)

    def send(self, request) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([request], src=self.src, group=self.group)

    def receive(self):
        import torch.distributed as dist

        box = [None]
        try:
            dist.broadcast_object_list(box, src=self.src, group=self.group)
        except Exception as exc:
            raise RankZeroGone(str(exc)) from exc
        return box[0]

    def send_flag(self, go_on: bool) -> None:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.tensor([int(go_on)]), src=self.src, group=self.group)

    def receive_flag(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.zeros(1, dtype=torch.long)
        try:
            dist.broadcast(flag, src=self.src, group=self.group)
        except Exception as exc:
            raise RankZeroGone(str(exc)) from exc
        return bool(flag.item())


def _on_cpu(value):
    """Tensors (an image) travel as CPU tensors; the model moves them to its own device."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


class _Stream:
    def __init__(self, inner):
        self.inner = inner
        self.steps = 0
        self.done = False


class Leader:
    """Rank 0's stand-in for the model: ``generate`` and ``stream_generate`` are sent to the other
    ranks first; everything else (``args``, ``image_size``, ``takes_images``, ...) is the model's.

    Calls are serialized by a lock. A stream left unfinished (its consumer stopped: the Stop button,
    a closed page) is stopped on every rank when it is closed, or at the latest when the next call
    starts, so the ranks never disagree about which step comes next."""

    def __init__(self, model, channel: Channel):
        self._model = model
        self._channel = channel
        self._lock = threading.RLock()
        self._stream: Optional[_Stream] = None
        self._closed = False

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def model(self):
        """The model slice on rank 0 (calling it directly leaves the other ranks behind)."""
        return self._model

    def _begin(self, method: str, args, kwargs) -> None:
        if self._closed:
            raise RuntimeError("the demo is shutting down: the model-parallel processes are gone")
        if self._stream is not None:
            self._end(self._stream)
        self._channel.send((method, _on_cpu(tuple(args)), _on_cpu(dict(kwargs))))

    def _end(self, stream: _Stream) -> None:
        """Stop ``stream`` on every rank (nothing when it already ended)."""
        if not stream.done:
            stream.done = True
            self._channel.send_flag(False)
            stream.inner.close()
        if self._stream is stream:
            self._stream = None

    def _step(self, stream: _Stream):
        """The stream's next chunk, every rank stepping with it; None when it has ended."""
        if stream.done:
            return None
        if stream.steps:
            self._channel.send_flag(True)
        stream.steps += 1
        try:
            return next(stream.inner)
        except BaseException:  # StopIteration (the end) or the same error on every rank
            stream.done = True
            if self._stream is stream:
                self._stream = None
            raise

    def generate(self, *args, **kwargs):
        with self._lock:
            self._begin("generate", args, kwargs)
            return self._model.generate(*args, **kwargs)

    def stream_generate(self, *args, **kwargs):
        with self._lock:
            self._begin("stream_generate", args, kwargs)
            stream = self._stream = _Stream(self._model.stream_generate(*args, **kwargs))
        try:
            while True:
                with self._lock:
                    try:
                        chunk = self._step(stream)
                    except StopIteration:
                        return
                if chunk is None:
                    return
                yield chunk
        finally:
            with self._lock:
                self._end(stream)

    def shutdown(self) -> None:
        """Tell the other ranks to exit (once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            if self._stream is not None:
                self._end(self._stream)
            self._closed = True
            self._channel.send(None)


def follow(model, channel: Channel) -> None:
    """A rank > 0: make every call rank 0 sends, in step with it, until it says "shut down"."""
    while True:
        request = channel.receive()
        if request is None:
            return
        method, args, kwargs = request
        try:
            if method == "generate":
                model.generate(*args, **kwargs)
            elif method == "stream_generate":
                stream = model.stream_generate(*args, **kwargs)
                try:
                    for _ in stream:
                        if not channel.receive_flag():
                            break
                finally:
                    stream.close()
            else:
                raise RuntimeError(f"unknown request {method!r} from rank 0")
        except RankZeroGone:
            raise
        except Exception:  # noqa: BLE001 - rank 0 met the same error and shows it on the page
            pass


# ------------------------------------------------------------------ starting the processes

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def plan_backend(args: argparse.Namespace, n_processes: int, flag: str) -> str:
    """"nccl" when the model runs on CUDA (one GPU per process, exits when there are too few),
    else "gloo" (N processes on the CPU)."""
    import torch

    from accessory.model.meta import resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        sys.exit(f"error: --device {args.device!r}: {exc}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < n_processes:
            sys.exit(f"error: {flag}={n_processes} runs one process per GPU, but CUDA sees {count} GPU(s); "
                     f"use {flag}={count}" + (" " if count else "") + "or --device cpu (then the "
                     f"{n_processes} processes share the CPU)")
        return "nccl"
    if device.type != "cpu":
        sys.exit(f"error: {flag}={n_processes}: model parallelism runs on cuda or cpu, not {device.type}")
    return "gloo"


def check_process_count(n_processes: int, flag: str) -> None:
    if n_processes < 1:
        sys.exit(f"error: {flag}={n_processes}: give 1 or more processes")


def run_under_torchrun(args: argparse.Namespace, load: Loader, serve: Server) -> None:
    """single_turn / single_turn_mm: one process as usual, or this process's rank when torchrun
    started several (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_process_count(world, "torchrun --nproc-per-node")
    if world == 1:
        serve(load(args), args)
        return
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = plan_backend(args, int(os.environ.get("LOCAL_WORLD_SIZE", world)), "torchrun --nproc-per-node")
    _exit_with_parent(os.getppid())  # torchrun's agent gone: this demo is over
    _run_rank(rank, local_rank, world, backend, "env://", args, load, serve)


def run_with_spawned_followers(args: argparse.Namespace, n_processes: int, load: Loader, serve: Server,
                               flag: str = "--n_gpus") -> None:
    """multi_turn / multi_turn_mm: this process is rank 0 of ``n_processes`` and starts the others.
    ``load`` must be a module-level function (the followers are spawned)."""
    check_process_count(n_processes, flag)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun after all: use its processes
        if n_processes not in (1, world):
            sys.exit(f"error: {flag}={n_processes} under torchrun with {world} processes: give {flag} {world} "
                     f"(or leave it out), or run this demo with python and let {flag} start the processes")
        run_under_torchrun(args, load, serve)
        return
    if n_processes == 1:
        serve(load(args), args)
        return
    import multiprocessing

    backend = plan_backend(args, n_processes, flag)
    host = getattr(args, "master_addr", None) or "127.0.0.1"
    port = getattr(args, "master_port", None) or free_port(host)
    init_method = f"tcp://{host}:{port}"
    context = multiprocessing.get_context("spawn")
    followers = [context.Process(target=_spawned_follower, daemon=True, name=f"accessory-demo-rank{rank}",
                                 args=(rank, n_processes, backend, init_method, args, load, os.getpid()))
                 for rank in range(1, n_processes)]
    for process in followers:
        process.start()
    try:
        _run_rank(0, 0, n_processes, backend, init_method, args, load, serve)
    finally:
        _reap(followers)


def _reap(processes: List, grace_s: float = 10.0) -> None:
    deadline = time.time() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.time()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)


def _spawned_follower(rank, world, backend, init_method, args, load, parent_pid) -> None:
    _exit_with_parent(parent_pid)
    _run_rank(rank, rank, world, backend, init_method, args, load, None)


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent (killed or gone)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="accessory-demo-parent-watch", daemon=True).start()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _run_rank(rank: int, local_rank: int, world: int, backend: str, init_method: str,
              args: argparse.Namespace, load: Loader, serve: Optional[Server]) -> None:
    import torch
    import torch.distributed as dist

    if rank == 0:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_exit)  # killed: still tell the others to exit
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which shuts the others down
    args = argparse.Namespace(**vars(args))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    else:
        args.device = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        ranks = list(range(world))
        mp_group = dist.new_group(ranks)
        channel = Channel(dist.new_group(ranks, backend="gloo", timeout=CONTROL_TIMEOUT))
        model = _load_everywhere(rank, args, load, mp_group, channel)
        if rank == 0:
            leader = Leader(model, channel)
            try:
                serve(leader, args)
            finally:
                leader.shutdown()
        else:
            try:
                follow(model, channel)
            except RankZeroGone:
                sys.exit(1)  # rank 0 is gone (its own message says why)
    finally:
        dist.destroy_process_group()


def _load_everywhere(rank: int, args: argparse.Namespace, load: Loader, mp_group, channel: Channel):
    """Every rank loads its slice; when any fails, all exit, rank 0 with the (first) reason."""
    import torch.distributed as dist

    failure = None
    model = None
    try:
        model = load(args, mp_group=mp_group)
    except SystemExit as exc:  # the loaders exit with the reason
        failure = str(exc.code) if exc.code not in (None, 0) else "error: the model could not be loaded"
    except Exception as exc:  # noqa: BLE001 - reported by rank 0, then every rank exits
        failure = f"error: cannot load the model: {type(exc).__name__}: {exc}"
    failures = [None] * dist.get_world_size(channel.group)
    try:
        dist.all_gather_object(failures, failure, group=channel.group)
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"error: model-parallel process {rank}: another process stopped while loading "
                         f"({exc})") from exc
    reasons = [(r, f) for r, f in enumerate(failures) if f]
    if reasons:
        if rank != 0:
            raise SystemExit(1)  # rank 0 prints the reason
        first_rank, reason = reasons[0]
        raise SystemExit(reason if first_rank == 0 else f"{reason} (model-parallel process {first_rank})")
    return model
