"""Measure this checkout against an earlier git revision in one run (benchmarks' ``--compare``).

Each measurement runs a benchmark script with ``--json`` in a fresh interpreter that
imports asyncfx from this checkout or from the revision, checked out in a temporary git
worktree; ``alternating`` alternates between the two so that the machine's drift affects
both alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checked_out(revision: str) -> Iterator[pathlib.Path]:
    """A temporary worktree of ``revision``, removed afterwards.

    Example:
        >>> with checked_out("HEAD~1") as other:
        ...     (other / "asyncfx").is_dir()
        True
    """
    with tempfile.TemporaryDirectory() as folder:
        other = pathlib.Path(folder) / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), revision],
                       check=True, capture_output=True)
        try:
            yield other
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)],
                           capture_output=True)


def measure_in(source: pathlib.Path, script: pathlib.Path, arguments: Sequence[str]) -> dict[str, Any]:
    """The JSON that ``script --json arguments`` prints last, run with asyncfx imported from
    ``source`` (checked: the result names the asyncfx package it imported, ``"asyncfx"``)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [sys.executable, str(script), "--json", *arguments]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.splitlines()[-1])
    if pathlib.Path(result["asyncfx"]).resolve() != (source / "asyncfx").resolve():
        raise RuntimeError(f"measured asyncfx from {result['asyncfx']}, not from {source}")
    return result


def alternating(revision: str, script: pathlib.Path, arguments: Sequence[str], rounds: int,
                key: str) -> dict[str, dict[str, list[Any]]]:
    """``script``'s measurements (the items of its JSON's ``key``) in ``revision`` and in
    this checkout, ``rounds`` times each, alternating: ``{label: {item: [values]}}``, the
    labels ``revision`` and ``"this checkout"``."""
    samples: dict[str, dict[str, list[Any]]] = {revision: {}, "this checkout": {}}
    with checked_out(revision) as other:
        for _ in range(rounds):
            for label, source in ((revision, other), ("this checkout", ROOT)):
                for item, value in measure_in(source, script, arguments)[key].items():
                    samples[label].setdefault(item, []).append(value)
    return samples
