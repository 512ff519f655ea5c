"""Start a function in several processes on the CPU (gloo) the way torchrun starts genaf: each with
MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK in its environment (tests/test_distributed.py).

The functions run in fresh interpreters (spawn), so they live here, importable by name."""

from __future__ import annotations

import json
import os
import signal
import socket

import torch

DATA = {"n_train": 64, "n_val": 48, "n_test": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    fn(rank, *args)


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, *args)`` in ``world`` processes; raises when one of them fails or is killed."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def data():
    from genaf.data import load_dataset

    return load_dataset("fashion-mnist", seed=0, **DATA)


def finetune(rank: int, out: str, kwargs: dict, kill_at=None, probe: str | None = None) -> None:
    """``genaf.api.finetune(**kwargs)`` on this process's share. ``kill_at = (stage, epoch)``: rank 0
    kills itself with SIGKILL right after writing that checkpoint. ``probe``: a JSON file per rank
    recording, around every training attack, the gradient all-reduces DDP made and whether any
    parameter gradient changed, and at the end a digest of the model's state on this process."""
    from genaf import api
    from genaf.train import Trainer

    if kill_at is not None:
        save = Trainer._save

        def _save(self, stage_index, epoch, *a):
            save(self, stage_index, epoch, *a)
            if (stage_index, epoch) == tuple(kill_at) and self.team.is_main:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer._save = _save
    record: dict = {"attacks": []}
    if probe is not None:
        from genaf.methods.genaf import Stage1

        attack = Stage1.attack

        def watched(self, model, x, y, ctx, *a, **k):
            team = ctx.parallel
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            before = team.stats["grad"]["calls"]
            out = attack(self, model, x, y, ctx, *a, **k)
            same = all(
                (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))
                for g, p in zip(grads, model.parameters())
            )
            record["attacks"].append({"allreduces": team.stats["grad"]["calls"] - before, "grads_unchanged": same})
            return out

        Stage1.attack = watched
        fit = Trainer.fit

        def fit_and_digest(self, *a, **k):
            out = fit(self, *a, **k)
            record["state"] = [float(v.double().sum()) for v in self.model.state_dict().values()]
            record["grad_allreduces"] = self.team.stats["grad"]["calls"]
            return out

        Trainer.fit = fit_and_digest
    api.finetune(out=out, datamodule=data(), log=lambda *a: None, **kwargs)
    if probe is not None:
        with open(f"{probe}.{rank}.json", "w") as fh:
            json.dump(record, fh)


def sensitivity(rank: int, out: str | None = None) -> dict:
    """The robust sensitivity dictionary of a fixed model on a fixed probe (``out``: written by
    rank 0 as JSON); the same call in one process or several."""
    from genaf.distributed import SOLO, init_team
    from genaf.encoders import load_encoder
    from genaf.methods.sensitivity import robust_sensitivity
    from genaf.models import DownstreamModel

    team, _ = init_team(torch.device("cpu")) if os.environ.get("WORLD_SIZE") else (SOLO, None)
    try:
        torch.manual_seed(0)
        model = DownstreamModel(load_encoder("demo"), 10, "linear").eval()
        val = data().val
        x, y = val.float_images()[:40], val.labels[:40]
        x = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
        scores = robust_sensitivity(model, x, y, eta=0.1, steps=3, ascent_fraction=0.5, batch_size=16, parallel=team)
    finally:
        team.close()
    if out is not None and rank == 0:
        with open(out, "w") as fh:
            json.dump(scores, fh)
    return scores


