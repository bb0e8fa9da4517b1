"""The metrics.csv logger: resumed history, and cells safe to open in a spreadsheet."""

import csv

from pand.engine.csv_log import CsvMetricsLogger


def test_metrics_keep_negative_numbers_across_a_resume_and_escape_formula_text(tmp_path):
    log = CsvMetricsLogger(tmp_path)
    log.log_metrics({"train/loss": -0.25, "train/note": "=1+1"}, step=0)
    log.log_metrics({"train/loss": -1.5e-05}, step=1)
    log.save()
    resumed = CsvMetricsLogger(tmp_path, resume_step=2)  # rows come back as text
    resumed.log_metrics({"train/loss": -3.0}, step=2)
    resumed.save()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open(newline="")))
    assert [r["train/loss"] for r in rows] == ["-0.25", "-1.5e-05", "-3.0"]
    assert rows[0]["train/note"] == "'=1+1"
