"""The Trainer: the loop, optimisers, schedulers, AMP, channels_last, checkpoints and resume.

The Trainer never knows which method it runs: it asks each stage for its parameter groups
(one optimiser each), lets the stage set train/eval modes after ``model.train()``, and calls
``stage.step`` for a dict of named losses. Every random draw is seeded from
(seed, stage, epoch), so a run resumed from a checkpoint replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.whitebox import pgd
from .augment import crop_flip
from .distributed import BACKENDS, BATCHNORM_MODES, SOLO, Team
from .errors import CheckpointError, ConfigError, first_line
from .methods.base import Context, Method, ParamGroup, Stage
from .utils import atomic_write, counting_paused, generator, row_generator, torch_save_atomic, unit_seed

CHECKPOINT = "checkpoint.pt"
# the training state at the end of the last stage's last epoch (TrainConfig.keep_last_epoch)
LAST_EPOCH = "last-epoch.pt"
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def fits_on_device(need_bytes: int, free_bytes: int, fraction: float = 0.25) -> bool:
    """Whether a dataset of ``need_bytes`` may live on a device with ``free_bytes`` free."""
    return need_bytes <= fraction * free_bytes


def place_data(data, device: torch.device, mode: str = "auto", log=print):
    """The DataModule with its train and validation images moved to ``device`` once (uint8, so a
    CIFAR-10 train split at 64×64 is 0.6 GB): batches are then gathered, converted and augmented
    on the device and the host never feeds the loop. A no-op on the CPU or with ``mode='off'``."""
    if device.type == "cpu" or mode == "off" or data is None:
        return data
    need = sum(s.images.numel() + 16 * len(s) for s in (data.train, data.val))
    if mode == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if not fits_on_device(need, free):
            log(f"data: {need / 2**30:.2f} GiB of images stay on the host ({free / 2**30:.1f} GiB free on {device})")
            return data
    return dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device))


def compile_model(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``: state_dict keys stay unchanged).

    The attack runs the model in eval mode and the update in train mode; dynamo guards on the
    mode and keeps one graph per mode in its cache, so flipping between them does not recompile
    (``tests/test_compile.py`` counts the compilations).
    """
    if mode == "none":
        return model
    kwargs: dict = {"backend": backend}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode
    model.compile(**kwargs)
    return model


@dataclass
class TrainConfig:
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # "none" | "bf16"
    channels_last: bool = False
    # torch.compile of the downstream model: "none" | "default" | "reduce-overhead" | "max-autotune"
    # (inductor modes); compile_backend picks another dynamo backend ("aot_eager", "eager", ...).
    compile: str = "none"
    compile_backend: str = "inductor"
    # Keep the train/val images (uint8) on the accelerator, augmented there: "auto" (when they
    # take at most a quarter of its free memory), "on", "off". Nothing to do on the CPU.
    data_on_device: str = "auto"
    augment: bool = True
    # keep checkpoint.pt once the run has finished and its model and metrics are written
    # (it holds the full training state: the stage-1 snapshot, the reference encoder, ...)
    keep_checkpoint: bool = False
    # also keep the training state at the end of the last stage's last epoch, before the best
    # epoch is restored (last-epoch.pt): a run of the same options with more epochs in that stage
    # continues from it (finetune(continue_from=...)) and computes what it would from scratch
    keep_last_epoch: bool = False
    # deterministic kernels (genaf.utils.deterministic_mode): CUDA runs of one seed then repeat
    # exactly, at some cost in speed; the ops that have no deterministic kernel are recorded
    deterministic: bool = False
    # the training attacks (eval mode) run on a copy of the model with every BatchNorm folded
    # into the convolution before it (genaf.fold; exact up to float rounding, redone from the
    # trained module before every attack); false attacks the trained module itself. Not used
    # under compile (the compiled module is attacked), nor for validation.
    fold_bn: bool = True
    # under torchrun (genaf.distributed): the process-group backend ("auto": nccl on GPUs, gloo on
    # CPUs), and the statistics BatchNorm normalises with in train mode: "global" (those of the
    # global batch, summed across the processes: the single-process computation) or "rank"
    # (each process's own; the running statistics are averaged at the end of every epoch)
    dist_backend: str = "auto"
    ddp_batchnorm: str = "global"
    n_val_robust: int = 512  # validation images attacked each epoch for model selection
    val_eps: float = 8 / 255
    val_step: float = 2 / 255
    val_steps: int = 10
    progress: bool = True
    logger: str = "none"  # training curves beside history.json: "none" | "csv" | "tensorboard" (genaf.curves)

    def validate(self) -> None:
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"amp must be 'none' or 'bf16', got '{self.amp}'")
        if self.data_on_device not in ("auto", "on", "off"):
            raise ConfigError(f"data_on_device must be auto, on or off, got '{self.data_on_device}'")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got '{self.compile}'")
        from .curves import check_logger

        check_logger(self.logger)
        if self.dist_backend not in BACKENDS:
            raise ConfigError(f"dist_backend must be one of {', '.join(BACKENDS)}, got '{self.dist_backend}'")
        if self.ddp_batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"ddp_batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got '{self.ddp_batchnorm}'")


