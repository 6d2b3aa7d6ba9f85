"""Running one kcore job over several processes with torch.distributed (launched by ``torchrun``).

``torchrun`` starts one process per rank and tells each its place through environment variables:
``RANK`` (0 … WORLD_SIZE−1 over all machines), ``WORLD_SIZE`` and ``LOCAL_RANK`` (its index on its machine).
:func:`init` reads them and joins the process group: NCCL when the job runs on CUDA, gloo on the CPU, one
device per local rank (``cuda:LOCAL_RANK``). Without those variables (a plain ``kcore`` command, a notebook)
everything here is a no-op for a single process, so the same code runs both ways.

What kcore spreads over ranks and how:

- **Sharding** (:func:`shard`): a list of items is cut into consecutive blocks; block i goes to rank
  i mod WORLD_SIZE. The blocks are the batches a single process would use, so per-batch arithmetic (float32
  patch products of the least-squares start, for instance) is the same whatever the world size and only the
  float64 sums over batches are added in another order.
Every helper takes the job's :class:`Context` explicitly; without one it acts for a single process (no
collective call), so a rank may also run work of its own (one fit of a study) inside a torchrun job.

- **Sums** (:func:`all_reduce_sum`, :func:`all_gather_tensors`): statistics are reduced in float64; moments of
  several ranks travel as flat tensors (``pack()`` of :mod:`kcore.metrics`' moments) and are merged with Chan
  et al.'s update in rank order (:func:`kcore.streaming.merge_moments`), so every rank gets the same numbers.
- **One writer** (:func:`main_first`): only rank 0 writes shared outputs; the others wait and learn whether it
  succeeded.

A rank that dies (killed, out of memory) makes the next collective call on the others fail; that failure is
turned into :class:`RankFailure`, whose message says so. ``torchrun`` then stops the remaining ranks with
SIGTERM, which :func:`init` turns into an exception so that temporary folders are removed on the way out.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from kcore.devices import resolve_device

T = TypeVar("T")

TIMEOUT_ENV = "KCORE_DIST_TIMEOUT"
"""Seconds a collective call waits for the other ranks before failing (default :data:`DEFAULT_TIMEOUT_S`)."""

DEFAULT_TIMEOUT_S = 600


class RankFailure(RuntimeError):
    """Another rank of the job stopped (killed, crashed or timed out), so this one cannot go on."""


class Terminated(RuntimeError):
    """This rank received SIGTERM (``torchrun`` stops the other ranks when one fails)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes in the job (1 for a single process).
        local_rank: index of this process on its machine.
        device: the device this rank computes on (``cuda:LOCAL_RANK`` on CUDA).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (a single process without a process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that writes shared outputs."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) without them.

    Raises:
        ValueError: the variables are set but malformed or inconsistent.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {name: os.environ.get(name) for name in names}
    if raw["WORLD_SIZE"] is None:
        return 0, 1, 0
    try:
        rank, world, local = (int(raw[name] or 0) for name in names)
    except ValueError as exc:
        raise ValueError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers; got {raw}. Fix: start the job with torchrun, "
            "which sets them, e.g. `torchrun --nproc-per-node 2 -m kcore fit ...`."
        ) from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"inconsistent torchrun environment {raw}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE. "
            "Fix: start the job with torchrun rather than setting these variables by hand."
        )
    return rank, world, local


def _timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError as exc:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}. Fix: e.g. {TIMEOUT_ENV}=600.") from exc
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds; got {raw!r}.")
    return _dt.timedelta(seconds=seconds)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(
        "rank stopped by SIGTERM: another rank of this job failed and torchrun is stopping the others; "
        "nothing was written."
    )


