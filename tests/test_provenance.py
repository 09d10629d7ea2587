"""experiments.provenance: what collect() records, without git too, and differences()."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from experiments import provenance

REPO = Path(__file__).resolve().parents[1]


def test_collect_records_code_versions_devices_and_start_time():
    record = provenance.collect(devices=2)
    assert json.loads(json.dumps(record)) == record  # plain JSON
    assert set(record) == {"git", "versions", "devices", "start_time"}
    assert set(record["versions"]) == {
        "python",
        "jax",
        "jaxlib",
        "optax",
        "flax",
        "numpy",
        "optlab",
    }
    assert record["versions"]["jax"] == jax.__version__
    assert record["devices"] == {
        "platform": jax.devices()[0].platform,
        "kind": jax.devices()[0].device_kind,
        "count": jax.device_count(),
        "used": 2,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["start_time"])
    assert provenance.collect()["devices"]["used"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_commit_is_the_checkout_of_the_experiments_package():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    state = provenance.git_state()
    assert state["commit"] == head.stdout.strip()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert state["dirty"] == bool(status.stdout.strip())
    assert (state["diff_sha1"] is not None) == state["dirty"]


def test_no_git_or_no_checkout_gives_none_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert provenance.collect()["git"] == {"commit": None, "dirty": None, "diff_sha1": None}
    monkeypatch.undo()
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "not-a-repo"))  # git fails
    assert provenance.git_state() == {"commit": None, "dirty": None, "diff_sha1": None}


def test_differences_are_human_lines_that_ignore_times():
    old = provenance.collect(devices=1)
    assert provenance.differences(old, provenance.collect(devices=1)) == []
    new = json.loads(json.dumps(old))
    new["start_time"] = "2100-01-01T00:00:00Z"
    new["wall_time_s"] = 12.0
    assert provenance.differences(old, new) == []
    new["git"] = {"commit": "abc", "dirty": True, "diff_sha1": "123"}
    new["versions"]["jax"] = "9.9.9"
    new["devices"]["used"] = 4
    new["extra"] = {"field": 1}
    lines = provenance.differences(old, new)
    assert f"jax version: {old['versions']['jax']} -> 9.9.9" in lines
    assert "devices used: 1 -> 4" in lines
    assert "extra.field: (not recorded) -> 1" in lines
    assert any(line.startswith("git commit: ") and line.endswith(" -> abc") for line in lines)
    assert any(line.startswith("uncommitted changes (sha1") for line in lines)
    assert not any("time" in line for line in lines)