def _make_optimizer(group: ParamGroup):
    if group.optimizer == "adam":
        opt = torch.optim.Adam(group.params, lr=group.lr, weight_decay=group.weight_decay)
    elif group.optimizer == "sgd":
        opt = torch.optim.SGD(group.params, lr=group.lr, momentum=group.momentum, weight_decay=group.weight_decay)
    else:
        raise ConfigError(f"unknown optimizer '{group.optimizer}' (use adam or sgd)")
    if group.milestones:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=group.milestones, gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=group.gamma)
    return opt, sched


class PassCounter:
    """Counts the images that pass through the encoder(s) during a fit, by phase (``train``:
    steps, attacks, stage setups; ``selection``: validation) and by kind (``forward`` without
    autograd, ``forward_backward`` with it: the training forwards and every attack step).

    The counts live in ``artifacts['passes']`` (checkpointed, so a resumed run keeps counting)
    and give each method's training budget in encoder passes per training image. They are not
    taken under ``torch.compile`` (a hook with side effects would break the graph)."""

    def __init__(self, artifacts: dict) -> None:
        self.counts = artifacts.setdefault(
            "passes",
            {ph: {"forward": 0, "forward_backward": 0} for ph in ("train", "selection")},
        )
        self.phase = "train"
        self.handles: list = []
        self.synced = copy.deepcopy(self.counts)  # the counts already summed over the processes

    def sync(self, team: Team) -> None:
        """Sum what every process counted since the last call (a data-parallel run shares the
        work out, so the totals are those of one process doing all of it)."""
        if not team.distributed:
            return
        new = {f"{ph}/{k}": v - self.synced[ph][k] for ph, kinds in self.counts.items() for k, v in kinds.items()}
        total = team.sum_values(new)
        for key, v in total.items():
            ph, k = key.split("/")
            self.counts[ph][k] = self.synced[ph][k] + int(round(v))
        self.synced = copy.deepcopy(self.counts)

    def attach(self, *modules: nn.Module) -> None:
        for m in modules:
            if m is not None:
                self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0] if inputs else None
        if torch.is_tensor(x) and not counting_paused():
            kind = "forward_backward" if torch.is_grad_enabled() else "forward"
            self.counts[self.phase][kind] += int(x.shape[0])

    @contextlib.contextmanager
    def selection(self):
        before, self.phase = self.phase, "selection"
        try:
            yield
        finally:
            self.phase = before

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Trainer:
    """Runs a method's stages on a model and data; writes checkpoints into ``run_dir``."""

    def __init__(
        self,
        model: nn.Module,
        data,
        method: Method,
        cfg: TrainConfig,
        run_dir: str | Path,
        device: torch.device,
        log=print,
        team: Team | None = None,
    ) -> None:
        cfg.validate()
        data = place_data(data, device, cfg.data_on_device, log)
        self.model, self.data, self.method, self.cfg = model, data, method, cfg
        # the processes of a torchrun run (genaf.distributed); SOLO: one process, no collective
        self.team = team or SOLO
        self.parallel_info: dict = {}
        self.run_dir, self.device, self.log = Path(run_dir), device, log
        self.stages: list[Stage] = method.stages()
        self.history: list[dict] = []
        self.artifacts: dict = {}
        self.counter: PassCounter | None = None
        self.fold = None
        self.attack_fold: dict = {"fold_bn": cfg.fold_bn, "folded_pairs": 0}
        from .curves import curve_logger

        # history.csv / tensorboard, one row per epoch; under torchrun only rank 0 writes
        self.curves = curve_logger(cfg.logger if self.team.is_main else "none", self.run_dir)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _accuracy(self, xs_iter) -> float:
        correct = n = 0
        for x, y, _ in xs_iter:
            with self._autocast():
                pred = self.model(self._prep(x)).argmax(1)
            correct += int((pred == y).sum())
            n += len(y)
        if self.team.distributed:  # each process counted its rows of every batch
            got = self.team.sum_values({"correct": correct, "n": n})
            correct, n = int(got["correct"]), int(got["n"])
        return correct / max(n, 1)

    def _part(self) -> tuple[int, int] | None:
        return (self.team.rank, self.team.world) if self.team.distributed else None

    def validate(self, model: nn.Module | None = None, robust: bool = True) -> dict:
        """Validation clean accuracy and (on a fixed subset) PGD robust accuracy."""
        model = model or self.model
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        counting = self.counter.selection() if self.counter is not None else contextlib.nullcontext()
        with counting:
            try:
                bs, part = self.cfg.eval_batch_size, self._part()
                out = {"val_clean": self._accuracy(self.data.val.batches(bs, device=self.device, part=part))}
                if robust and self.cfg.n_val_robust > 0:
                    # under torchrun each process attacks its rows of every batch, with the random
                    # starts a single process draws for them (team.generator), and the counts are summed
                    sub = self.data.val.subset(self.cfg.n_val_robust)
                    gen = self.team.generator(self.cfg.seed, "val:pgd")
                    correct = 0
                    for start, (x, y, _) in zip(range(0, len(sub), bs), sub.batches(bs, device=self.device, part=part)):
                        self.team.set_rows(gen, min(bs, len(sub) - start))
                        # the attack runs the BatchNorm-folded copy when there is one (the same
                        # function in eval mode, cheaper); the prediction is the model's own
                        atk = self.fold(model) if self.fold is not None else model
                        xa = pgd(atk, x, y, self.cfg.val_eps, self.cfg.val_step, self.cfg.val_steps, gen=gen)
                        with torch.no_grad():
                            correct += int((model(xa).argmax(1) == y).sum())
                    correct = int(self.team.sum_values({"c": correct})["c"])
                    out["val_robust"] = correct / len(sub)
            finally:
                for m, t in was:
                    m.train(t)
        return out

    @staticmethod
    def score(val: dict, select: str) -> float:
        if select == "clean":
            return val["val_clean"]
        if select == "robust":
            return val.get("val_robust", 0.0)
        if select == "clean+robust":
            return val["val_clean"] + val.get("val_robust", 0.0)
        return 0.0  # "last": every epoch ties, the latest wins

    # ------------------------------------------------------------------ helpers
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _ckpt_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def _save(self, stage_index: int, epoch: int, opts, scheds, best) -> None:
        """Every process calls it (the pass counts are summed); rank 0 writes the checkpoint.
        What it holds is the same on every process, whatever their number, so a run may resume
        on another number of processes."""
        if self.counter is not None:
            self.counter.sync(self.team)
        if not self.team.is_main:
            return
        state = {
            "format": "genaf-checkpoint",
            "version": 1,
            "stage_index": stage_index,
            "stage": self.stages[stage_index].name if stage_index < len(self.stages) else "done",
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds],
            "best": best,
            "artifacts": self.artifacts,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }
        torch_save_atomic(state, self._ckpt_path())

    def _load(self) -> dict:
        path = self._ckpt_path()
        team = self.team
        if not team.distributed:
            return self._load_file(path)

        def exists() -> None:
            if not path.is_file():
                raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume")

        # rank 0 reads the file and sends its bytes (the run folder need not be on a filesystem
        # every node sees); every process checks and loads the same bytes the same way
        team.on_main(exists)
        data = team.broadcast_bytes(path.read_bytes() if team.is_main else b"")
        if team.is_main:
            return self._load_file(path)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="genaf-resume-") as tmp:
            local = Path(tmp) / CHECKPOINT
            local.write_bytes(data)
            return self._load_file(local, shown=path)

    def _load_file(self, path: Path, shown: Path | None = None) -> dict:
        shown = shown or path
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume")
        from .encoders.safe_load import load_weights_only

        try:  # what the file would allocate is checked before torch.load runs
            state = load_weights_only(path, "checkpoint")
        except Exception as exc:
            raise CheckpointError(f"--resume: cannot read {shown} safely ({first_line(exc)})") from exc
        if not isinstance(state, dict) or state.get("format") != "genaf-checkpoint":
            raise CheckpointError(f"--resume: {shown} is not a genaf training checkpoint")
        return state

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict:
        """Run every stage; returns the artefacts (validation history, stage outputs)."""
        cfg = self.cfg
        if self.team.distributed:
            from .distributed import check_global_batch, check_train_split

            if cfg.compile != "none":
                raise ConfigError("compile is not supported under torchrun yet; run with compile none")
            check_global_batch(cfg.batch_size, self.team)
            check_train_split(len(self.data.train), cfg.batch_size, self.team)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        reference = copy.deepcopy(self.model.encoder).eval().requires_grad_(False)
        self._build_fold()
        compile_model(self.model, cfg.compile, cfg.compile_backend)  # after the copy: never deepcopy a compiled module
        ctx = Context(self.data, self.device, cfg.seed, reference, self.log, self.run_dir, self.artifacts)
        ctx.attack_fold = self.fold
        ctx.parallel = self.team
        start_stage, start_epoch, ckpt = 0, 0, None
        if resume:
            ckpt = self._load()
            self.model.load_state_dict(ckpt["model"])
            self.artifacts.update(ckpt["artifacts"])
            self.history = list(ckpt["history"])
            start_stage, start_epoch = int(ckpt["stage_index"]), int(ckpt["epoch"])
            if "reference_encoder" in self.artifacts:
                reference.load_state_dict(self.artifacts["reference_encoder"])
            self.log(f"resuming at stage {start_stage} ({ckpt['stage']}), epoch {start_epoch}")
        else:
            self.artifacts["reference_encoder"] = {
                k: v.detach().cpu().clone() for k, v in reference.state_dict().items()
            }
        ctx.artifacts = self.artifacts
        if cfg.compile == "none":
            self.counter = PassCounter(self.artifacts)
            self.counter.attach(self.model.encoder, reference)
            if self.fold is not None:  # the attack steps run the folded copy's encoder
                self.counter.attach(self.fold.copy.encoder)
        # Ctrl-C: nothing is written at the moment of the interrupt. The checkpoint on disk is the
        # one of the last *completed* epoch (written atomically at its end, with the scheduler
        # state, the best-epoch record and the artefacts of that moment), so `--resume` replays
        # exactly what an uninterrupted run does from there, as after `kill -9`. Saving the
        # partial epoch instead would store partly trained weights under the previous epoch.
        old_handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for si in range(start_stage, len(self.stages)):
                resumed_here = ckpt is not None and si == start_stage
                self._run_stage(si, ctx, start_epoch if resumed_here else 0, ckpt if resumed_here else None)
            self._save(len(self.stages), 0, [], [], None)
        except KeyboardInterrupt:
            self.log(f"interrupted: {self._kept()}; continue with --resume")
            raise
        finally:
            signal.signal(signal.SIGINT, old_handler)
            if self.counter is not None:
                self.counter.detach()
        return self.artifacts

    def _build_fold(self) -> None:
        """The BatchNorm-folded copy the training attacks run on (``TrainConfig.fold_bn``);
        ``self.attack_fold`` records what was folded, or why nothing was."""
        from .fold import AttackFold

        self.fold = None
        if not self.cfg.fold_bn:
            return
        if self.cfg.compile != "none":
            self.attack_fold["note"] = "off under compile: the attacks run the compiled module"
            return
        fold = AttackFold(self.model)
        self.attack_fold.update(fold.info())
        if fold.copy is not None:
            self.fold = fold

    def _kept(self) -> str:
        """What the checkpoint on disk holds (said when a run is interrupted)."""
        path = self._ckpt_path()
        if not path.is_file():
            return "no epoch had finished, so no checkpoint was written"
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            return f"{path} keeps the state after {state['epoch']} epoch(s) of {state['stage']}"
        except Exception:
            return f"{path} keeps the last completed epoch"

    def budget(self) -> dict:
        """The training budget this fit spent: epochs per stage (planned and run) and encoder
        passes per training image (``PassCounter``)."""
        run: dict[str, int] = {}
        for row in self.history:
            run[row["stage"]] = run.get(row["stage"], 0) + 1
        planned = {st.name: int(st.epochs) for st in self.stages}
        n = max(len(self.data.train), 1)
        out = {
            "epochs_planned": planned,
            "epochs_run": {k: run.get(k, 0) for k in planned},
            "total_epochs": sum(run.get(k, 0) for k in planned),
            "train_images": len(self.data.train),
        }
        passes = self.artifacts.get("passes")
        if passes and self.cfg.compile == "none":
            out["encoder_passes_per_train_image"] = {
                ph: {k: round(v / n, 2) for k, v in kinds.items()} for ph, kinds in passes.items()
            }
        else:
            out["encoder_passes_per_train_image"] = None  # not counted under torch.compile
        return out

    def _run_stage(self, si: int, ctx: Context, start_epoch: int, ckpt: dict | None) -> None:
        stage, cfg = self.stages[si], self.cfg
        key = f"stage{si}:{stage.name}"
        if stage.snapshot_start and "stage1_state" not in self.artifacts:
            self.artifacts["stage1_state"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.artifacts["stage1_val"] = self.validate()
        if key in self.artifacts.get("setup", {}):
            stage.restore(self.model, ctx, self.artifacts["setup"][key])
        else:
            torch.manual_seed(unit_seed(cfg.seed, f"{key}:setup"))
            self.artifacts.setdefault("setup", {})[key] = stage.setup(self.model, ctx)
        groups = stage.param_groups(self.model)
        built = [_make_optimizer(g) for g in groups]
        opts, scheds = [o for o, _ in built], [s for _, s in built]
        best = None
        if ckpt is not None:
            for o, s in zip(opts, ckpt["optimizers"]):
                o.load_state_dict(s)
            for sc, s in zip(scheds, ckpt["schedulers"]):
                sc.load_state_dict(s)
            best = ckpt["best"]
        trainable = {id(p) for g in groups for p in g.params}
        self._best = best
        self._stopped = False
        with self._data_parallel(stage, groups, ctx, start_epoch) as step_model:
            self._epochs(si, stage, ctx, step_model, opts, scheds, best, start_epoch, trainable)
        if cfg.keep_last_epoch and si == len(self.stages) - 1 and stage.epochs > 0 and not self._stopped:
            self._keep_last_epoch()
        self._after_epochs(si, stage, ctx)

    def _keep_last_epoch(self) -> None:
        """Copy the checkpoint of the last stage's last epoch (on disk now: written at the end of
        that epoch, before the best epoch is restored) to ``last-epoch.pt``, atomically."""
        if not self.team.is_main or not self._ckpt_path().is_file():
            return
        atomic_write(self.run_dir / LAST_EPOCH, lambda tmp: shutil.copyfile(self._ckpt_path(), tmp))

    @contextlib.contextmanager
    def _data_parallel(self, stage: Stage, groups: list[ParamGroup], ctx: Context, start_epoch: int):
        """The model a stage's ``step`` gets: the model itself, or under torchrun its DDP view
        (genaf.distributed.DataParallelStep) for this stage's optimiser groups, with BatchNorm on
        the global batch's statistics (``ddp_batchnorm: global``), and the attacks pointed at the
        unwrapped module (or its BatchNorm-folded copy): they never go through DDP."""
        team = self.team
        if not team.distributed or start_epoch >= stage.epochs:
            yield self.model
            return
        from .distributed import DataParallelStep, global_batchnorm

        params = [p for g in groups for p in g.params]
        par = DataParallelStep(self.model, params, team)
        before = ctx.attack_fold
        ctx.attack_fold = _Unwrapped(par.view, self.model, self.fold)
        bn = global_batchnorm(self.model, team) if self.cfg.ddp_batchnorm == "global" else contextlib.nullcontext({})
        try:
            with bn as info:
                self.parallel_info.setdefault("batchnorm", {"mode": self.cfg.ddp_batchnorm, **(info or {})})
                yield par.view
        finally:
            ctx.attack_fold = before
            par.close()

    def _epochs(self, si, stage, ctx, step_model, opts, scheds, best, start_epoch, trainable) -> None:
        cfg, team = self.cfg, self.team
        key = f"stage{si}:{stage.name}"
        part = self._part()
        rows = None
        if team.distributed:  # this process's rows of every (full) global batch
            lo, hi = team.rows(cfg.batch_size)
            rows = (lo, hi, cfg.batch_size)
        for epoch in range(start_epoch, stage.epochs):
            t0 = time.time()
            # streams shared by every process draw for the whole global batch (RowGenerator);
            # the global torch RNG (dropout) is each process's own stream of the same unit seed
            torch.manual_seed(unit_seed(cfg.seed, team.seed_key(f"{key}:epoch{epoch}:torch")))
            if hasattr(stage, "_gen"):
                stage._gen = _stream(cfg.seed, f"{key}:epoch{epoch}:attack", rows)
            stage.begin_epoch(epoch)
            shuffle = generator(cfg.seed, f"{key}:epoch{epoch}:shuffle")
            aug = _stream(cfg.seed, f"{key}:epoch{epoch}:augment", rows)
            self.model.train()
            stage.set_modes(self.model)
            sums: dict[str, float] = {}
            nb = 0
            n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
            bar = _progress(n_batches, f"{stage.name} {epoch + 1}/{stage.epochs}", cfg.progress and team.is_main)
            transform = functools.partial(crop_flip, gen=aug) if cfg.augment else None
            for x, y, _ in self.data.train.batches(
                cfg.batch_size,
                shuffle=True,
                gen=shuffle,
                device=self.device,
                drop_last=True,
                transform=transform,
                part=part,
            ):
                x = self._prep(x)
                with self._autocast():
                    losses = stage.step(step_model, x, y, ctx)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"{stage.name}: the loss became {float(loss)} at epoch {epoch + 1}; "
                        "lower the learning rate or the regulariser weight"
                    )
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                nb += 1
                bar.update(1)
            bar.close()
            for s in scheds:
                s.step()
            if team.distributed:  # the mean over the global batches; the same model everywhere
                sums = {k: v / team.world for k, v in team.sum_values(sums).items()}
                if cfg.ddp_batchnorm == "rank":
                    from .distributed import average_batchnorm_buffers

                    average_batchnorm_buffers(self.model, team)
            val = self.validate(robust=stage.needs_val_robust or stage.select in ("robust", "clean+robust"))
            hook = getattr(stage, "end_epoch", None)  # e.g. the fast-mode guard of adversarial stages
            val_attack = {"eps": cfg.val_eps, "step": cfg.val_step, "steps": cfg.val_steps, "n": cfg.n_val_robust}
            extra = hook(self.model, ctx, val, val_attack) if hook else {}
            if team.distributed:  # every process takes rank 0's decisions (the guard's included)
                extra, guard = team.broadcast_json([extra, ctx.artifacts.get("guard")])
                if guard is not None:
                    ctx.artifacts["guard"] = guard
            score = self.score(val, stage.select)
            row = {
                "stage": stage.name,
                "epoch": epoch + 1,
                "seconds": round(time.time() - t0, 2),
                **{k: v / max(nb, 1) for k, v in sums.items()},
                **val,
                **extra,
            }
            self.history.append(row)
            self.curves(self.history)
            self.log(_epoch_line(row, stage.epochs))
            if best is None or score >= best["score"]:
                best = {
                    "score": score,
                    "epoch": epoch + 1,
                    "val": val,
                    "state": {
                        k: v.detach().cpu().clone()
                        for k, v in self.model.state_dict().items()
                        if _is_trainable_key(self.model, k, trainable)
                    },
                }
            self._save(si, epoch + 1, opts, scheds, best)
            if extra.get("stop"):
                self._stopped = True
                break
        self._best = best

    def _after_epochs(self, si: int, stage: Stage, ctx: Context) -> None:
        key = f"stage{si}:{stage.name}"
        best = self._best
        if best is not None and stage.epochs > 0:
            self.model.load_state_dict(
                {**self.model.state_dict(), **{k: v.to(self.device) for k, v in best["state"].items()}}
            )
            self.log(f"{stage.name}: keeping epoch {best['epoch']} ({_selection_text(stage.select, best['val'])})")
            self.artifacts.setdefault("selected_epoch", {})[key] = best["epoch"]
        out = stage.finish(self.model, ctx, lambda m: self.validate(m))
        if out:
            self.artifacts.setdefault("finish", {})[key] = out
        self._save(si + 1, 0, [], [], None)


