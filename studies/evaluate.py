"""Test a stored model: ``python -m studies.evaluate reports/runs/<time>-<arch>``.

Rebuilds the model from ``model.pt`` and tests it on the run's test split (or ``--data``'s) with each test-time
augmentation asked for, beside the run's own figures. Writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from studies import _cli

PROG = "python -m studies.evaluate"


def _views(text: str) -> list[str]:
    from cifarlab.evaluate import TTA_VIEWS

    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in TTA_VIEWS]
    if bad or not views:
        raise _cli.argparse.ArgumentTypeError(
            f"unknown view {', '.join(map(repr, bad)) or '(none)'}; valid: {', '.join(TTA_VIEWS)}, comma-separated")
    return list(dict.fromkeys(views))


def build_parser():
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("run", metavar="RUN", help="a run folder holding model.pt, or a model.pt file")
    p.add_argument("--tta", type=_views, default=["none", "flip", "flip-shift"],
                   help="test-time augmentations to evaluate, comma-separated: none (the image alone), flip (and "
                        "its mirror, 2 passes), flip-shift (and both moved a pixel each way, 6 passes) "
                        "(default: all three)")
    p.add_argument("--data", default=None,
                   help="evaluate on the test split of this copy instead of the run's own (same classes)")
    p.add_argument("--cache-dir", default=None, help="where decoded arrays are cached")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: what this device trains the architecture in")
    p.add_argument("--batch-size", type=_cli.positive_int, default=1024, help="images per forward pass")
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run(build_parser(), _main, argv)


def _main(args) -> int:
    import time

    import torch
    from rich.table import Table

    from cifarlab.choices import resolve_speed
    from cifarlab.cpu import retained_memory
    from cifarlab.data import load_splits
    from cifarlab.errors import ConfigError
    from cifarlab.evaluate import TTA_VIEWS, evaluate
    from cifarlab.report.records import read_json
    from cifarlab.timing import configure_device, resolve_device, synchronize
    from cifarlab.weights import load_weights

    console = _cli.console()
    path = Path(args.run)
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"{weights}: no weights there (studies.train saves model.pt in its run folder unless "
                          "--no-save-model)")
    model, norm, doc = load_weights(weights)
    config = doc["config"]
    device = resolve_device(args.device)
    configure_device(device)
    record = weights.with_name("run.json")
    run = read_json(record) if record.is_file() else {}
    source = args.data or (run.get("data") or {}).get("source")
    if source is None:
        raise ConfigError(f"{weights}: no run.json beside it names its data; pass --data")
    splits = load_splits(source, val_size=0, seed=0, cache_dir=args.cache_dir)
    if list(splits.classes) != list(doc["classes"]):
        raise ConfigError(f"{source} has other classes than the model ({', '.join(splits.classes)}); "
                          f"it was trained on {', '.join(doc['classes'])}")
    speed = resolve_speed(config["arch"], device, args.precision, "auto")
    model = model.to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    console.print(f"{weights}: {config['arch']} on {device}, {speed.precision}, channels_last "
                  f"{'on' if speed.channels_last else 'off'}; test split of {splits.source}: "
                  f"{len(splits.test_labels)} images", soft_wrap=True)

    stored = {"none": ((run.get("test") or {}).get("plain") or {}).get("accuracy"),
              "flip": ((run.get("test") or {}).get("flip_tta") or {}).get("accuracy")} if args.data is None else {}
    table = Table(title="test accuracy by test-time augmentation")
    for col in ("views", "passes", "accuracy", "loss", "seconds", "images/s", "run.json"):
        table.add_column(col, justify="right")
    kw = {"device": device, "precision": speed.precision, "channels_last": speed.channels_last,
          "batch_size": args.batch_size, "logit_scale": config.get("logit_scale", 1.0)}
    # Freed memory stays in the process, as while the run trained: a 1,024-image batch's activations would
    # otherwise come back from the kernel page by page on every forward pass.
    with retained_memory(device.type == "cpu" and config.get("retain_memory", True)):
        evaluate(model, splits.test_images[: args.batch_size], splits.test_labels[: args.batch_size], norm,
                 **kw)  # warm-up
        for views in args.tta:
            synchronize(device)
            t0 = time.perf_counter()
            result = evaluate(model, splits.test_images, splits.test_labels, norm, tta=views, **kw)
            synchronize(device)
            seconds = time.perf_counter() - t0
            table.add_row(views, str(TTA_VIEWS[views]), f"{result.accuracy:.2%}", f"{result.loss:.4f}",
                          f"{seconds:.1f}", f"{len(splits.test_labels) / seconds:.0f}",
                          f"{stored[views]:.2%}" if stored.get(views) is not None else "—")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
