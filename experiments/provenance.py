"""Provenance of a run: which code, library versions and devices produced a workdir.

:func:`collect` returns a JSON-serializable record::

    {
      "git": {"commit": "3f2c...", "dirty": True, "diff_sha1": "0be1..."},  # None: no git
      "versions": {"python": "3.11.9", "jax": "0.4.35", "jaxlib": ..., "optax": ...,
                   "flax": ..., "numpy": ..., "optlab": ...},   # None: not installed
      "devices": {"platform": "cpu", "kind": "cpu", "count": 8, "used": 1},
      "start_time": "2025-01-31T12:00:00Z",
    }

``git.commit`` is the commit checked out in the repository that holds the ``experiments``
package, ``git.dirty`` whether tracked files differ from it (untracked files, e.g. run
outputs, do not count) and ``git.diff_sha1`` a short hash of those changes (``git diff
HEAD``; None when clean), so that two different sets of uncommitted edits differ.
``devices.count`` is ``jax.device_count()``; ``devices.used`` the number of devices the run
uses (the ``devices`` argument). :func:`differences` lists, as human-readable lines, how two
records differ, ignoring times.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["collect", "differences"]

PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy", "optlab")

_LABELS = {
    "git.commit": "git commit",
    "git.dirty": "uncommitted changes",
    "git.diff_sha1": "uncommitted changes (sha1 of git diff HEAD)",
    "devices.platform": "device platform",
    "devices.kind": "device kind",
    "devices.count": "device count",
    "devices.used": "devices used",
}


def _git(*args: str) -> str | None:
    """Output of ``git args`` in the experiments package's directory, or None on any failure."""
    cwd = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit", "dirty", "diff_sha1"}`` of the code's git checkout (None: unknown)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha1": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status.strip())
    diff = _git("diff", "HEAD") if dirty else None
    return {
        "commit": commit.strip(),
        "dirty": dirty,
        "diff_sha1": None if diff is None else hashlib.sha1(diff.encode()).hexdigest()[:12],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}


def device_info(devices: int | None = None) -> dict[str, Any]:
    import jax

    visible = jax.devices()
    return {
        "platform": visible[0].platform,
        "kind": visible[0].device_kind,
        "count": len(visible),
        "used": devices,
    }


def collect(devices: int | None = None) -> dict[str, Any]:
    """The provenance record of a run starting now that uses ``devices`` devices."""
    return {
        "git": git_state(),
        "versions": versions(),
        "devices": device_info(devices),
        "start_time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _is_time(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf.endswith(("time", "time_s", "times"))


def _show(value: Any) -> str:
    return "(not recorded)" if value is None else str(value)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """How provenance ``new`` differs from ``old``: one line per field, times ignored.

    E.g. ``["git commit: 3f2c... -> 9a1b...", "jax version: 0.4.30 -> 0.4.35"]``; empty when
    the same code, versions and devices are used.
    """
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if _is_time(key) or a.get(key) == b.get(key):
            continue
        if key.startswith("versions."):
            label = f"{key.removeprefix('versions.')} version"
        else:
            label = _LABELS.get(key, key)
        lines.append(f"{label}: {_show(a.get(key))} -> {_show(b.get(key))}")
    return lines