class _Unwrapped:
    """``ctx.attack_fold`` under DDP: a method attacks the model it was handed (the DDP view);
    this points the attack at the unwrapped module, or at its BatchNorm-folded copy, so attack
    steps never run DDP's forward, never all-reduce and never accumulate parameter gradients."""

    def __init__(self, view, model: nn.Module, fold) -> None:
        self.view, self.model, self.fold = view, model, fold

    def __call__(self, m):
        if m is self.view:
            m = self.model
        return self.fold(m) if self.fold is not None else m


def _stream(seed: int, key: str, rows: tuple[int, int, int] | None) -> torch.Generator:
    """The generator of unit ``key``: plain for one process; under torchrun one that draws for the
    whole global batch and keeps this process's ``rows`` (genaf.utils.RowGenerator)."""
    return generator(seed, key) if rows is None else row_generator(seed, key, rows)


def _is_trainable_key(model: nn.Module, key: str, trainable_ids: set[int]) -> bool:
    """Parameters of this stage's groups, and buffers (BatchNorm statistics) that train mode updates."""
    params = dict(model.named_parameters())
    if key in params:
        return id(params[key]) in trainable_ids
    return True


def _val_text(val: dict) -> str:
    parts = []
    if "val_clean" in val:
        parts.append(f"validation clean acc {100 * float(val['val_clean']):.1f} %")
    if "val_robust" in val:
        parts.append(f"PGD robust acc {100 * float(val['val_robust']):.1f} %")
    return ", ".join(parts)