def init(device: str | torch.device | None = "auto") -> Context:
    """Join the torchrun job this process belongs to, or describe a single process.

    Under torchrun (``WORLD_SIZE`` set) the default process group is initialised once: NCCL when ``device``
    resolves to CUDA, gloo otherwise; on CUDA each rank uses ``cuda:LOCAL_RANK``. SIGTERM is turned into a
    :class:`Terminated` exception, so a rank stopped by torchrun cleans up its temporary files. Calling it
    again returns the same context.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``: the kind of device of every rank.

    Returns:
        The :class:`Context` of this process.

    Raises:
        ValueError: malformed torchrun variables, or more ranks on a machine than it has GPUs.
        RankFailure: the other ranks could not be reached (rendezvous failed or timed out).
    """
    rank, world, local = env_world()
    kind = resolve_device(device)
    if kind.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s). Fix: start at most "
                "that many processes per machine (torchrun --nproc-per-node), or pass --device cpu."
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return Context(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        _import_group_default_holders()
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            dist.init_process_group(backend, timeout=_timeout(), device_id=dev if dev.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise RankFailure(
                f"rank {rank} of {world} could not join the job ({exc}). Fix: check that every rank was started with "
                "the same torchrun --rdzv-endpoint (MASTER_ADDR/MASTER_PORT) and can reach it."
            ) from exc
    return Context(rank, world, local, dev, dist.get_backend())


def _import_group_default_holders() -> None:
    """Import, before the process group exists, the torch module that would otherwise keep the group alive.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` in its signatures, so its functions keep,
    as default arguments, whatever default group exists when the module is first imported, and a job imports it
    lazily: its first ``torch.optim`` optimizer imports ``torch._dynamo``, which imports it. Those defaults then
    held the job's group after ``destroy_process_group`` (which drops only torch's own references): the group was
    never destroyed while Python ran, and its gloo threads (the TCP loop and two workers) lived on through the
    interpreter's finalisation and the C++ static destructors, still reacting to the other rank's exit (a loop
    thread closing its socket a few ms before its own process exits, seen with strace). That teardown, which
    :func:`shutdown`'s barriers cannot order, is the likely source of the rank that still aborted now and then
    after its work was done ("terminate called without an active exception", SIGABRT; too rare to reproduce
    on demand, the leak itself is tested). Imported here first, the defaults
    are None (the default group at call time, the same meaning), so :func:`shutdown` really destroys the group
    and joins its threads while the interpreter is whole and the ranks are in step.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a build without it has nothing that could capture the group either
        pass


def current() -> Context:
    """The context of a process group already joined (by :func:`init`), else that of a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    backend = dist.get_backend()
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return Context(rank, world, local, dev, backend)


def shutdown(wait: bool = False) -> None:
    """Leave the process group (if one was joined).

    ``wait``: first wait for every rank to arrive here (a barrier), so that no rank tears its connections down
    while another still uses them (gloo then aborts the other rank with SIGABRT). Only on a normal exit: after
    a failure the other ranks may never arrive. Destroying the group closes its connections and joins its
    threads here, before the interpreter exits (:func:`_import_group_default_holders` says why that needs care).
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            try:
                dist.barrier()
                _store_barrier()
            except Exception:  # noqa: BLE001 - leaving anyway; the job's own error (if any) is what matters
                pass
        dist.destroy_process_group()


_LEAVES = itertools.count()


def _store_barrier() -> None:
    """Wait for every rank on the job's key-value store (its own TCP connection, not gloo's).

    A gloo barrier returns on one rank before the others have finished their part of it; a rank that then tears
    its connections down can abort another (pytorch/gloo#155: "terminate called without an active exception",
    SIGABRT, seen about once in 15 loaded runs of a 2-rank ``train-family``). Passing this second barrier means
    every rank has left the gloo barrier, so no gloo traffic is left when the connections close.
    """
    store = dist.distributed_c10d._get_default_store()
    key = f"kcore/leave/{next(_LEAVES)}"
    if store.add(f"{key}/arrived", 1) == dist.get_world_size():
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"])


@contextmanager
def job(device: str | torch.device | None = "auto") -> Iterator[Context]:
    """``with job(device) as ctx:`` joins the torchrun job (or not, in a single process) and leaves it after
    (all ranks together when the block ended normally)."""
    ctx = init(device)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        if ctx.distributed:
            shutdown(wait=finished)


# --------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------


def shard(items: int | Sequence[T] | Tensor, block: int = 1, ctx: Context | None = None) -> Any:
    """This rank's share of ``items``: consecutive blocks of ``block`` items, block i to rank i mod world size.

    Args:
        items: a number n (meaning ``range(n)``), a sequence or a 1-D tensor (e.g. image indices).
        block: items per block, e.g. the batch size, so that each rank gets whole batches of the global order.
        ctx: the job (default: a single process, which gets everything).

    Returns:
        The same kind as ``items`` (a list for a number or a sequence), in the original order. The shards of
        all ranks are disjoint and together hold every item; with one process, all of ``items``.
    """
    ctx = ctx or Context()
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}.")
    n = items if isinstance(items, int) else len(items)
    picks = [i for start in range(ctx.rank * block, n, ctx.world_size * block) for i in range(start, min(start + block, n))]
    if isinstance(items, int):
        return picks
    if isinstance(items, Tensor):
        return items[torch.as_tensor(picks, dtype=torch.long)]
    return [items[i] for i in picks]


def batch_slices(n: int, batch_size: int, ctx: Context | None = None) -> list[slice]:
    """This rank's batches of ``n`` positions: ``slice(s, s + batch_size)`` for s = rank·B, (rank + R)·B, ….

    One process gets ``range(0, n, batch_size)``, the batches it always used; R ranks split those same
    batches between them (the blocks of :func:`shard` with ``block=batch_size``, as slices).
    """
    ctx = ctx or Context()
    starts = range(ctx.rank * batch_size, n, ctx.world_size * batch_size)
    return [slice(s, min(s + batch_size, n)) for s in starts]


# --------------------------------------------------------------------------------------------------
# Collectives (each a no-op for a single process)
# --------------------------------------------------------------------------------------------------


def _collective(what: str, fn: Callable[[], T], ctx: Context) -> T:
    try:
        return fn()
    except (RuntimeError, ConnectionError) as exc:
        if isinstance(exc, (RankFailure, Terminated)):
            raise
        raise RankFailure(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed because another rank of the job stopped (killed, "
            f"crashed or out of memory) or did not answer within {_timeout().total_seconds():.0f} s ({exc}). "
            "Nothing was written. Fix: look at the first error printed by the other ranks, then rerun the job."
        ) from exc


def _wire(t: Tensor, ctx: Context) -> Tensor:
    """``t`` on the device the backend talks from (NCCL: the rank's GPU; gloo: the CPU)."""
    return t.to(ctx.device) if ctx.backend == "nccl" else t.cpu()


def all_reduce_sum(t: Tensor, ctx: Context | None = None) -> Tensor:
    """Sum of ``t`` over all ranks (a new tensor on ``t``'s device, same dtype); ``t`` itself for one process."""
    ctx = ctx or Context()
    if not ctx.distributed:
        return t
    buf = _wire(t.detach().clone(), ctx)
    _collective("all_reduce", lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM), ctx)
    return buf.to(t.device)


def all_reduce_floats(*values: float, ctx: Context | None = None) -> tuple[float, ...]:
    """Sums over ranks of a few Python numbers (float64)."""
    total = all_reduce_sum(torch.tensor(values, dtype=torch.float64), ctx)
    return tuple(float(v) for v in total)


def all_gather_tensors(t: Tensor, ctx: Context | None = None) -> list[Tensor]:
    """``t`` from every rank, in rank order (same shape on every rank); ``[t]`` for one process."""
    ctx = ctx or Context()
    if not ctx.distributed:
        return [t]
    buf = _wire(t.detach().contiguous(), ctx)
    out = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    _collective("all_gather", lambda: dist.all_gather(out, buf), ctx)
    return [o.to(t.device) for o in out]


def broadcast_object(obj: T, src: int = 0, ctx: Context | None = None) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things such as a decision or a message)."""
    ctx = ctx or Context()
    if not ctx.distributed:
        return obj
    box = [obj]
    _collective("broadcast", lambda: dist.broadcast_object_list(box, src=src, device=_wire(torch.zeros(1), ctx).device), ctx)
    return box[0]


def barrier(ctx: Context | None = None) -> None:
    """Wait for every rank."""
    ctx = ctx or Context()
    if ctx.distributed:
        _collective("barrier", lambda: dist.barrier(device_ids=[ctx.local_rank]) if ctx.backend == "nccl" else dist.barrier(), ctx)


def agree(ok: bool, message: str, ctx: Context | None = None) -> None:
    """Raise on every rank when any rank says not ``ok`` (so that no rank waits for one that gave up).

    Raises:
        RankFailure: some rank reported a failure; the message names the ranks and, for this rank, ``message``.
    """
    ctx = ctx or Context()
    if not ctx.distributed:
        return
    flags = all_gather_tensors(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64), ctx)
    failed = [r for r, f in enumerate(flags) if float(f[0]) > 0]
    if failed:
        raise RankFailure(f"rank(s) {failed} of {ctx.world_size} failed{': ' + message if not ok else ''}; stopping every rank.")


def main_first(fn: Callable[[], T], ctx: Context | None = None) -> T | None:
    """Run ``fn`` on rank 0 only, then let every rank know whether it succeeded.

    Returns:
        ``fn()`` on rank 0, None on the other ranks.

    Raises:
        whatever ``fn`` raised, on rank 0; :class:`RankFailure` on the other ranks when rank 0 failed.
    """
    ctx = ctx or Context()
    if not ctx.distributed:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    note = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", 0, ctx)
    if error is not None:
        raise error
    if note is not None:
        raise RankFailure(f"rank 0 failed while writing the results ({note}); nothing was written by rank {ctx.rank}.")
    return result


def map_over_ranks(fn: Callable[[T], Any], items: Sequence[T], ctx: Context | None = None) -> list[Any]:
    """``[fn(item) for item in items]`` with the items dealt out to the ranks (item i to rank i mod R).

    For independent pieces of work, such as the fits of a study: each rank runs its own items alone (no
    collective call inside ``fn``), then every rank gets all results, in the order of ``items``. The results
    must be picklable. A rank whose ``fn`` raised makes every rank raise (:func:`agree`).
    """
    ctx = ctx or Context()
    if not ctx.distributed:
        return [fn(item) for item in items]
    mine: dict[int, Any] = {}
    error: BaseException | None = None
    for i in shard(len(items), 1, ctx):
        try:
            mine[i] = fn(items[i])
        except Exception as exc:  # noqa: BLE001 - raised below, after telling the other ranks
            error = exc
            break
    try:
        agree(error is None, f"{type(error).__name__}: {error}", ctx)
    except RankFailure:
        if error is not None:
            raise error from None
        raise
    parts: list[Any] = [None] * ctx.world_size
    _collective("all_gather_object", lambda: dist.all_gather_object(parts, mine), ctx)
    merged = {i: r for part in parts for i, r in part.items()}
    return [merged[i] for i in range(len(items))]


def hosts(ctx: Context | None = None) -> list[str]:
    """The host name of every rank, in rank order (for provenance)."""
    ctx = ctx or Context()
    name = socket.gethostname()
    if not ctx.distributed:
        return [name]
    out: list[Any] = [None] * ctx.world_size
    _collective("all_gather_object", lambda: dist.all_gather_object(out, name), ctx)
    return [str(h) for h in out]
