"""A CSV metrics logger that keeps the history of a resumed run.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a run folder is reused, so resuming an interrupted run
would lose the metrics of its first part. This one reads the old rows back, drops those logged after the step the run
resumes from (they belong to the lost tail of the interrupted run), and rewrites the file atomically at each save.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from pand.io import atomic_write_text
from pand.spreadsheet import spreadsheet_cell


class CsvMetricsLogger(Logger):
    def __init__(self, save_dir: str | Path, resume_step: int | None = None) -> None:
        super().__init__()
        self.path = Path(save_dir) / "metrics.csv"
        self._rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                self._rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) < resume_step]

    @property
    def name(self) -> str:
        return "pand"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is written to config.yaml by the run

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        keys = sorted({k for r in self._rows for k in r} - {"step", "epoch"})
        fields = ["step", "epoch", *keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: spreadsheet_cell(v) for k, v in r.items()} for r in self._rows)
        atomic_write_text(self.path, buf.getvalue())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
