"""docs/RELIABILITY.md from fragments: every row is a case some test really ran.

A fragment is ``docs/reliability/<name>.json``: a JSON list of ``{"section", "input", "outcome",
"message"}``. ``outcome`` is "refused cleanly" (one line, exit 2 or the error the API promises),
another word for a case handled as intended ("accepted", "decoded", "resumed exactly", ...) or
"failed". Test modules write their fragment (directly, or with :func:`recorder`, which records
each test's real outcome); ``tests/test_reliability_table.py`` assembles the document from every
fragment present with :func:`assemble`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = ROOT / "docs" / "reliability"
DOC = ROOT / "docs" / "RELIABILITY.md"

REFUSED, FAILED = "refused cleanly", "failed"
BAD_INPUT = "Bad input"
# the failure classes of issue 18 (fragments name them 'N. ...'): number -> (title, where tested)
CLASSES = {
    1: ("Memory: small files that claim a lot", "tests/test_memory_limits.py, tests/data/test_image_decoding.py"),
    2: ("Perturbation budgets", "tests/attacks/test_perturbation_budget.py, tests/test_reliability_table.py"),
    3: ("Image decoding", "tests/data/test_image_decoding.py, tests/test_reliability_table.py"),
    4: ("Configs", "tests/test_configs.py"),
    5: ("Interrupted runs", "tests/test_kill_resume.py"),
    6: ("Resume with other options", "tests/test_faults.py"),
    7: ("Names that collide", "tests/test_faults.py, tests/test_honesty.py"),
    8: ("Ordinary faults", "tests/test_faults.py, tests/test_full_disk.py"),
    9: ("Placeholders for checkpoint parts genaf never uses", "tests/test_memory_limits.py"),
}


def section(n: int) -> str:
    return f"{n}. {CLASSES[n][0]}"


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_fragment(name: str, rows: list[dict], merge: bool = False) -> Path:
    """Write ``docs/reliability/<name>`` (rows keyed by section and input). ``merge`` keeps the rows
    of cases that this run did not reach (a run of part of a module), replacing those it did."""
    for r in rows:
        missing = {"section", "input", "outcome", "message"} - set(r)
        assert not missing, f"fragment row lacks {missing}: {r}"
    path = FRAGMENTS / name
    if merge and path.is_file():

        def key(r: dict) -> tuple:
            return _class_of(r["section"]) or r["section"], r["input"]

        new = {key(r) for r in rows}
        old = [r for r in json.loads(path.read_text()) if key(r) not in new]
        rows = old + rows
    _write_json(path, rows)
    return path


def one_line(text: str, tmp: str | Path | None = None) -> str:
    text = " ".join(str(text).split())
    if tmp:
        text = text.replace(str(tmp), "$TMP")
    text = re.sub(r"/tmp/pytest-of-[^/ ]+/pytest-\d+/[^/ ]+", "$TMP", text)
    return text[:400]


def recorder(fragment: str, section_of: str | Callable[[str], str], outcome: str = REFUSED):
    """An autouse fixture (assign it to a module attribute) that records every test of the module
    that runs, with its real outcome, into ``docs/reliability/<fragment>``; ``section_of`` maps a
    test's name to its section (None: not recorded). A test may request it
    as ``reliability`` and set ``["message"]``, ``["input"]`` or ``["outcome"]`` (for a case
    handled in another way than a refusal). Skipped tests are not recorded."""
    rows: dict[tuple[str, str], dict] = {}

    @pytest.fixture(autouse=True, name="reliability")
    def _record(request):
        name = request.node.name
        func = request.node.function
        doc = (func.__doc__ or "").strip().split("\n\n")[0]
        what = " ".join(doc.split()) or func.__name__.removeprefix("test_").replace("_", " ")
        param = getattr(request.node, "callspec", None)
        if param is not None:
            what = f"{what} [{param.id}]"
        sec = section_of(name) if callable(section_of) else section_of
        row = {"section": sec, "input": what, "outcome": outcome, "message": ""}
        yield row
        if sec is None:
            return  # a test of the module that belongs to no class
        reports = getattr(request.node, "genaf_reports", {})
        if any(r.skipped for r in reports.values()):
            return  # did not run: not counted
        if any(r.failed for r in reports.values()):
            row["outcome"] = FAILED
            rep = reports.get("call") or next(r for r in reports.values() if r.failed)
            row["message"] = one_line(str(rep.longrepr).strip().splitlines()[-1] if rep.longrepr else "")
        elif "call" not in reports:
            return
        # the test asserted the outcome; without a message of its own, name the test that did
        row["message"] = one_line(row["message"]) or f"asserted by `{request.node.nodeid}`"
        rows[(row["section"], row["input"])] = row
        write_fragment(fragment, list(rows.values()), merge=True)

    return _record


def _load_fragments() -> tuple[list[dict], list[str]]:
    rows, names = [], []
    for path in sorted(FRAGMENTS.glob("*.json")):
        data = json.loads(path.read_text())
        assert isinstance(data, list), f"{path} is not a JSON list"
        for r in data:
            rows.append(dict(r, fragment=path.name))
        names.append(path.name)
    return rows, names


def _class_of(sec: str) -> int | None:
    m = re.match(r"\s*(\d+)[.)]?\s", sec + " ")
    return int(m.group(1)) if m and int(m.group(1)) in CLASSES else None


def _counts(rows: list[dict]) -> tuple[int, int, int, int]:
    refused = sum(r["outcome"] == REFUSED for r in rows)
    failed = sum(r["outcome"] == FAILED for r in rows)
    return len(rows), refused, len(rows) - refused - failed, failed


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def assemble(prose: dict[str, str] | None = None) -> str:
    """Write docs/RELIABILITY.md from every fragment present; return its text."""
    prose = prose or {}
    rows, names = _load_fragments()
    by_class: dict[int | str, list[dict]] = {}
    for r in rows:
        key = _class_of(r["section"])
        by_class.setdefault(key if key is not None else r["section"], []).append(r)
    tried, refused, handled, failed = _counts(rows)
    out = [
        "# Reliability: hostile and broken inputs, interrupted runs, honest evaluations",
        "",
        "<!-- generated by tests/test_reliability_table.py from docs/reliability/*.json; do not edit by hand -->",
        "",
        f"**{tried} inputs tried: {refused} refused cleanly, {handled} handled as intended "
        f"(accepted, decoded or resumed exactly), {failed} failed.**",
        "",
        "Every row below is a case a test ran: each test module writes its fragment "
        f"({', '.join(f'`{n}`' for n in names) or 'none yet'}) in `docs/reliability/` when it runs, and "
        "`pytest tests/test_reliability_table.py` assembles this file from the fragments present. "
        "*Refused cleanly*: one line naming the problem and the fix, exit code 2 on the command line "
        "(`--debug` shows the traceback), the promised error type in the API. A class without a "
        "fragment lists where it is tested, with no count.",
        "",
        "| class | tried | refused cleanly | handled as intended | failed |",
        "|---|---|---|---|---|",
    ]
    others = sorted(k for k in by_class if isinstance(k, str) and k != BAD_INPUT)
    keys: list[int | str] = [*CLASSES, BAD_INPUT, *others]
    for k in keys:
        title = section(k) if isinstance(k, int) else k
        if k in by_class:
            t, r, h, f = _counts(by_class[k])
            out.append(f"| {title} | {t} | {r} | {h} | {f} |")
        else:
            out.append(f"| {title} | not recorded (see its section) | | | |")
    for k in keys:
        title = section(k) if isinstance(k, int) else k
        out += ["", f"## {title}", ""]
        if isinstance(k, int):
            out.append(f"Tested in {', '.join(f'`{p.strip()}`' for p in CLASSES[k][1].split(','))}.")
            out.append("")
        if title in prose:
            out += [prose[title], ""]
        case_rows = by_class.get(k, [])
        if not case_rows:
            out.append("No fragment recorded for this class yet: run the test files above to record its cases.")
            continue
        t, r, h, f = _counts(case_rows)
        out += [
            f"{t} tried: {r} refused cleanly, {h} handled as intended, {f} failed.",
            "",
            "| input | outcome | message |",
            "|---|---|---|",
        ]
        for row in case_rows:
            outcome = row["outcome"] if row["outcome"] != FAILED else "**failed**"
            message = row["message"] or "asserted by the test files named above"
            out.append(f"| {_cell(row['input'])} | {outcome} | {_cell(message)} |")
    for title, text in prose.items():
        if not any(title == (section(k) if isinstance(k, int) else k) for k in keys):
            out += ["", f"## {title}", "", text]
    text = "\n".join(out) + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(f".{DOC.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    return text
