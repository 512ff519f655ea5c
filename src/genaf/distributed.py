"""Data-parallel runs under ``torchrun``: the process group, rank helpers, sharding, collectives.

``torchrun --nproc_per_node=N -m genaf finetune ...`` starts N copies of genaf with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment. :func:`init_team` reads them,
starts the process group (``nccl`` on GPUs, ``gloo`` on CPUs, or the backend asked for) and
returns a :class:`Team`. Without ``WORLD_SIZE`` (or with 1) it returns :data:`SOLO`, a team of
one process on which every helper is the identity: no ``torch.distributed`` call runs.

What is shared how (docs/DISTRIBUTED.md says it for users):

- The Trainer owns data parallelism. It wraps the model in ``DistributedDataParallel`` for the
  update steps of a stage only (:class:`DataParallelStep`); the methods see a
  :class:`ModelView` whose ``__call__``, ``features`` and ``forward_head`` go through DDP, and
  they import nothing of ``torch.distributed``. What a method needs of the other processes it
  asks of ``ctx.parallel`` (this module's :class:`Team`).
- Every process draws the same global permutation of the training set and keeps its rows of
  each global batch (``ImageSet.batches(part=...)``); random starts and augmentations are drawn
  for the whole batch and sliced (``genaf.utils.RowGenerator``), so the global batch and its
  random draws are the ones a single process would use.
- BatchNorm in train mode normalises with the statistics of the *global* batch
  (:func:`global_batchnorm`, the default ``train.ddp_batchnorm: global``), or with each
  process's own (``rank``; the running statistics are then averaged at the end of every epoch).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import ConfigError, GenafError
from .utils import RowGenerator, generator, row_generator, share

BACKENDS = ("auto", "nccl", "gloo")
BATCHNORM_MODES = ("global", "rank")


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from exc


def main_process() -> bool:
    """Whether this process speaks for the run: always outside torchrun, rank 0 under it."""
    return not launched() or os.environ.get("RANK", "0") == "0"


def _dist():
    import torch.distributed as dist

    return dist


class Team:
    """The processes of one run and what they do together.

    A team of one (:data:`SOLO`) runs no collective: ``rows`` is everything, ``gather_rows`` and
    ``sum_`` return their input, ``merge`` its dict. ``stats`` accumulates the seconds and calls
    of every collective (``grad``: DDP's gradient all-reduce; ``batchnorm``: the global
    BatchNorm statistics; ``other``: the rest)."""

    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        local_rank: int = 0,
        backend: str | None = None,
        device: torch.device | None = None,
        owns_group: bool = False,
    ) -> None:
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend = backend
        self.device = device  # the device this process computes on (set under torchrun)
        # collectives on nccl need CUDA tensors
        self.comm_device = device if backend == "nccl" else torch.device("cpu")
        self.owns_group = owns_group
        self.stats = {k: {"seconds": 0.0, "calls": 0} for k in ("grad", "batchnorm", "other")}

    # ------------------------------------------------------------------ who
    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend}

    # ------------------------------------------------------------------ sharding
    def rows(self, n: int) -> tuple[int, int]:
        """This process's rows ``start, stop`` of ``n`` (contiguous blocks in rank order)."""
        return share(n, self.rank, self.world)

    def split(self, items: Iterable) -> list:
        """This process's items of a list (round robin: item i goes to rank i mod world)."""
        return [it for i, it in enumerate(items) if i % self.world == self.rank]

    def seed_key(self, key: str) -> str:
        """The unit-seed key of this process's own random stream for ``key`` (``key`` itself in a
        team of one, so a single process draws exactly as before)."""
        return key if not self.distributed else f"{key}:rank{self.rank}of{self.world}"

    def generator(self, seed: int, key: str) -> torch.Generator:
        """The generator of unit ``key``: shared by all processes, each keeping its rows of a
        batch once :meth:`set_rows` says which (a plain generator in a team of one)."""
        return row_generator(seed, key) if self.distributed else generator(seed, key)

    def set_rows(self, gen, total: int) -> tuple[int, int]:
        """Point a :meth:`generator` at this process's rows of a batch of ``total``; returns them."""
        lo, hi = self.rows(total)
        if isinstance(gen, RowGenerator) and self.distributed:
            gen.rows = (lo, hi, total)
        return lo, hi

    # ------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def _timed(self, kind: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats[kind]["seconds"] += time.perf_counter() - t0
            self.stats[kind]["calls"] += 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place, no autograd; returns it."""
        if not self.distributed:
            return t
        dev = t.device
        buf = t if dev == self.comm_device else t.to(self.comm_device)
        with self._timed("other"):
            _dist().all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite ``t`` in place with rank 0's ``t`` (same shape and dtype on every process), no
        autograd; returns it."""
        if not self.distributed:
            return t
        buf = t.detach().to(self.comm_device).contiguous()
        with self._timed("other"):
            _dist().broadcast(buf, 0)
        if buf is not t:
            with torch.no_grad():
                t.copy_(buf)
        return t

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """``{key: sum over processes}`` of a dict with the same keys on every process."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self.sum_(t)
        got = dict(zip(keys, t.tolist()))
        return {k: float(got[k]) for k in values}  # in the caller's order

    def gather_rows(self, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Every process's rows of ``t`` concatenated in rank order (the sizes may differ).

        ``grad``: with autograd; the backward sums the gradients that every process computed
        for the whole batch and keeps this process's rows (so a loss computed identically on
        every process from the gathered batch, with DDP's gradient averaging, trains exactly
        as that loss on one process)."""
        if not self.distributed:
            return t
        if grad:
            return _GatherRows.apply(t, self)
        with torch.no_grad():
            return _gather(self, t.detach())

    def broadcast_json(self, obj):
        """Rank 0's ``obj`` (JSON-able) on every process; no pickle crosses between processes."""
        if not self.distributed:
            return obj
        from .utils import _json_default

        data = json.dumps(obj, default=_json_default).encode() if self.is_main else b""
        return json.loads(self.broadcast_bytes(data).decode())

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's bytes on every process."""
        if not self.distributed:
            return data
        dist = _dist()
        n = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64, device=self.comm_device)
        with self._timed("other"):
            dist.broadcast(n, 0)
            buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.comm_device)
            if self.is_main:
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            dist.broadcast(buf, 0)
        return bytes(buf.cpu().numpy().tobytes())

    def merge(self, part: dict) -> dict:
        """The union of every process's dict (JSON-able values; keys disjoint across processes)."""
        if not self.distributed:
            return dict(part)
        data = torch.frombuffer(bytearray(json.dumps(part).encode()), dtype=torch.uint8).to(self.comm_device)
        out: dict = {}
        for chunk in _gather_list(self, data):
            out.update(json.loads(bytes(chunk.cpu().numpy().tobytes()).decode()))
        return out

    def on_main(self, fn: Callable, *args, **kwargs):
        """``fn`` run on rank 0 only (file checks and writes); its genaf error, if any, is raised
        on every process, so none is left waiting for a collective that never comes. Returns
        ``fn``'s result on rank 0 and None elsewhere."""
        if not self.distributed:
            return fn(*args, **kwargs)
        value = None
        if self.is_main:
            try:
                value = fn(*args, **kwargs)
            except GenafError as exc:
                self.broadcast_json({"ok": False, "type": type(exc).__name__, "message": str(exc)})
                raise
            except BaseException:
                self.broadcast_json({"ok": False, "type": "GenafError", "message": "rank 0 failed; see its error"})
                raise
            self.broadcast_json({"ok": True})
            return value
        out = self.broadcast_json(None)
        if not out["ok"]:
            from . import errors

            cls = getattr(errors, out["type"], GenafError)
            if not (isinstance(cls, type) and issubclass(cls, GenafError)):
                cls = GenafError
            raise cls(out["message"])
        return None

    def barrier(self) -> None:
        if self.distributed:
            with self._timed("other"):
                _dist().barrier()

    def communication(self) -> dict:
        """Seconds and calls of the collectives so far, by kind."""
        return {k: {"seconds": round(v["seconds"], 3), "calls": v["calls"]} for k, v in self.stats.items()}

    def close(self) -> None:
        """End the process group if this team started it."""
        if self.distributed and self.owns_group:
            dist = _dist()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


