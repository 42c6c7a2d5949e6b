"""The study's ladder of budgets: successive halving in which every rung is a complete one-cycle run at its own
budget (epochs x training images), promotions in the manner of ASHA, and the check of how far a ranking transfers
from one rung to the next. Plain data in, plain data out: the Optuna side is ``studies._study``."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pandas as pd

from cifarlab.report.records import standard_error, tied_with_best  # noqa: F401 (the ladder's figures)


@dataclass(frozen=True)
class Rung:
    index: int
    epochs: int
    train_images: int

    @property
    def budget(self) -> dict:
        return {"epochs": self.epochs, "train_images": self.train_images}


@dataclass(frozen=True)
class Preset:
    """A named budget: the top rung (the run the answer is for), how many rungs below it, the validation split."""

    epochs: int
    train_images: int | None  # None: the whole training split
    rungs: int
    val_size: int
    lrfind_steps: int

    def top_images(self, available: int) -> int:
        """The top rung's training images on a split of ``available``: the preset's, or all there are."""
        return min(self.train_images or available, available)


PRESETS = {
    # smoke: seconds a trial, for tests and a first look.
    "smoke": Preset(epochs=3, train_images=288, rungs=3, val_size=256, lrfind_steps=8),
    # quick: sized for a 2-core CPU (both architectures, 30 configurations, within about 75 minutes); its top rung
    # trains 9x the images its bottom rung does.
    "quick": Preset(epochs=6, train_images=4096, rungs=3, val_size=1000, lrfind_steps=30),
    # full: the default recipe's run (10 epochs on the whole training split) on top, for a GPU.
    "full": Preset(epochs=10, train_images=None, rungs=3, val_size=5000, lrfind_steps=100),
}


def make_ladder(epochs: int, train_images: int, rungs: int, eta: float) -> list[Rung]:
    """``rungs`` budgets rising by ``eta`` to ``epochs`` x ``train_images``: epochs and images each grow by about
    the square root of ``eta`` a rung, so that the lower rungs are neither one-epoch runs nor tiny subsets."""
    ladder = []
    for k in range(rungs):
        share = eta ** -(rungs - 1 - k)  # of the top rung's images seen
        e = min(epochs, max(1, round(epochs * math.sqrt(share))))
        n = min(train_images, max(1, round(epochs * train_images * share / e)))
        ladder.append(Rung(k, e, n))
    return ladder


@dataclass(frozen=True)
class Budget:
    """The study's ladder: its rungs (the last is the run the answer is for), their factor, the validation split."""

    name: str
    rungs: tuple[Rung, ...]
    eta: float
    val_size: int
    lrfind_steps: int

    @property
    def top(self) -> Rung:
        return self.rungs[-1]

    def describe(self) -> str:
        return " → ".join(f"{r.epochs} ep × {r.train_images:,}" for r in self.rungs)


def budget_name(args, device) -> str:
    return ("full" if device.type == "cuda" else "quick") if args.budget == "auto" else args.budget


