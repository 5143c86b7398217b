"""What a training run records (`History`), and a protocol's finished runs on disk (`RunLog`)."""
import dataclasses
import json
import os

import numpy as np

from examples import reporting


@dataclasses.dataclass
class History:
    """What `examples.training.train_and_track` records at each evaluation."""

    steps: list = dataclasses.field(default_factory=list)
    accuracy: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)  # training loss of the last chunk
    # Cumulative training time, evaluations excluded. The first interval's time includes the
    # one-off tracing/compilation, which would swamp per-step differences at this scale: it is
    # replaced by its steps times the median per-step time of the other intervals.
    seconds: list = dataclasses.field(default_factory=list)
    compile_seconds: float | None = None
    probes: list = dataclasses.field(default_factory=list)  # what `probe` returned
    diverged: bool = False
    # After training: test accuracy with the moving averages and with the exact population
    # statistics of Algorithm 2 (equal for a network without BN).
    final_accuracy_moving: float | None = None
    final_accuracy: float | None = None

    def best(self):
        """(best accuracy, first step that reached it, its training seconds)."""
        if not self.accuracy:
            return float("nan"), None, None
        i = int(np.argmax(self.accuracy))
        return float(self.accuracy[i]), self.steps[i], self.seconds[i]

    def best_by(self, step):
        """The best accuracy of the evaluations up to `step`."""
        return max((a for s, a in zip(self.steps, self.accuracy) if s <= step),
                   default=float("nan"))

    def first_reaching(self, target):
        """(step, seconds) of the first evaluation with accuracy >= target, or (None, None)."""
        for step, acc, sec in zip(self.steps, self.accuracy, self.seconds):
            if acc >= target - 1e-9:
                return step, sec
        return None, None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        return cls(**fields)


class RunLog:
    """The finished training runs of one protocol, kept in a JSON file, so that an interrupted
    protocol resumes where it stopped (a long run on a lent accelerator, say).

    The file holds `{"fingerprint": ..., "runs": {key: History.to_dict(), ...}}`. `fingerprint`
    describes what every run shares (the data and the `Config`); a file written under another
    fingerprint is refused rather than mixed in. Each run is stored under a key naming what sets
    it apart (variant, seed, learning rate, steps, target; see `examples.protocol.Run.key`).
    """

    def __init__(self, path, fingerprint):
        self.path, self.fingerprint, self.runs = path, fingerprint, {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"The checkpoint {path} was written by another protocol (other data or "
                    "configuration); name a new file or delete it. "
                    f"Its fingerprint: {saved.get('fingerprint')}; this run's: {fingerprint}"
                )
            self.runs = saved["runs"]

    def get(self, key):
        """The `History` recorded under `key`, or None."""
        return History.from_dict(self.runs[key]) if key in self.runs else None

    def put(self, key, history):
        """Record `history` under `key` and rewrite the file."""
        self.runs[key] = history.to_dict()
        # Atomic: a process killed mid-write leaves the last complete file.
        reporting.write_json(self.path, {"fingerprint": self.fingerprint, "runs": self.runs})
