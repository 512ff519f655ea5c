"""Every config path (finetune --config, bench files, --set values, a run's config.yaml): alias
bombs, recursive aliases, deep nesting and binary files are refused; unknown keys at any depth
are an error with a suggestion; wrong types are named. One line, exit 2."""

import os
import subprocess
import sys

import pytest

from _reliability import recorder, section
from genaf.config import safe_yaml
from genaf.errors import ConfigError

_record = recorder("configs.json", section(4))

BOMB = "\n".join(
    [
        "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
        *(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")),
        "methods: {sft: {}}",
        "attacks: {uniform-noise: {}}",
    ]
)


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genaf", *map(str, args)], capture_output=True, text=True, env=env)


def _one_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_the_bomb_is_small_and_would_expand_enormously():
    assert len(BOMB) < 1024
    with pytest.raises(ConfigError, match="expands to more than"):
        safe_yaml(BOMB, "bomb")


@pytest.mark.parametrize(
    "text, needle",
    [
        (BOMB, "expands to more than"),
        ("a: &a [*a]\n", "recursive alias"),
        ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nests deeper"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "binary file"),
        (b"\xff\xfe\xfd not utf8", "not UTF-8"),
    ],
)
def test_hostile_yaml_in_a_bench_file_and_a_finetune_config(tmp_path, text, needle):
    f = tmp_path / "cfg.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert needle in _one_line(_cli("bench", f, "--out", tmp_path / "out"))
    assert needle in _one_line(_cli("finetune", "--config", f, "--out", tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("eval: {whitebox: {stpes: 50}}\n", "unknown key 'stpes' in config file.eval.whitebox (did you mean 'steps'?)"),
        ("data: {n_trian: 5}\n", "did you mean 'n_train'"),
        ("train: {batch_sise: 3}\n", "unknown key 'batch_sise' in train (did you mean 'batch_size'?)"),
        ("train: {batch_size: abc}\n", "train.batch_size must be a number, got 'abc'"),
        ("train: {channels_last: 3}\n", "train.channels_last must be true or false"),
        ("train: {batch_size: 2.5}\n", "must be a whole number"),
    ],
)
def test_unknown_keys_at_any_depth_and_wrong_types(tmp_path, text, needle):
    f = tmp_path / "run.yaml"
    f.write_text("encoder: random:demo\n" + text)
    assert needle in _one_line(_cli("finetune", "--config", f, "--out", tmp_path / "run"))


def test_set_values_are_bounded_too(tmp_path):
    r = _cli("finetune", "--encoder", "random:demo", "--set", "lam=&a [*a]", "--out", tmp_path / "r")
    assert "recursive alias" in _one_line(r)


def test_a_hostile_config_yaml_in_a_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(BOMB)
    assert "expands to more than" in _one_line(_cli("evaluate", "--model", run))
