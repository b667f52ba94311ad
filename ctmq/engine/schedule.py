"""CTMQ and direct schedules: lists of stages, printable and JSON-serializable.

    ctmq   cycle 1: FP -> W{s}A{s} -> ... -> W{t}A{t}
           cycle c > 1: FP (from the last low-bit stage) -> W{s}A{s} -> ... -> W{t}A{t}
    direct FP -> W{t}A{t}, the same total epochs

The first FP stage (cycle 1) is the shared starting point: a run trains it once
for both schedules, or skips it when an FP checkpoint is given (epochs = 0).
"""

import dataclasses

from ..quant import FULL_PRECISION

_LOW_BITS = range(1, 9)


@dataclasses.dataclass(frozen=True)
class Stage:
    cycle: int
    w_bits: int
    a_bits: int
    epochs: int

    @property
    def label(self):
        if self.w_bits == FULL_PRECISION and self.a_bits == FULL_PRECISION:
            return "FP"
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def is_fp(self):
        return self.label == "FP"


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def per_step_epochs(epochs_per_stage, steps):
    """epochs_per_stage (an int, or a list of one int per step) as a list of
    `steps` epochs."""
    if isinstance(epochs_per_stage, (list, tuple)):
        if len(epochs_per_stage) != steps:
            raise ValueError(
                f"epochs_per_stage: {len(epochs_per_stage)} values given for a ladder "
                f"of {steps} steps (one per bit depth, start_bits first), "
                f"got {list(epochs_per_stage)}"
            )
        for i, e in enumerate(epochs_per_stage):
            _check_int(f"epochs_per_stage[{i}]", e, 1)
        return list(epochs_per_stage)
    if isinstance(epochs_per_stage, bool) or not isinstance(epochs_per_stage, int):
        raise TypeError(
            f"epochs_per_stage must be an int or a list of {steps} ints, got {epochs_per_stage!r}"
        )
    _check_int("epochs_per_stage", epochs_per_stage, 1)
    return [epochs_per_stage] * steps


