"""Data-parallel runs on ``torch.distributed``: one process per rank (``torchrun``), one GPU per rank.

``torchrun --standalone --nproc-per-node N --no-python mechlens run STUDY ...`` starts N copies of the
command with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and the rendezvous address) in the environment.
Each copy calls :func:`init_from_env` (NCCL with one GPU per rank when GPUs are present, else gloo),
streams its shard of the data (``mechlens.data.iter_texts(..., rank=, world_size=)``), accumulates
(``mechlens.stats.streaming``), merges the accumulators across ranks with :func:`merge`, and rank 0
alone writes (:func:`is_main`). Decisions that must be the same everywhere (a bad input found on rank 0)
travel with :func:`on_main` / :func:`broadcast_object`.

Every helper is a no-op in a single process (no process group, or a world of 1), so the same study code
runs with and without ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from mechlens.errors import ConfigError, MechlensError

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _initialized() -> bool:
    dist = _dist()
    return dist is not None and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number (set by torchrun)") from None


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1). Under torchrun (``WORLD_SIZE`` > 1)
    without a process group this is an error, not a silent shard: a study would read 1/N of the data
    and merge nothing."""
    if _initialized():
        dist = _dist()
        return dist.get_rank(), dist.get_world_size()
    if _env_int("WORLD_SIZE", 1) > 1:
        raise MechlensError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun) but no process group: call "
            "mechlens.distributed.init_from_env() first (the mechlens command does), or unset WORLD_SIZE"
        )
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes outputs and shows progress."""
    return world()[0] == 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_device(requested: str = "cuda") -> str:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when the requested device is CUDA (one GPU per
    rank), the requested device otherwise (``cpu`` ranks share the machine's CPUs)."""
    if str(requested).startswith("cuda") and world()[1] > 1:
        return f"cuda:{local_rank()}"
    return str(requested)


def init_from_env(timeout_s: float = 1800.0, device: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1) unless one is
    initialised already: NCCL with this rank's GPU (``LOCAL_RANK``) when CUDA is available and the run
    computes on CUDA (``device`` None or ``cuda...``), gloo on CPU (``device="cpu"``: ranks share the CPUs).
    Returns (rank, world_size); (0, 1) and nothing initialised without torchrun."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or _initialized():
        return world()
    dist = _dist()
    if dist is None:
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run in one process")
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        lr, n_gpus = local_rank(), torch.cuda.device_count()
        if lr >= n_gpus:
            raise ConfigError(
                f"rank with LOCAL_RANK={lr} but this machine has {n_gpus} GPU(s): one GPU per rank, so use "
                f"--nproc-per-node {n_gpus} or fewer"
            )
        torch.cuda.set_device(lr)
        kwargs.update(backend="nccl", device_id=torch.device("cuda", lr))
    else:
        kwargs.update(backend="gloo")
    dist.init_process_group(**kwargs)
    return world()


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group (at the end of a run; a no-op without one). With ``wait`` (the end of a
    successful run) every rank first waits for the others at a barrier, so that no rank tears down its
    connections while another still finishes its part (rank 0 writing the output): gloo ranks that left
    at different times could abort at exit (SIGABRT, "terminate called without an active exception").
    Pass ``wait=False`` on an error path, where another rank may never reach the barrier."""
    if _initialized():
        if wait:
            barrier()
        _dist().destroy_process_group()


def _active() -> bool:
    return _initialized() and _dist().get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, the CPU under gloo."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (float64 included; one collective per dtype: the tensors
    are packed into one buffer). A no-op in a single process."""
    if not _active():
        return
    dist, device = _dist(), _comm_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (others pass anything, e.g. None); ``obj`` in a single process."""
    if not _active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if _active():
        if _dist().get_backend() == "nccl":
            _dist().barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist().barrier()


def merge(accumulator: T) -> T:
    """Merge an accumulator of :mod:`mechlens.stats.streaming` across the ranks, in place, identically on
    every rank: ``all_reduce(SUM)`` of its state tensors (``reduce == "sum"``), or an all-gather of the
    states merged in rank order (``reduce == "gather"``, e.g. a Reservoir). A no-op in a single process."""
    if not _active():
        return accumulator
    kind = getattr(accumulator, "reduce", None)
    if kind == "sum":
        all_reduce_sum(*accumulator.state().values())
    elif kind == "gather":
        cls = type(accumulator)
        states = all_gather_object(accumulator.state())
        merged = cls.from_state(states[0])
        for s in states[1:]:
            merged.merge(cls.from_state(s))
        accumulator.__dict__.update(merged.__dict__)
    else:
        raise TypeError(f"{type(accumulator).__name__} has no reduce = 'sum' | 'gather': not an accumulator")
    return accumulator


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank (a
    :class:`MechlensError` as itself, so each rank exits with the same one-line message; any other error
    as a RuntimeError naming it on the other ranks). In a single process: ``fn(*args, **kwargs)``."""
    if not _active():
        return fn(*args, **kwargs)
    result, error, own = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except MechlensError as e:
            error = own = e
        except Exception as e:
            own, error = e, RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
    result, error = broadcast_object((result, error))
    if own is not None:
        raise own
    if error is not None:
        raise error
    return result


def raise_on_every_rank(error: BaseException | None) -> None:
    """Raise ``error`` (this rank's, or None) on every rank: each rank raises its own, a rank without one
    the first failing rank's (a :class:`MechlensError` as itself, anything else as a RuntimeError naming
    it), so no rank waits for the others in a collective. One process: ``error`` itself. Call it after a
    rank's local work (its stream), with what that work raised, before the first collective."""
    if not _active():
        if error is not None:
            raise error
        return
    mine = error if error is None or isinstance(error, MechlensError) else f"{type(error).__name__}: {error}"
    errors = all_gather_object(mine)
    if error is not None:
        raise error
    for rank, e in enumerate(errors):
        if isinstance(e, BaseException):
            raise e
        if e is not None:
            raise RuntimeError(f"rank {rank} failed: {e}")


@contextlib.contextmanager
def share_then_merge(*accumulators: Any) -> Iterator[None]:
    """This rank's local work (its share of the stream) in the ``with`` block, then the collective: an error
    of any rank is raised on every rank (:func:`raise_on_every_rank`, so none waits in a collective), else
    each accumulator is merged across the ranks (:func:`merge`)."""
    error = None
    try:
        yield
    except Exception as e:  # every rank must reach the merge, or learn why another did not
        error = e
    raise_on_every_rank(error)
    for acc in accumulators:
        merge(acc)
