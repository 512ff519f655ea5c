"""The CLI's help is complete and its reference page current.

Every test walks the parser, so a subcommand or flag added later is covered without editing
this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genaf import cli_reference
from genaf.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = list(cli_reference.subcommands(build_parser()))


def test_every_subcommand_is_listed():
    assert {"finetune", "attack", "evaluate", "demo", "inspect"} <= set(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_flag_has_help_with_its_default(cmd, capsys):
    parser = cli_reference.subcommands(build_parser())[cmd][1]
    missing, no_default = [], []
    for action in cli_reference.options(parser):
        text = cli_reference.expanded_help(parser, action)
        name = "/".join(action.option_strings) or action.dest
        if not text.strip():
            missing.append(name)
        elif action.option_strings and not re.search(r"\bdefault\b|\brequired\b", text):
            no_default.append(name)
    assert not missing, f"genaf {cmd}: flags without help text: {missing}"
    assert not no_default, f"genaf {cmd}: flags whose help does not state the default: {no_default}"
    # what --help prints: exit 0 and every flag shown with its text
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # no whitespace: argparse wraps lines (also at hyphens)
    for action in cli_reference.options(parser):
        for flag in action.option_strings:
            assert flag in out
        first_words = "".join(cli_reference.expanded_help(parser, action).split()[:4])
        assert first_words in out, f"genaf {cmd} --help lacks the help of {action.option_strings or action.dest}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_takes_quiet_and_debug(cmd):
    parser = cli_reference.subcommands(build_parser())[cmd][1]
    flags = {f for a in parser._actions for f in a.option_strings}
    assert {"--quiet", "--debug"} <= flags, f"genaf {cmd} lacks --quiet or --debug"


def test_help_lists_the_registries(capsys):
    from genaf.attacks.base import attack_names
    from genaf.data import DATASETS
    from genaf.encoders import SCHEMES
    from genaf.methods.base import method_names

    def helptext(*argv):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(re.sub(r"-\n\s*", "-", capsys.readouterr().out).split())

    finetune = helptext("finetune")
    for m in method_names():
        assert m in finetune
    for d in DATASETS:
        assert d in finetune
    for s in SCHEMES:
        assert f"{s}:" in finetune or s in finetune
    attack = helptext("attack")
    evaluate = helptext("evaluate")
    for a in attack_names():
        assert a in attack or a in evaluate, f"attack {a} is listed by neither genaf attack nor genaf evaluate --help"


def test_plain_genaf_prints_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "required" not in err
    for cmd in COMMANDS:
        assert cmd in err
    assert "genaf COMMAND --help" in err


@pytest.mark.parametrize(
    "spec,hint",
    [("weights.pth", "torchvision:ARCH:weights.pth"), ("byol.ckpt", "solo:byol.ckpt"), ("e.safetensors", "file:e.")],
)
def test_bare_weight_path_as_encoder_hints_at_a_scheme(spec, hint, capsys):
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bare path" in err and hint in err and "solo:" in err and "file:" in err


def test_cli_reference_is_current():
    """docs/CLI.md is what `python -m genaf.cli_reference` writes from the parser today."""
    page = ROOT / "docs" / "CLI.md"
    want = cli_reference.render()
    assert page.is_file(), "docs/CLI.md is missing: run python -m genaf.cli_reference"
    assert page.read_text() == want, "docs/CLI.md is out of date: run python -m genaf.cli_reference"
    for cmd in COMMANDS:
        assert f"## genaf {cmd}" in want


def test_cli_reference_check_mode(tmp_path, capsys):
    stale = tmp_path / "CLI.md"
    stale.write_text("old\n")
    assert cli_reference.main(["--check", "--out", str(stale)]) == 1
    assert cli_reference.main(["--out", str(stale)]) == 0
    assert cli_reference.main(["--check", "--out", str(stale)]) == 0


def test_readme_names_every_subcommand_and_quick():
    readme = (ROOT / "README.md").read_text()
    for cmd in COMMANDS:
        assert f"genaf {cmd}" in readme, f"README.md never shows genaf {cmd}"
    assert "--quick" in readme
    assert "docs/CLI.md" in readme
