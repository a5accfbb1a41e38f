"""The README's main command, timed as a new user meets it: wall clock and peak memory.

    python benchmarks/first_run.py

Runs the command after ``&&`` on the README's first line (``ampq quantize smollm2-135m --budget 4.25
--eval ...``) under ``/usr/bin/time -v`` in an empty folder, with a fresh ampq cache that holds only
the built-in models and texts already fetched: the sensitivity table is measured, not reused. (The
one-time fetch of the built-in model, about a minute, is not part of it.) The load average before
and after is recorded: on a shared machine the seconds grow with it.
Writes benchmarks/results/first_run/first_run.json and .md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

from ampq.atomic import atomic_file  # noqa: E402
from ampq.builtin import cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "first_run"
FETCHED = ("models", "corpora", "downloads")  # what the first fetch leaves in the cache


def readme_command() -> str:
    first = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("bash scripts/setup.sh"))
    return first.split("&&", 1)[1].split("#", 1)[0].strip()


def main() -> None:
    command = readme_command()
    cache = cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "cache"
        fresh.mkdir()
        for name in FETCHED:
            if (cache / name).exists():
                (fresh / name).symlink_to(cache / name)
        work = Path(tmp) / "work"
        work.mkdir()
        load_before = os.getloadavg()
        done = subprocess.run(["/usr/bin/time", "-v", *shlex.split(command)], cwd=work, capture_output=True, text=True,
                              env={**os.environ, "AMPQ_CACHE": str(fresh)})
        load_after = os.getloadavg()
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"the command failed ({done.returncode}):\n{log[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    peak_gib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1)) / 2**20
    stages = re.findall(r"stage times: (.*)", log)
    printed = done.stdout.splitlines()  # the summary and the table (progress and stage times go to stderr)
    m = machine()
    result = {"machine": m, "command": command, "wall_s": seconds, "peak_gib": peak_gib, "stage_times": stages,
              "load_average_before": load_before, "load_average_after": load_after, "printed": printed}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_file(RESULTS / "first_run.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    lines = [f"`{command}` on {describe(m)}; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
             "after (seconds grow with it).", "",
             "| wall clock | peak resident memory | stages |", "|---|---|---|",
             f"| {seconds:.0f} s | {peak_gib:.2f} GiB | {'; '.join(stages)} |", "", "What it printed:", "", "```",
             *printed, "```"]
    with atomic_file(RESULTS / "first_run.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
