"""Every code block of README.md and docs/*.md runs here, with the output the doc shows checked.

Which blocks:
- ```python blocks, and shell blocks (```bash, or an unlabelled block) whose lines are commands:
  `genaf ...`, `VAR=1 genaf ...`, `python ...`, `pip ...`, `pytest`, ... A `$ ` line in a block is
  a terminal transcript: the command runs and the lines after it are its expected output.
- A block that is not run says so on the line before it, where readers see it:
  `<!-- not run in tests: REASON -->`. An unmarked block that this module cannot run fails
  (test_every_block_is_run_or_marked), so a new block cannot slip through.
- docs/CLI.md is left out: it is generated from the parser and its blocks are usage synopses
  (`genaf demo [-h] ...`), not commands; tests/test_cli_help.py keeps it equal to the parser.

How they run: the blocks of one doc run in document order in one temporary folder (a later block
uses what an earlier one wrote), in this process (`genaf.cli.main`, `exec`), one thread.

Small sizes, made here and nowhere in the library (what each command computes is what its flags say):
- `genaf finetune / attack / pretrain` get size flags appended (the last value of a flag wins), and
  `genaf assess` gets `--quick`:
  `SMALL_FLAGS` below, plus `--set stage2_epochs=1` for methods with a stage 2 and
  `--set iterations=4` for attacks with iterations.
- `genaf bench CONFIG` runs a copy of CONFIG cut to its first encoder, dataset, method, attack, ε
  and seed, with the sizes below (`small_bench`).
- Python blocks: the integer literal given to a size keyword (`n_train=`, `"n_val":`, `epochs=`,
  `iterations=`, ...) and `.surrogate(N)` are replaced by the small values (`small_python`).
A ```text block right after a Python block is its printed output; when the line before it says
"something like", numbers are checked by shape only (they depend on the run), the rest exactly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

EXCLUDED = {
    "docs/CLI.md": "generated from the parser; its blocks are usage synopses (`genaf demo [-h] ...`), not commands",
}
DOCS = [p for p in ["README.md", *sorted(f"docs/{f.name}" for f in (ROOT / "docs").glob("*.md"))] if p not in EXCLUDED]

MARK = re.compile(r"^<!--\s*not run in tests:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# The first word of a line that makes it a command (after VAR=value assignments).
COMMAND_WORDS = {
    "genaf",
    "python",
    "python3",
    "pip",
    "pip3",
    "pytest",
    "ruff",
    "bash",
    "torchrun",
    "sbatch",
    "srun",
    "apt-get",
    "OMP_NUM_THREADS=1",
}

# Size flags appended to a command (argparse keeps the last value of a flag).
SMALL_FLAGS = {
    "finetune": ["--n-train", "64", "--n-val", "16", "--n-test", "16", "--epochs", "1"],
    "attack": ["--n-surrogate", "32"],
    "pretrain": ["--n-images", "64", "--epochs", "1", "--n-test", "64", "--batch-size", "32"],
    "assess": ["--quick"],
}
SMALL_ITERATIONS = 4
# Python blocks: size keywords and their small values.
SMALL_PYTHON = {
    "n_train": 64,
    "n_val": 16,
    "n_test": 16,
    "epochs": 1,
    "stage2_epochs": 1,
    "iterations": SMALL_ITERATIONS,
    "n_images": 64,
}
SMALL_SURROGATE = 32
# bench configs: sizes of the one dataset, the surrogate count, and epoch-like method options.
SMALL_BENCH_DATA = {"n_train": 64, "n_val": 16, "n_test": 16}
SMALL_BENCH_EPOCHS = ("epochs", "stage2_epochs", "rift_epochs", "probe_epochs")

pytestmark = pytest.mark.usefixtures("one_thread")


class NotRunnable(Exception):
    """A command this module does not know how to run (the block must be marked)."""


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    text: str
    before: str  # the last non-blank line before the fence
    skip: str | None = None
    kind: str | None = None  # python, shell, transcript; None: not code (output, usage, tables)
    output: Block | None = None  # a ```text block showing what this block prints
    fuzzy: bool = False  # the output's numbers are checked by shape

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def is_command_line(line: str) -> bool:
    words = line.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words or words[0] not in COMMAND_WORDS:
        return False
    if words[0] == "genaf":  # `genaf bench: error: ...` is output, not a command
        from genaf.cli import COMMANDS

        return len(words) == 1 or words[1] in COMMANDS or words[1].startswith("-")
    return True


def parse(doc: str, text: str | None = None) -> list[Block]:
    lines = ((ROOT / doc).read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        blocks.append(Block(doc, i + 1, j + 1, lang, "\n".join(body) + "\n", before))
        i = j + 1
    for k, b in enumerate(blocks):
        mark = MARK.match(b.before)
        b.skip = mark.group(1) if mark else None
        body = b.text.splitlines()
        if b.lang == "python":
            b.kind = "python"
        elif any(ln.startswith("$ ") for ln in body):
            b.kind = "transcript"
        elif b.lang in SHELL_LANGS or (b.lang in ("", "text") and any(is_command_line(ln) for ln in body)):
            b.kind = "shell"
        if b.kind == "python" and k + 1 < len(blocks) and blocks[k + 1].lang == "text":
            nxt = blocks[k + 1]
            between = [ln.strip() for ln in lines[b.end : nxt.line - 1] if ln.strip()]
            if len(between) <= 1:  # at most one line of prose ("It prints something like:")
                b.output, b.fuzzy = nxt, bool(between) and "something like" in between[0]
    return blocks


def shell_commands(block: Block) -> list[tuple[int, list[str], dict, str | None, list[str] | None]]:
    """(line, argv, env, heredoc body, expected output lines for a transcript) per command."""
    lines = block.text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        if block.kind == "transcript" and not line.startswith("$ "):
            i += 1
            continue
        if line.startswith("$ "):
            line = line[2:]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        i += 1
        heredoc = None
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            tag, body = m.group(1), []
            while i < len(lines) and lines[i].strip() != tag:
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body) + "\n"
            line = line[: m.start()]
        words = shlex.split(line, comments=True)
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        expected = None
        if block.kind == "transcript":
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i])
                i += 1
        out.append((block.line + 1 + start, words, env, heredoc, expected))
    return out


def runnable(argv: list[str], heredoc: str | None) -> None:
    """Raise NotRunnable unless this module knows how to run ``argv``."""
    if argv[0] in ("python", "python3") and argv[1:] == ["-"] and heredoc is not None:
        return
    if argv[0] != "genaf" or len(argv) < 2:
        raise NotRunnable(f"`{shlex.join(argv)}`: only genaf commands and `python - <<EOF` scripts run here")
    if argv[1] == "demo":
        raise NotRunnable("genaf demo has no small setting (its --quick form takes minutes)")
    if "cuda" in argv and not torch.cuda.is_available():
        raise NotRunnable(f"`{shlex.join(argv)}` needs a GPU")


def _flag(argv: list[str], name: str) -> str | None:
    value = None
    for k, a in enumerate(argv[:-1]):
        if a == name:
            value = argv[k + 1]
    return value


def _attack_preset(name: str, preset: str) -> dict:
    from genaf.attacks import attack_names
    from genaf.attacks.base import _ATTACKS

    attack_names()  # registers every attack
    return dict(getattr(_ATTACKS[name], "presets", {}).get(preset, {}))


def small_bench(src: Path, dst: Path) -> None:
    """A copy of bench config ``src`` cut to its first encoder, dataset, method, attack, ε and seed
    (tiny splits, one epoch, few crafting iterations): the same command path, seconds of CPU."""
    from genaf.methods.base import create_method

    cfg = yaml.safe_load(src.read_text())

    def first(x):
        return dict([next(iter(x.items()))]) if isinstance(x, dict) else list(x)[:1]

    cfg["encoders"] = first(cfg["encoders"])
    data = cfg["datasets"][0]
    cfg["datasets"] = [dict(data if isinstance(data, dict) else {"name": data}, **SMALL_BENCH_DATA)]
    cfg["surrogate"] = dict(cfg.get("surrogate") or {}, n=SMALL_SURROGATE)
    name, opts = next(iter(cfg["methods"].items()))
    opts = dict(opts or {})
    options = create_method(opts.get("method", name)).cfg
    cfg["methods"] = {name: {k: (1 if k in SMALL_BENCH_EPOCHS else v) for k, v in opts.items()}}
    shared = cfg.get("method_defaults") or {}
    cfg["method_defaults"] = {k: (1 if k in SMALL_BENCH_EPOCHS else v) for k, v in shared.items() if k in options}
    attack, aopts = next(iter(cfg["attacks"].items()))
    aopts = dict(aopts or {})
    if "iterations" in _attack_preset(attack, cfg.get("attack_preset", "cpu")):
        aopts["iterations"] = SMALL_ITERATIONS
    cfg["attacks"] = {attack: aopts}
    cfg["eps"], cfg["seeds"] = first(cfg["eps"]), first(cfg["seeds"])
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))


def small_argv(argv: list[str], cwd: Path) -> list[str]:
    """``argv`` (after `genaf`) with the size flags of its command appended."""
    cmd, argv = argv[0], list(argv)
    extra = list(SMALL_FLAGS.get(cmd, []))
    if cmd == "finetune":
        from genaf.methods.base import create_method

        if "stage2_epochs" in create_method(_flag(argv, "--method") or "genaf").cfg:
            extra += ["--set", "stage2_epochs=1"]
    elif cmd == "attack":
        if "iterations" in _attack_preset(_flag(argv, "--attack"), _flag(argv, "--preset") or "cpu"):
            extra += ["--set", f"iterations={SMALL_ITERATIONS}"]
    elif cmd == "bench":
        config = next(a for a in argv[1:] if a.endswith((".yaml", ".yml")))
        src = cwd / config if (cwd / config).is_file() else ROOT / config
        dst = cwd / ("small-" + Path(config).name)
        small_bench(src, dst)
        argv[argv.index(config)] = str(dst)
    return argv + extra


def small_python(src: str) -> str:
    for key, value in SMALL_PYTHON.items():
        src = re.sub(rf"""(\b|["']){key}(["']?\s*[:=]\s*)\d+\b""", rf"\g<1>{key}\g<2>{value}", src)
    return re.sub(r"\.surrogate\(\d+\)", f".surrogate({SMALL_SURROGATE})", src)


def same_output(expected: str, actual: str, fuzzy: bool) -> bool:
    exp = [ln.rstrip() for ln in expected.strip("\n").splitlines()]
    act = [ln.rstrip() for ln in actual.strip("\n").splitlines()]
    if not fuzzy:
        return exp == act
    if len(exp) != len(act):
        return False
    for e, a in zip(exp, act):
        parts = re.split(r"(\d+(?:\.\d+)?)", e)
        pattern = "".join(re.escape(p) if k % 2 == 0 else r"\d+(?:\.\d+)?" for k, p in enumerate(parts))
        if not re.fullmatch(pattern, a):
            return False
    return True


def run_python(src: str, block: Block, where: str) -> str:
    code = compile("\n" * block.line + src, where, "exec")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {"__name__": "__main__"})
    return buf.getvalue()


def run_genaf(argv: list[str]) -> tuple[int, str]:
    from genaf.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    return rc, buf.getvalue()


# ------------------------------------------------------------------------------------------------


def test_every_block_is_run_or_marked():
    """Each code block is run by test_doc_blocks_run, or marked with its reason; nothing in between."""
    problems, marked = [], []
    for doc in DOCS:
        text = (ROOT / doc).read_text().splitlines()
        blocks = parse(doc)
        fenced = {b.line - 1 for b in blocks}
        for n, ln in enumerate(text):  # a marker must sit right before a block and give a reason
            m = MARK.match(ln.strip())
            if m:
                nxt = next((k for k in range(n + 1, len(text)) if text[k].strip()), None)
                if nxt not in fenced:
                    problems.append(f"{doc}:{n + 1}: the not-run marker is not right before a code block")
                if len(m.group(1).split()) < 3:
                    problems.append(f"{doc}:{n + 1}: the not-run marker needs a reason readers can follow")
        for b in blocks:
            if b.skip is not None:
                if b.kind is None:
                    problems.append(f"{b.where}: marked not run, but it is no code block")
                marked.append(f"{b.where} ({b.skip})")
                continue
            if b.kind in ("shell", "transcript"):
                cmds = shell_commands(b)
                if not cmds:
                    problems.append(f"{b.where}: a shell block without a command")
                for line, argv, _env, heredoc, _exp in cmds:
                    try:
                        runnable(argv, heredoc)
                    except NotRunnable as exc:
                        problems.append(
                            f"{b.doc}:{line}: {exc}; make it run here, or mark its block with "
                            "<!-- not run in tests: REASON --> on the line before"
                        )
    assert not problems, "\n".join(problems)
    # the not-run list stays short: GPU, network, SLURM, the hour-long runs, the suite itself
    assert len(marked) <= 8, "\n".join(marked)


SAMPLE = """\
<!-- not run in tests: needs a GPU for this -->
```bash
genaf finetune --device cuda --out runs/x
```

```bash
pip install genaf
```

```
genaf bench: error: encoder mine: file a differs
```

```python
print("clean", 0.5)
```

It prints something like:

```text
clean 0.25
```
"""


def test_the_harness_itself():
    """What counts as a block, a marker, an output; what runs; how outputs and sizes are handled."""
    gpu, pip, out, py, text = parse("sample.md", SAMPLE)
    assert (gpu.skip, gpu.kind) == ("needs a GPU for this", "shell")
    assert (pip.skip, pip.kind) == (None, "shell")
    assert out.kind is None  # output that names a command is not a command
    assert py.kind == "python" and py.output is text and py.fuzzy and text.kind is None
    with pytest.raises(NotRunnable, match="only genaf commands"):
        runnable(shell_commands(pip)[0][1], None)
    with pytest.raises(NotRunnable, match="small setting"):
        runnable(["genaf", "demo", "--out", "x"], None)
    # continuation lines, comments, quoting, VAR=value prefixes, heredocs, transcripts
    cmds = shell_commands(
        parse(
            "s.md",
            "```bash\nOMP_NUM_THREADS=1 genaf inspect 'a?b=c' \\\n  --json  # note\n"
            "python - <<'EOF'\nprint(1)\nEOF\n```\n",
        )[0]
    )
    assert [(c[1], c[2], c[3]) for c in cmds] == [
        (["genaf", "inspect", "a?b=c", "--json"], {"OMP_NUM_THREADS": "1"}, None),
        (["python", "-"], {}, "print(1)\n"),
    ]
    (tr,) = parse("t.md", "```\n$ genaf encoders --json\nline one\n$ genaf inspect demo\n```\n")
    assert [(c[1][1], c[4]) for c in shell_commands(tr)] == [("encoders", ["line one"]), ("inspect", [])]
    # outputs: exact, or numbers by shape
    assert same_output("clean 58.2%, ssp 56.2%\n", "clean 9.4%, ssp 12%\n", fuzzy=True)
    assert not same_output("clean 58.2%\n", "robust 9.4%\n", fuzzy=True)
    assert not same_output("clean 58.2%\n", "clean 58.2%\nmore\n", fuzzy=True)
    assert not same_output("clean 58.2%\n", "clean 58.3%\n", fuzzy=False)
    # sizes: keywords and dict keys with an integer literal, .surrogate(N); nothing else
    src = 'd = {"n_train": 500, "n_val": 200}\nf(epochs=3, iterations=100)\nx.surrogate(500)[:100]\n'
    assert small_python(src) == 'd = {"n_train": 64, "n_val": 16}\nf(epochs=1, iterations=4)\nx.surrogate(32)[:100]\n'
    argv = small_argv(["finetune", "--method", "sft", "--n-train", "256", "--out", "r"], ROOT)
    assert argv[:7] == ["finetune", "--method", "sft", "--n-train", "256", "--out", "r"]
    assert argv[7:] == SMALL_FLAGS["finetune"]  # sft has no stage 2
    assert small_argv(["attack", "--attack", "ssp-universal"], ROOT)[-2:] == ["--set", "iterations=4"]
    assert small_argv(["inspect", "demo"], ROOT) == ["inspect", "demo"]
    assert small_argv(["assess", "demo", "fashion-mnist"], ROOT) == ["assess", "demo", "fashion-mnist", "--quick"]


def test_cli_md_holds_usage_lines_only():
    """docs/CLI.md is excluded because its blocks are usage synopses: check that premise."""
    for b in parse("docs/CLI.md"):
        assert re.fullmatch(r"genaf [a-z]+ \[-h\].*\n", b.text), f"{b.where}: not a usage synopsis: {b.text!r}"


def _runnable_docs():
    return [d for d in DOCS if any(b.kind and b.skip is None for b in parse(d))]


@pytest.mark.parametrize("doc", _runnable_docs())
def test_doc_blocks_run(doc, tmp_path, monkeypatch):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    blocks = [b for b in parse(doc) if b.kind and b.skip is None]
    for b in blocks:  # the optional libraries a block imports (both in the dev extra)
        for mod in ("timm", "transformers"):
            if re.search(rf"^\s*import\b.*\b{mod}\b", b.text, re.M) and importlib.util.find_spec(mod) is None:
                pytest.skip(f"{b.where} needs {mod} (pip install -e '.[dev]')")
    monkeypatch.chdir(tmp_path)
    timings = []
    for b in blocks:
        t0 = time.process_time()
        if b.kind == "python":
            printed = run_python(small_python(b.text), b, str(ROOT / doc))
            if b.output is not None:
                assert same_output(b.output.text, printed, b.fuzzy), (
                    f"{b.where} printed\n{printed}\nbut {b.output.where} shows\n{b.output.text}"
                    + (" (numbers checked by shape)" if b.fuzzy else "")
                )
        else:
            for line, argv, env, heredoc, expected in shell_commands(b):
                where = f"{doc}:{line}"
                runnable(argv, heredoc)
                for k, v in env.items():
                    monkeypatch.setenv(k, v)
                if heredoc is not None:
                    run_python(heredoc, Block(doc, line, line, "python", heredoc, ""), str(ROOT / doc))
                    continue
                rc, out = run_genaf(small_argv(argv[1:], tmp_path))
                if expected is not None:  # a transcript: the output shown, and an error's exit code 2
                    assert same_output("\n".join(expected), out, fuzzy=False), (
                        f"{where}: `{shlex.join(argv)}` printed\n{out}\nbut the doc shows\n" + "\n".join(expected)
                    )
                    assert rc == (2 if any(": error:" in e for e in expected) else 0), f"{where}: exit code {rc}"
                else:
                    assert rc == 0, f"{where}: `{shlex.join(argv)}` exited {rc}:\n{out[-3000:]}"
        timings.append(f"{b.where} {time.process_time() - t0:.1f} s CPU")
    print("\n".join(timings))
