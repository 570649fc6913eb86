"""The command line: the demo that the README runs, and its errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from asyncfx.cli import main


def test_demo_prints_the_plan_and_checks_the_split(capsys):
    assert main(["demo", "--model", "skip_list_denoiser", "--n-devices", "3"]) == 0
    out = capsys.readouterr().out
    assert "StagePlan for SkipListDenoiser: 3 stage(s)" in out
    assert "boundary tensors" in out
    assert "max |difference| = 0 (exact)" in out


def test_demo_reports_too_many_devices_in_one_line(capsys):
    assert main(["demo", "--model", "skip_list_denoiser", "--n-devices", "500"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asyncfx: error: n_devices=500 is more than") and "\n" not in err


def test_bad_options_are_usage_errors(capsys):
    for argv in (["demo", "--n-devices", "0"], ["demo", "--model", "nope"], ["launch"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "is not a positive integer" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "asyncfx", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout
