"""The non-finite guard: skip an update whose loss or gradient is not finite, count it per phase,
and stop the run after ``train.max_nonfinite`` in a row in one phase (one phase's success must
not hide another that always fails)."""

from __future__ import annotations

from collections import defaultdict

from ..contract import StepdistillError


class NonFiniteError(StepdistillError):
    pass


class NonFiniteGuard:
    def __init__(self, limit: int, log):
        self.limit, self.log = limit, log
        self.total, self.in_row = defaultdict(int), defaultdict(int)

    @property
    def streak(self) -> bool:
        """Whether some phase is in a run of non-finite updates (checkpoints wait for it to end)."""
        return any(self.in_row.values())

    def ok(self, phase: str) -> None:
        self.in_row[phase] = 0

    def skipped(self, phase: str, what: str, names, step: int, last_checkpoint) -> dict[str, float]:
        self.total[phase] += 1
        self.in_row[phase] += 1
        n = self.in_row[phase]
        self.log(f"step {step}: non-finite {what} in phase {phase!r}; update skipped ({n} in a row, {self.total[phase]} in this phase)")
        if n >= self.limit:
            raise NonFiniteError(f"stopping: {n} non-finite updates in a row (last: {what} in phase {phase!r}, network "
                                 f"{'/'.join(names)}); last good checkpoint: {last_checkpoint or 'none'}. Lower the learning "
                                 "rate or check the teacher and data.")
        return {f"{phase}/nonfinite": 1.0}
