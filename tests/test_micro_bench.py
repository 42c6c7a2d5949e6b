"""The micro-benchmarks of ``nox -s bench`` run once each, untimed, with the arguments that session uses: a
change that breaks one fails the suite instead of waiting for the next benchmark run."""

import re
import subprocess
import sys

from conftest import REPO


def test_the_bench_session_runs_every_micro_benchmark_once():
    sys.path.insert(0, str(REPO))
    try:
        from noxfile import BENCH_ARGS
    finally:
        sys.path.remove(str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pytest", *BENCH_ARGS, "--benchmark-disable", "-q",
                           "-W", "ignore::DeprecationWarning"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)", last)}
    collected = subprocess.run([sys.executable, "-m", "pytest", *BENCH_ARGS, "--collect-only", "-q"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    benchmarks = [line for line in collected.stdout.splitlines() if "::" in line]
    # every benchmark ran (those that need a GPU skip without one), none failed
    assert len(benchmarks) >= 8 and counts.get("passed", 0) + counts.get("skipped", 0) == len(benchmarks), counts
    assert counts.get("passed", 0) >= 8 and "failed" not in counts, counts