def val_size(args, name: str, train_images: int) -> int | float:
    """--val-size, else the preset's, at most a fifth of the training images (a small data set keeps most)."""
    if args.val_size is not None:
        return args.val_size
    return max(1, min(PRESETS[name].val_size, train_images // 5))


def resolve_budget(args, name: str, available: int, val_images: int) -> tuple[Budget, str]:
    """The ladder for ``available`` training images, and a sentence when the data capped it (else "")."""
    from cifarlab.data import resolve_count

    preset = PRESETS[name]
    epochs = args.epochs or preset.epochs
    if args.train_subset is not None:
        top = resolve_count(args.train_subset, available, what="--train-subset")
    else:
        top = preset.top_images(available)
    capped = "" if args.train_subset is not None or (preset.train_images or available) <= available else (
        f"the training split holds {available:,} images, fewer than the {name} budget's {preset.train_images:,}: "
        "the rungs are capped at what is there")
    rungs = make_ladder(epochs, top, args.rungs or preset.rungs, args.eta)
    return Budget(name, tuple(rungs), args.eta, val_images, preset.lrfind_steps), capped


def expected_trials(target: int, budget: Budget) -> int:
    """Trials of a whole ladder when every trial completes: ``target`` at rung 0, 1/eta of them each rung up."""
    total, n = target, target
    for _ in budget.rungs[1:]:
        n = int(n // budget.eta)
        total += n
    return total


def warmup_share(pct_start: float, steps: int) -> float:
    """The one-cycle warm-up share of a trial of ``steps`` optimizer steps: a low rung gives a large batch few steps,
    and OneCycleLR cannot warm up in exactly one, so from 4 steps on the warm-up takes 2 at least."""
    return max(pct_start, 2 / steps) if steps >= 4 else pct_start


# ------------------------------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Run:
    """One trial as the ladder sees it: its number, rung, state, score and the trial it was promoted from."""

    number: int
    rung: int
    state: str  # complete, pruned, fail, running, waiting
    value: float | None = None
    promoted_from: int | None = None


PROMOTION_ATTEMPTS = 5  # failed runs of one promotion (workers killed under it) before it is given up


def due_promotions(runs: list[Run], rungs: int, eta: float) -> list[tuple[int, int]]:
    """(trial, rung it goes to) of every promotion due, the highest rung first: a complete trial in the top
    1/eta of its rung's complete trials that has not been promoted yet, while the rung has sent up fewer than 1/eta of
    them (ASHA's asynchronous promotion, no rung waits to fill, with a rung's share capped). A promotion
    is made once a run of it waits, runs or has finished; one whose runs all failed is made again, up to
    ``PROMOTION_ATTEMPTS`` times, so that a worker killed under it loses no promotion."""
    attempts: dict[tuple[int, int], list[str]] = {}
    for r in runs:
        if r.promoted_from is not None:
            attempts.setdefault((r.rung, r.promoted_from), []).append(r.state)
    tried = {key for key, states in attempts.items()
             if any(s != "fail" for s in states) or len(states) >= PROMOTION_ATTEMPTS}
    due = []
    for k in reversed(range(rungs - 1)):
        done = sorted((r for r in runs if r.rung == k and r.state == "complete" and r.value is not None),
                      key=lambda r: (-r.value, r.number))
        top = int(len(done) // eta)
        # A rung sends up 1/eta of its trials, no more: a sampler that keeps improving would otherwise promote each
        # new best, and the ladder's cost would grow past its budget. Each slot goes to the best not yet promoted.
        slots = top - sum(1 for rung, _ in tried if rung == k + 1)
        due += [(r.number, k + 1) for r in done[:top] if (k + 1, r.number) not in tried][: max(0, slots)]
    return due


def best_run(runs: list[Run]) -> Run | None:
    """The best complete trial of the highest rung any trial completed."""
    done = [r for r in runs if r.state == "complete" and r.value is not None]
    if not done:
        return None
    top = max(r.rung for r in done)
    return max((r for r in done if r.rung == top), key=lambda r: (r.value, -r.number))


# ------------------------------------------------------------------------------------------------- fidelity


def fidelity(pairs: pd.DataFrame) -> list[dict]:
    """For each pair of adjacent rungs: how the scores of the configurations run at both rank alike.

    ``pairs`` holds one row per configuration and rung pair: ``rung`` (the lower), ``config`` (a label),
    ``lower`` and ``upper`` (its scores). Pairs with fewer than 3 configurations get no correlation."""
    out = []
    for rung, grp in pairs.groupby("rung", sort=True):
        n = len(grp)
        row = {"rung": int(rung), "configurations": n, "spearman": None, "kendall": None,
               "same_best": bool(grp["lower"].idxmax() == grp["upper"].idxmax())}
        if n >= 3 and min(grp["lower"].nunique(), grp["upper"].nunique()) < 2:
            row["spearman"] = float("nan")  # equal scores at one rung rank nothing
        elif n >= 3:
            row["spearman"] = float(grp["lower"].corr(grp["upper"], method="spearman"))
            with contextlib.suppress(ImportError):  # Kendall's tau needs scipy
                row["kendall"] = float(grp["lower"].corr(grp["upper"], method="kendall"))
        row["sentence"] = fidelity_sentence(row)
        out.append(row)
    return out


HELD = 0.5  # Spearman at or above which a ranking is said to hold


def fidelity_sentence(row: dict) -> str:
    k, n, rho = row["rung"], row["configurations"], row["spearman"]
    if rho is None:
        return f"rung {k} to rung {k + 1}: {n} configuration{'s' if n != 1 else ''} run at both, too few to rank"
    if math.isnan(rho):
        return f"rung {k} to rung {k + 1}: the {n} configurations score alike at one of the two, so neither ranks them"
    best = "the same best" if row["same_best"] else "another best"
    if rho >= HELD:
        return (f"the ranking held from rung {k} to rung {k + 1}: Spearman {rho:.2f} over {n} configurations "
                f"({best})")
    return (f"the ranking changed from rung {k} to rung {k + 1}: Spearman {rho:.2f} over {n} configurations "
            f"({best}): the lower budget's ranking is not a guide here")


def rung_pairs(trials: list[dict]) -> pd.DataFrame:
    """One row per promotion that completed: ``rung`` (the lower), ``config`` (labelled by its lowest-rung trial),
    its scores at the ``lower`` and ``upper`` rung. ``trials`` as a study record holds them (number, state, value,
    user_attrs)."""
    by_number = {t["number"]: t for t in trials}
    rows = []
    for t in trials:
        source = by_number.get(t["user_attrs"].get("promoted_from"))
        if t["state"] != "complete" or source is None or source["state"] != "complete":
            continue
        root = source
        while root["user_attrs"].get("promoted_from") in by_number:
            root = by_number[root["user_attrs"]["promoted_from"]]
        rows.append({"rung": source["user_attrs"].get("rung", 0), "config": f"#{root['number']}",
                     "lower": source["value"], "upper": t["value"]})
    return pd.DataFrame(rows, columns=["rung", "config", "lower", "upper"])