def batchnorm(rank: int, out: str | None = None) -> dict:
    """A BatchNorm2d in train mode on this process's half of a fixed batch, with genaf's global
    statistics (``genaf.distributed.global_batchnorm``) and, in a team of one, the plain layer on
    the whole batch: the output rows, the gradients of the input rows, of γ and β (summed over the
    processes, as DDP's average of the per-process mean losses times the processes) and the running
    statistics after two forwards before one backward."""
    from genaf.distributed import SOLO, global_batchnorm, init_team

    team, _ = init_team(torch.device("cpu")) if os.environ.get("WORLD_SIZE") else (SOLO, None)
    try:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(8, 3, 5, 5, generator=gen) * 4 + 2).requires_grad_(True)
        w = torch.randn(8, 3, 5, 5, generator=gen)
        bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-1, 1, generator=gen)
        lo, hi = team.rows(len(x))
        with global_batchnorm(bn, team):
            first = bn(x[lo:hi])
            second = bn(x[lo:hi] * 0.5)
        loss = (first * w[lo:hi]).sum() + (second * w[lo:hi]).sum()
        loss.backward()
        gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
        gx = x.grad[lo:hi]
        if team.distributed:
            gw, gb = team.sum_(gw), team.sum_(gb)
            first, second, gx = (team.gather_rows(t.detach()) for t in (first, second, gx))
        res = {
            "first": first.detach().flatten().tolist(),
            "second": second.detach().flatten().tolist(),
            "grad_x": gx.flatten().tolist(),
            "grad_weight": gw.tolist(),
            "grad_bias": gb.tolist(),
            "running_mean": bn.running_mean.tolist(),
            "running_var": bn.running_var.tolist(),
            "batches": int(bn.num_batches_tracked),
            "class_after": type(bn).__name__,
        }
    finally:
        team.close()
    if out is not None and rank == 0:
        with open(out, "w") as fh:
            json.dump(res, fh)
    return res


CRAFT_IMAGES = 64  # surrogate images


def craft(rank: int, out: str, specs: dict, via_cli: tuple = ()) -> dict:
    """Every attack of ``specs`` (``{name: options}``) crafted on the demo encoder from the first
    surrogate images of Fashion-MNIST, the perturbation written to ``out/NAME.safetensors``: through
    ``genaf attack`` for the names in ``via_cli`` (the file read back by rank 0), else through
    ``genaf.craft``. Each call starts and ends its own process group under torchrun's variables.
    Writes ``out/rank{rank}.json``: ``{name: {"delta": δ flattened, "config": ..., "history": the
    objective after every step}}`` of what this process holds."""
    from genaf import api, cli
    from genaf.attacks import Perturbation

    made = []
    create = api.create_attack

    def keep(*a, **k):  # the attack objects genaf.craft makes, for their objective histories
        made.append(create(*a, **k))
        return made[-1]

    api.create_attack = keep
    try:
        sur = data().surrogate(CRAFT_IMAGES)
        got = {}
        for name, opts in specs.items():
            path = f"{out}/{name}.safetensors"
            if name in via_cli:
                argv = ["attack", "--encoder", "demo", "--attack", name, "--n-surrogate", str(CRAFT_IMAGES), "--eps"]
                argv += ["0.05", "--out", path, "--device", "cpu", "--quiet", "--n-train", "64", "--n-val", "48"]
                for k, v in opts.items():
                    argv += ["--set", f"{k}={v}"]
                assert cli.main(argv) == 0
                assert not torch.distributed.is_initialized()  # the command ended the group it started
                if rank != 0:
                    continue
                pert = Perturbation.load(path)
            else:
                pert = api.craft("demo", name, sur, eps=0.05, device="cpu", out=path, **opts)
                assert not torch.distributed.is_initialized()
            history = [float(v) for v in getattr(made[-1], "history", [])]
            got[name] = {"delta": pert.delta.flatten().tolist(), "config": pert.config, "history": history}
    finally:
        api.create_attack = create
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(got, fh)
    return got


def distributed_references(package: str) -> dict[str, list[str]]:
    """``{file name: names}`` of every import of, or attribute access on, ``torch.distributed`` in
    the ``.py`` files of ``genaf/<package>`` (empty lists when a file has none)."""
    import ast
    from pathlib import Path

    import genaf

    found = {}
    for f in (Path(genaf.__file__).parent / package).glob("*.py"):
        hits = []
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            hits += [n for n in names if n.startswith("torch.distributed")]
        found[f.name] = hits
    return found
