"""Saving a run mid-way and resuming it as if it had never stopped (the same random numbers, the same results).

``fit`` saves at the end of the first step after ``every`` seconds since the last save, within an epoch or at
its end, and where a stop was requested (a signal handler's ``request_stop``); never after the last epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from cifarlab.data import atomic_file
from cifarlab.errors import ConfigError

CHECKPOINT_FORMAT = 2  # bumped when what a checkpoint stores changes shape


@dataclass
class EpochProgress:
    """An epoch's start (the generator and mirrors its batches are drawn from, so that a resumed run draws them
    again and skips the steps done) and its running sums, from the sessions before a resume included."""

    generator: torch.Tensor
    flip_now: torch.Tensor | None
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    data_seconds: float = 0.0
    train_seconds: float = 0.0
    compile_seconds: float = 0.0  # of train_seconds: each session compiles on its first step

    def sums(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("generator", "flip_now")}


@dataclass
class Start:
    """Where ``fit`` starts: the epoch, the steps of it already done, their sums, the wall seconds spent."""

    epoch: int = 1
    steps_done: int = 0
    sums: dict = field(default_factory=dict)
    wall_seconds: float = 0.0


@dataclass
class Checkpointing:
    """Where ``fit`` keeps the state to resume from, and how often (``every`` seconds; 0: at epoch ends only).

    ``extra`` is stored along (the CLI keeps its flags there); ``resume`` is a checkpoint read by
    ``load_checkpoint`` to continue from.
    """

    path: Path
    every: float = 60.0
    extra: dict = field(default_factory=dict)
    resume: dict | None = None
    saved_epoch: int = 0  # the epochs the file holds whole
    saved_step: int = 0  # and the steps of the next epoch it holds
    steps_per_epoch: int = 0
    stop_requested: bool = False
    _run: dict = field(default_factory=dict, init=False, repr=False)
    _last_save: float = field(default_factory=time.monotonic, init=False, repr=False)

    def request_stop(self) -> None:
        self.stop_requested = True

    def describe(self) -> str:
        """Where the file leaves the run: "epoch 3" or "epoch 4, step 40 of 97"."""
        if self.saved_step:
            return f"epoch {self.saved_epoch + 1}, step {self.saved_step} of {self.steps_per_epoch}"
        return f"epoch {self.saved_epoch}"

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` of an epoch (not its last: the epoch's end saves after evaluating)."""
        return self.stop_requested or (self.every > 0 and step < self.steps_per_epoch
                                       and time.monotonic() - self._last_save >= self.every)

    def due_after_epoch(self) -> bool:
        return self.stop_requested or time.monotonic() - self._last_save >= self.every

    def bind(self, *, config, step, gen: torch.Generator, batches, result, steps_per_epoch: int) -> Start:
        """Attach the run's state to save; put it back where ``resume`` left it, if given."""
        self.steps_per_epoch = steps_per_epoch
        self._run = {"config": config, "step": step, "gen": gen, "batches": batches, "result": result}
        self._last_save = time.monotonic()
        if self.resume is None:
            return Start()
        start = _restore(self.resume, **self._run)
        self.saved_epoch, self.saved_step = start.epoch - 1, start.steps_done
        return start

    def save(self, epoch: int, wall_seconds: float, steps: int = 0, progress: EpochProgress | None = None) -> None:
        """Save the run after ``epoch`` whole epochs and ``steps`` steps of the next (``progress``: its start and
        sums so far)."""
        run = self._run
        if steps:
            generator, flip = progress.generator, progress.flip_now
        else:
            generator, flip = run["gen"].get_state(), run["batches"].flip_now
        state = {
            "kind": "cifarlab-checkpoint", "format": CHECKPOINT_FORMAT, "config": run["config"].to_dict(),
            "epoch": epoch, "step": steps, "steps_per_epoch": self.steps_per_epoch, **run["step"].state_dict(),
            "generator": generator, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "flip_now": None if flip is None else flip.cpu(), "within": progress.sums() if steps else None,
            "records": [r.to_dict() for r in run["result"].records],
            "compile_seconds": run["step"].compile_seconds if run["config"].compile else None,
            "wall_seconds": wall_seconds, "extra": self.extra,
        }
        with atomic_file(self.path, "wb") as fh:
            torch.save(state, fh)
        self.saved_epoch, self.saved_step = epoch, steps
        self._last_save = time.monotonic()


# Settings that change no number a run computes: a run may resume with another value.
RESULT_NEUTRAL = frozenset({"retain_memory"})


def _restore(doc: dict, *, config, step, gen: torch.Generator, batches, result) -> Start:
    from cifarlab.train import EpochRecord

    stored, now = ({k: v for k, v in c.items() if k not in RESULT_NEUTRAL} for c in (doc["config"], config.to_dict()))
    if stored != now:
        changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
        raise ConfigError(f"the checkpoint was written with other settings ({', '.join(changed)})")
    step.load_state_dict(doc)
    gen.set_state(doc["generator"])
    torch.set_rng_state(doc["torch_rng"])
    if doc["cuda_rng"] and step.device.type == "cuda" and len(doc["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(doc["cuda_rng"])
    batches.load_flip_state(doc["flip_now"])
    result.records = [EpochRecord(**r) for r in doc["records"]]
    step.compile_seconds = doc["compile_seconds"] or 0.0  # the sessions' before this one
    epoch, steps, _ = checkpoint_progress(doc)
    return Start(epoch + 1, steps, dict(doc["within"] or {}) if steps else {}, float(doc["wall_seconds"]))


def checkpoint_progress(doc: dict) -> tuple[int, int, int]:
    """(whole epochs, steps of the next epoch, steps an epoch) a checkpoint holds."""
    return int(doc["epoch"]), int(doc["step"]), int(doc["steps_per_epoch"])


def load_checkpoint(path: Path, *, lazy: bool = False) -> dict:
    """A checkpoint written by ``fit``; a file that is not one is refused in one line. ``lazy`` maps the file
    instead of reading it (the reports read only a checkpoint's progress)."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no checkpoint there (a run keeps one while it trains, see --checkpoint-every)") \
            from None
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a file that is not a checkpoint
        raise ConfigError(f"{path} is not a cifarlab checkpoint ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "cifarlab-checkpoint":
        raise ConfigError(f"{path} is not a cifarlab checkpoint")
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} was written by an earlier cifarlab (format {doc.get('format')}, this one reads "
                          f"{CHECKPOINT_FORMAT}); train the run again")
    return doc


def resume_point(doc: dict, epochs: int) -> tuple[str, float]:
    """Where a checkpoint leaves its run, in words ("after epoch 3 of 10", "in epoch 4 of 10, after step 40 of
    97") and in epochs done (3, 3.412)."""
    epoch, step, steps = checkpoint_progress(doc)
    if not step:
        return f"after epoch {epoch} of {epochs}", epoch
    return f"in epoch {epoch + 1} of {epochs}, after step {step} of {steps}", round(epoch + step / max(steps, 1), 3)
