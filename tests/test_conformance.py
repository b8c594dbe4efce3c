"""The RudderStack conformance check (``../shared/conformance/check.py --all``) passes through the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECK = SHARED / "conformance" / "check.py"
EXPECTED_CASES = 29


def console_script() -> str:
    """The installed ``klaviyo-router`` command of this interpreter's environment."""
    beside = Path(sys.executable).parent / "klaviyo-router"
    if beside.exists():
        return str(beside)
    found = shutil.which("klaviyo-router")
    if found is None:
        pytest.skip("the klaviyo-router console script is not installed (pip install -e .)")
    return found


class TestConformance:
    """``check.py --all -- klaviyo-router transform`` reports every case passed."""

    def test_all_cases_pass(self) -> None:
        """The last line is '29 passed, 0 failed' and the exit status 0."""
        if not CHECK.exists():
            pytest.skip(f"{CHECK} is not present (../shared is not checked out)")
        proc = subprocess.run(
            [sys.executable, str(CHECK), "--all", "--", console_script(), "transform"],
            capture_output=True,
            text=True,
            timeout=110,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        failures = [line for line in lines if not line.startswith("ok ")]
        assert lines, proc.stderr
        assert lines[-1] == f"{EXPECTED_CASES} passed, 0 failed", "\n".join(failures) + proc.stderr
        assert proc.returncode == 0
