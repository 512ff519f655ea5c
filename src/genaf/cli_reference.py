"""The CLI reference page (docs/CLI.md), generated from the ``genaf`` argument parser.

``python -m genaf.cli_reference`` rewrites docs/CLI.md; ``python -m genaf.cli_reference --check``
exits 1 when the page differs from what the parser says (tests/test_cli_help.py runs the same
comparison). The page is built from the parser's own objects, never from hand-written text, so
every subcommand and flag that exists is documented with its help text and default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path("docs") / "CLI.md"

HEADER = """# genaf command-line reference

Generated from the argument parser by `python -m genaf.cli_reference` (do not edit by hand; a
test fails when this page is out of date). `genaf COMMAND --help` prints the same text.

Bad input ends with a one-line error and exit code 2; `--debug` shows the traceback. Progress
goes to the terminal as a bar, or as one plain line per unit of work when the output is a log
file or a pipe; `--quiet` turns both off.
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (one-line help, parser) for every subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), p) for name, p in action.choices.items()}
    return {}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The documented arguments of a (sub)parser: everything but -h/--help and --version."""
    return [
        a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
    ]


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as ``--help`` shows it (``%(default)s`` and friends filled in), on one line."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    text = parser._get_formatter()._expand_help(action)
    return " ".join(text.split())


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    if action.nargs in ("*", "+"):
        metavar = f"[{metavar} ...]"
    elif action.nargs == "?":
        metavar = f"[{metavar}]"
    return f"`{names} {metavar}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference page as Markdown."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    cmds = subcommands(parser)
    out = [HEADER, "## Commands\n", "| command | what it does |", "|---|---|"]
    out += [f"| [`genaf {n}`](#genaf-{n}) | {_cell(h)} |" for n, (h, _) in cmds.items()]
    out.append("")
    for name, (summary, sub) in cmds.items():
        out.append(f"## genaf {name}\n")
        out.append(_cell(sub.description or summary) + "\n")
        usage = " ".join(sub.format_usage().split())
        out.append(f"```\n{usage.removeprefix('usage: ')}\n```\n")
        out += ["| argument | meaning and default |", "|---|---|"]
        for a in options(sub):
            req = " (required)" if a.required and a.option_strings and "required" not in (a.help or "") else ""
            out.append(f"| {_flag(a)} | {_cell(expanded_help(sub, a))}{req} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genaf.cli_reference", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DOC), help="where to write the page (default %(default)s)")
    ap.add_argument("--check", action="store_true", help="exit 1 when the page is out of date, writing nothing")
    a = ap.parse_args(argv)
    text = render()
    path = Path(a.out)
    if a.check:
        current = path.read_text() if path.is_file() else ""
        if current != text:
            print(f"{path} is out of date: run python -m genaf.cli_reference", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    from .utils import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
