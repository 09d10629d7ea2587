"""Metrics as JSON lines: a torn last line is dropped; truncation keeps other runs."""

import json

from experiments.train.metrics import MetricsWriter, read_metrics


def test_torn_last_metrics_line_is_dropped(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl", method="x", seed=0)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0})
    with (tmp_path / "m.jsonl").open("a") as f:
        f.write('{"method": "x", "seed": 0, "st')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    writer.truncate_after(2)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_truncate_after_keeps_other_runs(tmp_path):
    a = MetricsWriter(tmp_path / "m.jsonl", method="a", seed=0)
    b = MetricsWriter(tmp_path / "m.jsonl", method="b", seed=0)
    for step in (1, 2, 3):
        a.write({"step": step})
        b.write({"step": step})
    a.truncate_after(1)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl", method="a")] == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl", method="b")] == [1, 2, 3]
