"""Stop signals: SIGTERM/SIGINT finish the round, write a checkpoint and stop, on every DDP rank together."""

from __future__ import annotations

import signal

import torch


class StopSignal:
    """Catches SIGTERM/SIGINT (a second SIGINT kills at once); ``agreed`` all-reduces the flag each round."""

    def __init__(self, accelerator, log):
        self.accelerator, self.log, self.name = accelerator, log, None

    def install(self) -> None:
        def handler(signum, _frame):
            self.name = signal.Signals(signum).name
            self.log(f"{self.name}: writing a checkpoint at the end of this round (Ctrl-C again to abort)")
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass

    def restore(self) -> None:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:
            pass

    def agreed(self) -> bool:
        """Whether any rank got a stop signal this round (one all-reduce per round under DDP), so all stop together."""
        if self.accelerator.num_processes == 1:
            return bool(self.name)
        flag = torch.tensor([1.0 if self.name else 0.0], device=self.accelerator.device)
        stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if stop and not self.name:
            self.name = "a stop signal on another rank"
        return stop
