"""Training metrics: ``metrics.jsonl``, the loss-curve PNG and the terminal progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON Lines file of training (``loss``) and evaluation (``eval_loss``) rows.

    It holds one run's curve: a run that starts from step 0 first moves an older file to
    ``metrics.jsonl.1`` (:meth:`rotate`, replacing an older ``.1``), and a resumed run drops the rows
    after its checkpoint's step (:meth:`truncate_after`) before it redoes those steps.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")

    def rotate(self) -> Path | None:
        """Move a non-empty file to ``<name>.1`` (replacing an older one); returns where it went (None: nothing)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        previous = self.path.with_name(self.path.name + ".1")
        self.path.replace(previous)
        return previous

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> int:
        """Drop rows of steps after ``step`` (work a resumed run will redo); returns how many were dropped."""
        rows = self.rows()
        keep = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(keep) != len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        return len(rows) - len(keep)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (a missing file has none; a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write; the rest of the file is intact
    return rows


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path | None:
    """Training loss (and evaluation loss / perplexity, when present) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    # None: a step (or an evaluation) without a trained token, which has no loss
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (test split)", linewidth=1.5)
        last_step, last = evals[-1]
        ax.annotate(f"ppl {math.exp(last):.2f}", (last_step, last), textcoords="offset points", xytext=(-40, 10))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


class Progress:
    """A Rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
