"""``genaf bench --ray``: the experiment matrix as Ray tasks on a local Ray instance gives the rows
of an unsharded run; the options that do not go with it are refused in one line."""

from __future__ import annotations

import builtins
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genaf.bench import run_bench
from genaf.cli import main
from genaf.errors import ConfigError
from test_bench import FASHION, N_ROWS, TINY, _csv_rows, _env, _no_seconds

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_RAY = importlib.util.find_spec("ray") is not None


# the tiny bench of tests/test_bench.py with one seed (half its time): 2 units (sft, genaf), each
# with DAE, white-box, fresh-head and self-attack cells; 2 universal perturbations (uniform-noise,
# l4a-base) and the per-sample ssp images shared by both units
TINY1 = {**TINY, "seeds": [0]}


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'genaf[ray]', part of the dev extra)")
def test_ray_bench_gives_the_unsharded_rows(tmp_path):
    """The tiny bench once in this process and once with `genaf bench --ray` on a local Ray instance
    of 2 CPUs: the same results.csv rows (apart from the *_seconds columns); each shared input made
    once, by the crafting wave. Then one unit's rows are lost: the next `--ray` run runs that unit
    alone, reusing its fine-tune and the perturbations, and gives the same rows again."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY1, sort_keys=False))
    ref = tmp_path / "unsharded"
    run_bench(cfg, ref, log=lambda *_: None)
    a = _no_seconds(_csv_rows(ref / "results.csv"))
    assert len(a) == N_ROWS // 2

    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "genaf", "bench", str(cfg), "--out", str(out), "--ray-cpus", "2", "--ray"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _no_seconds(_csv_rows(out / "results.csv")) == a
    ja = json.loads((ref / "results.json").read_text())["rows"]
    jb = json.loads((out / "results.json").read_text())["rows"]
    assert _no_seconds(ja) == _no_seconds(jb)
    assert (out / "report.md").is_file()
    assert "on Ray: 3 crafting task(s), then 2 unit task(s)" in r.stdout
    # each perturbation (the 2 universal ones and the 2 self-attacks) crafted once
    crafted = [ln for ln in r.stdout.splitlines() if "bench: crafting " in ln and "->" in ln]
    assert len(crafted) == len(set(crafted)) == len(list((out / "perturbations").rglob("*.safetensors"))) == 4
    assert len(list((out / "per-sample").rglob("*.safetensors"))) == 2  # {test, val}
    assert sorted(f.name for f in (out / "shards").iterdir()) == ["0-of-2.json", "1-of-2.json"]

    # resume: the rows of unit 0 (sft) are lost; its fine-tune and the perturbations are on disk
    (out / "results.json").unlink()
    (out / "shards" / "0-of-2.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 to do" in again.stdout and "on Ray: 0 crafting task(s), then 1 unit task(s)" in again.stdout
    assert "fine-tuning" not in again.stdout and "bench: crafting" not in again.stdout
    assert _no_seconds(_csv_rows(out / "results.csv")) == a


def test_ray_and_shard_are_refused_together(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY, sort_keys=False))
    assert main(["bench", str(cfg), "--out", str(tmp_path / "o"), "--ray", "--shard", "0/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ray and --shard do not go together" in err
    assert main(["bench", str(cfg), "--out", str(tmp_path / "o"), "--ray-cpus-per-task", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    if HAVE_RAY:  # checked before Ray starts
        assert main(["bench", str(cfg), "--out", str(tmp_path / "o"), "--ray-cpus", "2", "--ray=auto"]) == 2
        assert "drop --ray-cpus" in capsys.readouterr().err
        assert main(["bench", str(cfg), "--out", str(tmp_path / "o"), "--ray-cpus-per-task", "0", "--ray"]) == 2
        assert "--ray-cpus-per-task must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'genaf\[ray\]'") as exc:
        run_bench(TINY, Path(tmp_path / "o"), log=lambda *_: None, ray=True)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()  # refused before anything is written
