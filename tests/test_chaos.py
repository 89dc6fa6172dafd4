"""bench/chaos.py at its smallest: one trial of each scenario on processes (issue 13).

What the project promises after each kind of chaos: every command ends by itself (completion or
a one-line error, never a hang or a traceback), no checkpoint written before it is lost, and
every run that can be resumed ends bit for bit as the run never interrupted, and nothing the
parent started (workers, the forkserver, the resource tracker) is alive 2 s after its SIGKILL.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(240)]


def test_chaos_trials_survive_lose_nothing_and_resume_exactly(tmp_path):
    table = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--trials", "1", "--seed", "1",
                           "--epochs", "8", "--timeout", "60", "--json", str(table)],
                          capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(table.read_text())["rows"]
    report = done.stdout
    for scenario, row in rows.items():
        assert row["survived"] == row["trials"], f"{scenario} did not survive:\n{report}"
        assert row["lost"] == 0, f"{scenario} lost a checkpoint:\n{report}"
        assert row["exact"] == row["resumable"], f"{scenario} resumed inexactly:\n{report}"
    for scenario in ("corrupt-truncate", "corrupt-flip", "corrupt-delete", "corrupt-manifest"):
        assert rows[scenario]["resumable"] == rows[scenario]["trials"], report  # always something to resume
    for scenario, row in rows.items():
        assert row["orphans"] == 0 and row["helpers"] == 0, f"{scenario} left processes behind:\n{report}"
