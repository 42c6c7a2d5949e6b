"""Rebuild every report page from stored records alone: ``python -m studies.report``.

Reads ``<out>/runs``, ``<out>/lrfind``, ``<out>/devices`` and the studies in the storage (default: the
embedded SQLite file under ``<out>/studies``), and writes ``<out>/index.html`` with one page per item.
"""

from __future__ import annotations

import sys
from pathlib import Path

from studies import _cli

PROG = "python -m studies.report"


def build_parser():
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    _cli.add_out_argument(p)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: <out>/studies/studies.db if present)")
    p.add_argument("--summary", type=Path, default=None, metavar="RESULTS",
                   help="print the results table (one row per machine) from the records under RESULTS, a folder laid "
                        "out as reports/ (devices/, runs/), such as docs/results; draws no page")
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run(build_parser(), _main, argv)


def _main(args) -> int:
    from cifarlab.errors import ConfigError
    from cifarlab.report.records import check_writable
    from studies._reports import rebuild
    from studies._storage import mask_url, scrub

    if args.summary is not None:
        return _summary(args.summary)
    out = Path(args.out)
    if not out.is_dir():
        raise ConfigError(f"no output folder {out}; pass --out with the folder the commands wrote to")
    check_writable(out)
    redrawn: list[Path] = []
    try:
        index = rebuild(out, args.storage, redrawn)
    except ConfigError as exc:
        raise ConfigError(scrub(str(exc), args.storage)) from None
    # Pages of unchanged records are kept; say which were drawn again (a study's figures take seconds).
    studies = sum(folder.parent.name == "studies" for folder in redrawn)
    benchmarks = sum(folder.parent.name == "devices" for folder in redrawn)
    machines = out / "machines" in redrawn
    print(f"written: {index}" + (f" (studies from {mask_url(args.storage)})" if args.storage else "")
          + (f", {studies} study pages redrawn" if studies else "")
          + (f", {benchmarks} device benchmark pages redrawn" if benchmarks else "")
          + (", the machines-compared page redrawn" if machines else ""))
    return 0


def _summary(results: Path) -> int:
    from cifarlab.errors import ConfigError
    from cifarlab.report.summary import results_summary, summary_markdown

    frame = results_summary(results)
    if frame.empty:
        raise ConfigError(f"no benchmark or run records under {results} (expected devices/*/devices.json or "
                          "runs/*/run.json)")
    print(summary_markdown(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
