"""What every cifarlab CLI shares: flags built from config dataclasses, data flags, and user-error handling.

A user's mistake ends in one or two lines on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cifarlab.errors import CifarlabError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def stop_at_a_step(checkpoint) -> Iterator[None]:
    """While a run with a checkpoint trains, Ctrl-C or SIGTERM (a scheduler's or ``timeout``'s stop) finishes the
    step under way, saves the checkpoint there and stops; a second Ctrl-C stops at once, keeping the last save.
    A signal the process was started ignoring (a script's background job ignores SIGINT) stays ignored."""
    if checkpoint is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if checkpoint.stop_requested:
            raise KeyboardInterrupt
        checkpoint.request_stop()
        print("stopping after this step to save a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
              if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and takes flags by their full names only: a prefix would slip past
    what ``studies.onecycle`` hands its workers and what ``studies.train`` checks on the raw command line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(run with --help for the valid flags)\n")


def flags_given(argv: list[str]) -> list[str]:
    """The flags named on a command line, in order (``--name=value`` counts as ``--name``); the parser takes full
    names only, so these are the flags as it read them."""
    return [tok.split("=", 1)[0] for tok in argv if tok.startswith("--")]


def _number(kind: type, text: str, minimum: float | None = None, strict: bool = False):
    """``text`` as ``kind`` (finite), at least (``strict``: above) ``minimum``; else argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {'whole number' if kind is int else 'number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise argparse.ArgumentTypeError(
            f"must be greater than {minimum:g}, got {text}" if strict else
            f"must be at least {minimum:g}, got {value}" if minimum else f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, 1)


def flags_of_a_mode(args, defaults: dict, on: bool, mode: str, flag: str) -> None:
    """Flags that only shape one mode parse to None, so that one given without ``flag`` is refused by name; with
    it, those not given take their ``defaults``."""
    from cifarlab.errors import ConfigError

    given = [f"--{k.replace('_', '-')}" for k in defaults if getattr(args, k) is not None]
    if given and not on:
        raise ConfigError(f"{', '.join(given)} only {'shape' if len(given) > 1 else 'shapes'} {mode}; add {flag}, or "
                          "leave the flag out")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def positive_int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.strip().lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}")
    return _number(int, text, 1)


def non_negative_int(text: str) -> int:
    return _number(int, text, 0)


def finite_float(text: str) -> float:
    return _number(float, text)


def positive_float(text: str) -> float:
    return _number(float, text, 0, strict=True)


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?")


def duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``45m``, ``2h``, ``1.5h`` or ``1h30m``; more than 0."""
    value = duration_or_zero(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    return value


def duration_or_zero(text: str) -> float:
    """As ``duration``, and ``0``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"expected a duration such as 90m, 2h, 1h30m or 3600 (seconds), got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def count_or_fraction(text: str, minimum: int = 1) -> int | float:
    """``5000`` (a count) or ``0.1`` (a fraction of the available images)."""
    try:
        value = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
        if not 0 < fraction <= 1:
            raise argparse.ArgumentTypeError(f"a fraction must lie in (0, 1], got {text}") from None
        return fraction
    if value < minimum:
        raise argparse.ArgumentTypeError(f"a count must be at least {minimum}, got {value}")
    return value


def count_fraction_or_zero(text: str) -> int | float:
    """As ``count_or_fraction``, and ``0`` for none."""
    return count_or_fraction(text, minimum=0)


_TYPES: dict[str, Callable[[str], object]] = {
    "epochs": positive_int, "batch_size": positive_int, "eval_batch_size": positive_int, "log_every": positive_int,
    "max_lr": positive_float, "loader_workers": non_negative_int, "cutout": non_negative_int,
}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
                            defaults: dict[str, object] | None = None) -> None:
    """One ``--flag`` per dataclass field, with the field's default and help text."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help", ""))
        else:
            kind = _TYPES.get(f.name) or (finite_float if isinstance(f.default, float) else type(f.default))
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: object):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)


def add_data_arguments(parser: argparse.ArgumentParser, *, allow_no_val: bool = False,
                       val_default: int | None = 5000, val_default_help: str | None = None) -> None:
    """``--data``, ``--val-size``, ``--train-subset`` and ``--cache-dir``. A command that resolves the hold-out
    itself passes ``val_default=None`` and says how in ``val_default_help``."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="ImageFolder tree with train/ and test/, 'torchvision[:ROOT]', or 'synthetic[:N]' "
                            "(default: $CIFARLAB_DATA, else torchvision's CIFAR10 in the cache folder)")
    group.add_argument("--val-size", type=count_fraction_or_zero if allow_no_val else count_or_fraction,
                       default=val_default,
                       help=f"validation hold-out of the training set: a count or a fraction (default: "
                            f"{val_default_help or val_default})"
                            + ("; 0 trains on every training image and validates on none" if allow_no_val else ""))
    group.add_argument("--train-subset", type=count_or_fraction, default=None,
                       help="train on a seeded, stratified subset: a count or a fraction (default: all)")
    group.add_argument("--cache-dir", default=None,
                       help="where decoded arrays are cached (default: $CIFARLAB_CACHE or ~/.cache/cifarlab)")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("CIFARLAB_REPORTS", "reports")),
                        help="root of the output tree (default: reports/)")


def load_data(args: argparse.Namespace, seed: int = 0):
    from cifarlab.data import load_splits

    splits = load_splits(args.data, val_size=args.val_size, seed=seed, cache_dir=args.cache_dir)
    return splits.with_train_subset(args.train_subset, seed=seed)


def parse_archs(text: str) -> list[str]:
    """``custom_resnet,resnet18`` as a list, each a registered architecture."""
    from cifarlab.errors import ConfigError
    from cifarlab.models import list_models

    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in list_models()]
    if bad or not archs:
        raise ConfigError(f"unknown architecture {', '.join(bad) or repr(text)}; valid: {', '.join(list_models())}")
    return list(dict.fromkeys(archs))


def console():
    """A rich console; wide when writing to a file or pipe, so logs keep whole table rows."""
    from rich.console import Console

    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # `tail -f` on a long run's log shows each epoch as it ends
    return Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def rebuild_reports(out: Path, console, storage_url: str | None = None) -> None:
    """Redraw ``<out>/index.html`` after a command stored results; a drawing fault never loses those results.
    ``console`` None: a redraw while a study runs, which says nothing and whose fault never stops the study."""
    from studies._reports import rebuild

    try:
        index = rebuild(out, storage_url)
    except CifarlabError as exc:
        print(f"reports not rebuilt: {exc}", file=sys.stderr)
        return
    except Exception:
        if console is None:
            return
        raise
    if console is not None:
        console.print(f"reports: {index}")


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse ``argv`` and call ``body``; a user's error becomes a short message and exit status 2, Ctrl-C 130.

    Returns the exit status instead of raising SystemExit, so tests can call ``main([...])``.
    """
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return body(args)
    except CifarlabError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