SOLO = Team()


def _gather_list(team: Team, t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``t`` (same dtype and trailing shape, any first dimension), in rank order."""
    dist = _dist()
    dev = t.device
    t = t.to(team.comm_device).contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=team.comm_device)
    sizes = [torch.zeros_like(n) for _ in range(team.world)]
    with team._timed("other"):
        dist.all_gather(sizes, n)
        most = int(max(int(s.item()) for s in sizes))
        pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=team.comm_device)
        pad[: t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(team.world)]
        dist.all_gather(parts, pad)
    return [p[: int(s.item())].to(dev) for p, s in zip(parts, sizes)]


def _gather(team: Team, t: torch.Tensor) -> torch.Tensor:
    return torch.cat(_gather_list(team, t))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, team):
        ctx.team = team
        parts = _gather_list(team, t.detach())
        ctx.sizes = [len(p) for p in parts]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        team = ctx.team
        g = g.contiguous().clone()
        team.sum_(g)
        start = sum(ctx.sizes[: team.rank])
        return g[start : start + ctx.sizes[team.rank]], None


def _all_reduce(team: Team, t: torch.Tensor) -> None:
    if t.device == team.comm_device:
        _dist().all_reduce(t)
    else:
        buf = t.to(team.comm_device)
        _dist().all_reduce(buf)
        t.copy_(buf)


# ---------------------------------------------------------------------- starting and ending
# The rendezvous store of this process (torchrun's env:// store: rank 0 hosts it, or torchrun's
# agent does), made once and kept for the process's life; every process group started here gets
# its own key prefix on it. Ending a group and starting the next one through a fresh env://
# rendezvous each time races: a fast process can reach the old store while rank 0 still holds it,
# read the old group's addresses under the same keys and join a group rank 0 is leaving (measured:
# two crafts in a row on two CPU processes hung, one process in a collective, the other refused).
_STORES: dict = {}  # (address, port, rank, world) -> [store, groups started on it]


def _group_store(rank: int, world: int):
    dist = _dist()
    key = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), rank, world)
    if key not in _STORES:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
        _STORES[key] = [store, 0]
    entry = _STORES[key]
    entry[1] += 1
    return dist.PrefixStore(f"genaf/group{entry[1]}", entry[0])


def init_team(device: torch.device, backend: str = "auto") -> tuple[Team, torch.device]:
    """The team of this process and the device it computes on.

    Outside torchrun: ``(SOLO, device)``, nothing started. Under torchrun: the process group
    (started here unless the caller already did; :meth:`Team.close` ends only one started
    here), and on CUDA the GPU ``LOCAL_RANK``."""
    if backend not in BACKENDS:
        raise ConfigError(f"dist_backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if not launched():
        return SOLO, device
    dist = _dist()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    world = int(os.environ["WORLD_SIZE"])
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise ConfigError("WORLD_SIZE is set but RANK is missing or not a number; start genaf with torchrun") from exc
    device = torch.device(device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError("dist_backend nccl needs CUDA devices; use gloo (or auto) for a run on CPUs")
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError("a process group is already running with another world size or rank than torchrun's")
        chosen = str(dist.get_backend())
    else:
        kwargs = {"device_id": device} if chosen == "nccl" else {}
        store = _group_store(rank, world)
        dist.init_process_group(chosen, store=store, rank=rank, world_size=world, **kwargs)
        owns = True
    return Team(rank, world, local, chosen, device, owns_group=owns), device


def check_global_batch(batch_size: int, team: Team) -> int:
    """The per-process batch: ``batch_size`` is the global batch, split evenly."""
    if team.distributed and batch_size % team.world:
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and must divide by the {team.world} processes; "
            f"choose a multiple of {team.world}"
        )
    return batch_size // team.world


def check_train_split(n_train: int, batch_size: int, team: Team) -> None:
    """Under torchrun every step takes one full global batch."""
    if team.distributed and n_train < batch_size:
        raise ConfigError(
            f"the training split holds {n_train} images, fewer than one global batch of {batch_size}; "
            "lower --batch-size or use more training images"
        )


# ---------------------------------------------------------------------- BatchNorm
class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch normalisation with the statistics of the global batch: one all-reduce in the forward
    (per channel Σx, Σx² and the count, accumulated in float64) and one in the backward (Σg and
    Σg·x̂ of every process's gradient), as torch's SyncBatchNorm does on CUDA. The gradients of
    γ and β are this process's own sums: DDP averages them with the others'."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, team: Team):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        stats = torch.cat(
            [
                xf.sum(dims, dtype=torch.float64),
                (xf * xf).sum(dims, dtype=torch.float64),
                torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device),
            ]
        )
        with team._timed("batchnorm"):
            _all_reduce(team, stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean.to(work).view(shape)) * invstd.to(work).view(shape)
        out = xhat if weight is None else xhat * weight.to(work).view(shape) + bias.to(work).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.team, ctx.dims, ctx.shape, ctx.n, ctx.in_dtype = team, dims, shape, n, x.dtype
        summary = torch.cat([mean, var, n.view(1)])
        ctx.mark_non_differentiable(summary)
        return out, summary

    @staticmethod
    def backward(ctx, g, _summary):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, c = ctx.dims, ctx.shape, xhat.shape[1]
        g = g.to(xhat.dtype)
        local = torch.cat([g.sum(dims, dtype=torch.float64), (g * xhat).sum(dims, dtype=torch.float64)])
        grad_w = grad_b = None
        if weight is not None:
            grad_b, grad_w = local[:c].to(weight.dtype), local[c:].to(weight.dtype)
        total = local.clone()
        with ctx.team._timed("batchnorm"):
            _all_reduce(ctx.team, total)
        mean_g = (total[:c] / ctx.n).to(xhat.dtype).view(shape)
        mean_gx = (total[c:] / ctx.n).to(xhat.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight.double()
        grad_x = (g - mean_g - xhat * mean_gx) * scale.to(xhat.dtype).view(shape)
        return grad_x.to(ctx.in_dtype), grad_w, grad_b, None, None


class _GlobalBatchNormMixin:
    """Train mode: normalise with the mean and (biased) variance of the global batch, summed
    across the processes (:class:`_GlobalBatchNormFn`: one all-reduce per call and one in the
    backward), and update the running statistics with them, as one process holding the global
    batch would (up to float summation order). Eval mode, or outside a team: the class's own
    forward."""

    _genaf_team: Team | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        team = self._genaf_team
        if not self.training or team is None or not team.distributed:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        out, summary = _GlobalBatchNormFn.apply(x, weight, bias, self.eps, team)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                factor = 0.0 if self.momentum is None else self.momentum
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:
                        factor = 1.0 / float(self.num_batches_tracked)
                mean, var, n = summary[:c], summary[c : 2 * c], float(summary[-1])
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out


_GLOBAL_BN = {
    cls: type(f"Global{cls.__name__}", (_GlobalBatchNormMixin, cls), {})
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}


@contextlib.contextmanager
def global_batchnorm(model: nn.Module, team: Team) -> Iterator[dict]:
    """Every ``nn.BatchNorm1d/2d/3d`` of ``model`` normalises with the global batch's statistics
    for the duration (the module objects, their tensors and state_dict keys are unchanged: only
    the forward of train mode differs). Subclasses (e.g. timm's ``BatchNormAct2d``) keep their
    own forward and per-process statistics; the yielded dict names them."""
    swapped, kept = [], []
    for name, m in model.named_modules():
        cls = type(m)
        if cls in _GLOBAL_BN:
            swapped.append((m, cls))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            kept.append(name)
    for m, cls in swapped:
        m.__class__ = _GLOBAL_BN[cls]
        m._genaf_team = team
    try:
        yield {"global_layers": len(swapped), "per_process_layers": kept}
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("_genaf_team", None)


def average_batchnorm_buffers(model: nn.Module, team: Team) -> None:
    """Average every BatchNorm's running mean and variance across the processes (with per-process
    statistics, so that every process validates and saves the same model)."""
    if not team.distributed:
        return
    tensors = [
        t
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        for t in (m.running_mean, m.running_var)
    ]
    if not tensors:
        return
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    team.sum_(flat).div_(team.world)
    at = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()


# ---------------------------------------------------------------------- DDP for one stage
class _Dispatch(nn.Module):
    """What DDP wraps: ``forward(name, *args)`` calls ``model.name(*args)`` (``model(*args)`` for
    an empty name), so every entry point a method uses goes through DDP's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, name: str, *args, **kwargs):
        fn = getattr(self.model, name) if name else self.model
        return fn(*args, **kwargs)


class ModelView:
    """The model as a method's ``step`` sees it under DDP: calling it, ``features`` and
    ``forward_head`` run through ``DistributedDataParallel``; every other attribute is the
    model's own (``encoder``, ``head``, ``parameters()``, ...)."""

    def __init__(self, ddp, model: nn.Module) -> None:
        object.__setattr__(self, "_ddp", ddp)
        object.__setattr__(self, "_model", model)

    def __call__(self, *args, **kwargs):
        return self._ddp("", *args, **kwargs)

    def features(self, *args, **kwargs):
        return self._ddp("features", *args, **kwargs)

    def forward_head(self, *args, **kwargs):
        return self._ddp("forward_head", *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def module(self) -> nn.Module:
        return self._model


class DataParallelStep:
    """``model`` wrapped in DDP for the update steps of one stage: only ``params`` (the stage's
    optimiser groups) are all-reduced; buffers are never broadcast (``broadcast_buffers=False``:
    the several train-mode forwards of one step would otherwise each overwrite the BatchNorm
    buffers in place); every gradient bucket is counted and timed in ``team.stats['grad']``."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], team: Team) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.team = team
        ids = {id(p) for p in params}
        self.dispatch = _Dispatch(model)
        ignore = [f"model.{n}" for n, p in model.named_parameters() if id(p) not in ids]
        DDP._set_params_and_buffers_to_ignore_for_model(self.dispatch, ignore)
        import inspect

        # buffers are never synchronised in the forward (torch >= 2.14 names the switch
        # forward_sync_buffers; both keep the broadcast from rank 0 when DDP is built)
        names = inspect.signature(DDP).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
        self.ddp = DDP(self.dispatch, find_unused_parameters=False, **{sync: False})
        self.ddp.register_comm_hook(team, _counted_allreduce)
        self.view = ModelView(self.ddp, model)

    def close(self) -> None:
        remove = getattr(self.ddp, "_remove_autograd_hooks", None)
        if remove is not None:
            remove()
        self.ddp = None


def _counted_allreduce(team: Team, bucket):
    """DDP's default all-reduce (the bucket divided by the world size, summed), counted and timed
    from the bucket's hand-over to its completion."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    buf.div_(team.world)
    fut = _dist().all_reduce(buf, async_op=True).get_future()

    def done(f):
        team.stats["grad"]["seconds"] += time.perf_counter() - t0
        team.stats["grad"]["calls"] += 1
        return f.value()[0]

    return fut.then(done)


__all__ = [
    "BACKENDS",
    "BATCHNORM_MODES",
    "DataParallelStep",
    "ModelView",
    "SOLO",
    "Team",
    "average_batchnorm_buffers",
    "check_global_batch",
    "check_train_split",
    "global_batchnorm",
    "init_team",
    "launched",
]