@dataclasses.dataclass
class Schedule:
    name: str
    stages: list

    @classmethod
    def ctmq(
        cls,
        start_bits=4,
        target_bits=1,
        cycles=2,
        epochs_per_stage=1,
        fp_epochs=None,
        final_epochs=None,
    ):
        """Cyclic multi-step schedule. epochs_per_stage: one int for every
        low-bit stage, or a list with one entry per step of the ladder
        (start_bits first: [4, 2, 2, 6] for W4A4, W3A3, W2A2, W1A1), the same
        in every cycle. fp_epochs defaults to the first of them (0: the first
        FP stage is skipped, e.g. when an FP checkpoint is given; later cycles
        then retrain FP for the first of epochs_per_stage); final_epochs: the
        epochs of each cycle's last (target-bit) stage, default its entry of
        epochs_per_stage."""
        _check_int("start_bits", start_bits, 1, 8)
        _check_int("target_bits", target_bits, 1, 8)
        if start_bits < target_bits:
            raise ValueError(
                f"start_bits ({start_bits}) must be >= target_bits ({target_bits}): "
                "each step lowers the bit depth by one"
            )
        _check_int("cycles", cycles, 1)
        per_step = per_step_epochs(epochs_per_stage, start_bits - target_bits + 1)
        fp_epochs = per_step[0] if fp_epochs is None else fp_epochs
        _check_int("fp_epochs", fp_epochs, 0)
        if final_epochs is not None:
            _check_int("final_epochs", final_epochs, 1)
            per_step[-1] = final_epochs
        stages = []
        for cycle in range(1, cycles + 1):
            fp = fp_epochs if cycle == 1 else (fp_epochs or per_step[0])
            if fp:
                stages.append(Stage(cycle, FULL_PRECISION, FULL_PRECISION, fp))
            stages += [
                Stage(cycle, b, b, e)
                for b, e in zip(range(start_bits, target_bits - 1, -1), per_step, strict=True)
            ]
        return cls("ctmq", stages)

    @classmethod
    def direct(cls, target_bits=1, epochs=1, fp_epochs=1):
        """FP (fp_epochs, 0 to skip) then straight to target_bits for epochs."""
        _check_int("target_bits", target_bits, 1, 8)
        _check_int("epochs", epochs, 1)
        _check_int("fp_epochs", fp_epochs, 0)
        stages = [Stage(1, FULL_PRECISION, FULL_PRECISION, fp_epochs)] if fp_epochs else []
        return cls("direct", stages + [Stage(1, target_bits, target_bits, epochs)])

    @classmethod
    def ladder(cls, start_bits, target_bits, low_epochs, fp_epochs, name="ladder"):
        """One cycle of the ladder, FP (fp_epochs, 0 to skip) then start_bits
        down to target_bits sharing low_epochs (the remainder to the last)."""
        _check_int("start_bits", start_bits, 1, 8)
        _check_int("target_bits", target_bits, 1, start_bits)
        steps = start_bits - target_bits + 1
        _check_int("low_epochs", low_epochs, steps)
        each = [low_epochs // steps] * steps
        each[-1] += low_epochs - sum(each)
        stages = [Stage(1, FULL_PRECISION, FULL_PRECISION, fp_epochs)] if fp_epochs else []
        stages += [
            Stage(1, b, b, e)
            for b, e in zip(range(start_bits, target_bits - 1, -1), each, strict=True)
        ]
        return cls(name, stages)

    @classmethod
    def custom(cls, name, stages, fp_epochs):
        """A user's schedule after the shared FP stage (fp_epochs, 0 to skip):
        stages is a list of {"bits": k, "epochs": e} (or w_bits/a_bits); bits 32
        is an FP stage and begins a new cycle."""
        out = [Stage(1, FULL_PRECISION, FULL_PRECISION, fp_epochs)] if fp_epochs else []
        cycle = 1
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"schedule {name!r}: a non-empty list of stages expected")
        for i, st in enumerate(stages):
            if (
                not isinstance(st, dict)
                or "epochs" not in st
                or not ({"bits"} & set(st) or {"w_bits", "a_bits"} <= set(st))
            ):
                raise ValueError(
                    f"schedule {name!r}, stage {i}: expected {{'bits': k, 'epochs': e}} "
                    f"or {{'w_bits', 'a_bits', 'epochs'}}, got {st!r}"
                )
            w, a = (st["bits"], st["bits"]) if "bits" in st else (st["w_bits"], st["a_bits"])
            for key, v in (("bits", w), ("bits", a)):
                if v != FULL_PRECISION:
                    _check_int(f"schedule {name!r}, stage {i}: {key}", v, 1, 8)
            _check_int(f"schedule {name!r}, stage {i}: epochs", st["epochs"], 1)
            if w == a == FULL_PRECISION and (out or i):
                cycle += 1
            out.append(Stage(cycle, w, a, st["epochs"]))
        return cls(name, out)

    @classmethod
    def direct_matching(cls, ctmq):
        """The direct baseline with ctmq's first FP stage and total epochs."""
        first = ctmq.stages[0]
        fp = first.epochs if first.is_fp and first.cycle == 1 else 0
        last = ctmq.stages[-1]
        return cls.direct(last.w_bits, ctmq.total_epochs - fp, fp)

    @property
    def total_epochs(self):
        return sum(s.epochs for s in self.stages)

    def cycle_teacher(self, index):
        """Index of the FP stage that began stage `index`'s cycle (its
        distillation teacher), or None where the cycle has no FP stage (the
        first cycle after an FP checkpoint: the starting weights teach) or the
        stage is itself FP."""
        stage = self.stages[index]
        if stage.is_fp:
            return None
        for j in range(index - 1, -1, -1):
            if self.stages[j].cycle == stage.cycle and self.stages[j].is_fp:
                return j
        return None

    def stage_key(self, index):
        """File name of a stage's checkpoint; the first FP stage is shared."""
        s = self.stages[index]
        if index == 0 and s.is_fp and s.cycle == 1:
            return f"init-FP-e{s.epochs}"
        return f"{self.name}-{index:02d}-c{s.cycle}-{s.label}"

    def to_dict(self):
        return {"name": self.name, "stages": [dataclasses.asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d):
        return cls(d["name"], [Stage(**s) for s in d["stages"]])

    def __str__(self):
        lines = [f"{self.name} schedule, {self.total_epochs} epochs:"]
        lines += [
            f"  {i:2d}  cycle {s.cycle}  {s.label:6s} {s.epochs} epoch(s)"
            for i, s in enumerate(self.stages)
        ]
        return "\n".join(lines)