def _epoch_line(row: dict, epochs: int) -> str:
    """One readable line per epoch: what each number is, accuracies in percent."""
    head = f"{row['stage']} epoch {row['epoch']}/{epochs} ({row['seconds']:.1f} s)"
    rest = {k: v for k, v in row.items() if k not in ("stage", "epoch", "seconds") and not k.startswith("val_")}
    losses = [f"{k} {v:.4g}" for k, v in rest.items() if isinstance(v, float)]
    other = [f"{k} {v}" for k, v in rest.items() if not isinstance(v, float)]
    vals = [_val_text(row)] if _val_text(row) else []
    extra = [f"{k} {100 * v:.1f} %" if isinstance(v, float) and 0 <= v <= 1 else f"{k} {v}"
             for k, v in row.items() if k.startswith("val_") and k not in ("val_clean", "val_robust")]
    return head + ": " + "; ".join(x for x in (", ".join(losses), ", ".join(vals + extra), ", ".join(other)) if x)


def _selection_text(select: str, val: dict) -> str:
    got = _val_text(val or {}) or "no validation numbers"
    if select == "last":
        return f"the last epoch, as the stage selects; {got}"
    what = {"clean": "clean accuracy", "robust": "PGD robust accuracy", "clean+robust": "clean + robust accuracy"}
    return f"best validation {what.get(select, select)}; {got}"


def _progress(total: int, desc: str, enabled: bool):
    """The batches of an epoch: a bar on a terminal only (the epoch's own log line is the plain
    progress line; see genaf.utils.Progress)."""
    from .utils import Progress

    return Progress(total, desc, unit="batches", log=None, enabled=enabled)


__all__ = ["Trainer", "TrainConfig", "asdict", "F"]
