"""Training curves beside ``history.json`` (``train: {logger: csv|tensorboard}``, ``--logger``).

- ``csv``: ``RUN/history.csv``, one row per epoch with the fields of ``history.json`` (columns in
  the order they first appear; a nested value as JSON, a missing one empty). Each row is appended
  and flushed to disk as its epoch ends, so a crashed run keeps the rows of its finished epochs.
  When a later stage brings a new field, or the run resumes, the file is rewritten (atomically)
  from the whole history.
- ``tensorboard``: scalars ``STAGE/FIELD`` at step = the epoch's index over all stages, in
  ``RUN/tensorboard/`` (needs the tensorboard package).

``history.json`` is written as before; the logger only adds files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from .errors import ConfigError
from .utils import atomic_write

LOGGERS = ("none", "csv", "tensorboard")
CSV_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"

__all__ = ["LOGGERS", "check_logger", "curve_logger", "read_history_csv"]


def check_logger(name: str) -> None:
    """A known logger whose package is installed, or a one-line ConfigError."""
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger '{name}'; choose one of: {', '.join(LOGGERS)}")
    if name == "tensorboard":
        _summary_writer()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "logger 'tensorboard' needs the tensorboard package, which is not installed: pip install tensorboard "
            "(or use --logger csv)"
        ) from exc
    return SummaryWriter


def curve_logger(name: str, run_dir: str | os.PathLike):
    """A callable ``log(history)`` that records ``history[-1]`` (the epoch just finished)."""
    check_logger(name)
    if name == "csv":
        return CsvCurves(Path(run_dir) / CSV_NAME)
    if name == "tensorboard":
        return TensorBoardCurves(Path(run_dir) / TENSORBOARD_DIR)
    return lambda history: None


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return json.dumps(value, sort_keys=True, default=str)
    return repr(value) if isinstance(value, float) else str(value)


class CsvCurves:
    """Appends each epoch's row to a CSV file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None  # the header of the file this object wrote
        self.rows = 0

    def __call__(self, history: list[dict]) -> None:
        if not history:
            return
        row = history[-1]
        if self.fields is None or self.rows != len(history) - 1 or any(k not in self.fields for k in row):
            self._rewrite(history)
            return
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_cell(row.get(k)) for k in self.fields])
            fh.flush()
            os.fsync(fh.fileno())
        self.rows += 1

    def _rewrite(self, history: list[dict]) -> None:
        fields: list[str] = []
        for row in history:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(fields)
        for row in history:
            writer.writerow([_cell(row.get(k)) for k in fields])
        text = buf.getvalue()
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, newline=""))
        self.fields, self.rows = fields, len(history)


class TensorBoardCurves:
    """Writes each epoch's numeric fields as TensorBoard scalars (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer = None

    def __call__(self, history: list[dict]) -> None:
        if not history:
            return
        if self.writer is None:  # the folder appears with the first epoch, not before
            self.writer = _summary_writer()(log_dir=str(self.folder))
        row = history[-1]
        stage = str(row.get("stage", "train"))
        for key, value in row.items():
            if key in ("stage", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                self.writer.add_scalar(f"{stage}/{key}", float(value), len(history))
        self.writer.flush()

    def __del__(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``history.csv``: numbers as numbers, JSON cells decoded, empty cells dropped."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rec = {}
            for k, v in row.items():
                if v == "":
                    continue
                try:
                    rec[k] = int(v) if v.lstrip("-").isdigit() else float(v)
                except ValueError:
                    try:
                        rec[k] = json.loads(v)
                    except ValueError:
                        rec[k] = v
            out.append(rec)
    return out
