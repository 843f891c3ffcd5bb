"""Progress of a loop over batches (training epochs, prediction passes): a tqdm bar when stderr is a terminal; where
it is not (a log file under nohup or SLURM, a notebook cell's captured output, the --gpus children's logs), a line
on stdout, with the run's other log lines, after the first step and then every tracking.progress_seconds, with
images/s and the share of the time spent waiting for the input pipeline, so a slow or stuck run shows in its log.
stderr keeps only errors, each on one line."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm


class StepProgress:
    def __init__(self, total: int, desc: str, every_s: float, terminal: Optional[TextIO] = None,
                 log: Optional[TextIO] = None):
        self.total, self.desc, self.every_s = total, desc, every_s
        terminal = terminal or sys.stderr
        self.log = log or sys.stdout
        self.bar = tqdm(total=total, desc=desc, leave=False, file=terminal) if terminal.isatty() else None
        self.started = self.last_line = time.perf_counter()
        self.steps = self.images = 0
        self.notes: dict[str, str] = {}

    def note(self, **values: str) -> None:
        """Values shown beside the counts (the loss, the learning rate), on the bar or in the next line."""
        self.notes.update(values)
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, images: int, waited: float) -> None:
        """One more step of `images` images; `waited`: the seconds spent so far waiting for input."""
        self.steps += 1
        self.images += images
        if self.bar is not None:
            self.bar.update()
            return
        now = time.perf_counter()
        if self.every_s and (self.steps == 1 or now - self.last_line >= self.every_s):
            self.last_line = now
            print(self.line(now - self.started, waited), file=self.log, flush=True)

    def line(self, elapsed: float, waited: float) -> str:
        notes = "".join(f", {key} {value}" for key, value in self.notes.items())
        share = 100 * waited / elapsed if elapsed else 0.0
        return (f"{self.desc}: step {self.steps}/{self.total}, {self.images / elapsed:,.1f} images/s, input pipeline "
                f"{share:.0f}% of the time, {elapsed:,.0f}s{notes}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
