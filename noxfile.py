"""nox sessions: ``nox -s tests``, ``nox -s lint``; each installs the package into its own virtualenv
and runs against the installed copy (the Scientific Python development guide's layout)."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite; real-data tests run when CIFARLAB_DATA names a CIFAR-10 copy."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs, env={"CIFARLAB_DATA": os.environ.get("CIFARLAB_DATA", "")})


# The micro-benchmarks' pytest arguments; tests/test_micro_bench.py runs the same with --benchmark-disable (each
# benchmark called once, untimed), so that the suite sees a change that breaks them.
BENCH_ARGS = ["bench", "-p", "no:cacheprovider", "-n", "0", "--benchmark-columns=min,median,max,rounds"]


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Micro-benchmarks; JSON kept under .benchmarks/ (compare two runs: pytest-benchmark compare 0001 0002)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *BENCH_ARGS, "--benchmark-enable", "--benchmark-autosave", *session.posargs)


@nox.session(python=PYTHON)
def smoke(session: nox.Session) -> None:
    """A three-trial study on the smoke budget, end to end, into a throw-away output folder."""
    session.install("-e", ".")
    out = session.create_tmp()
    data = os.environ.get("CIFARLAB_DATA") or "synthetic:2000:200"
    session.run("python", "-m", "studies.onecycle", "--trials", "3", "--budget", "smoke", "--data", data,
                "--out", out, *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "--diff", "noxfile.py")
