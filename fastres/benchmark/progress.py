"""The progress bar of `python -m fastres bench` and `tune`."""

from __future__ import annotations

import sys
import time


class Progress:
    """A small progress bar on stderr: `[####......] 3/12  1m02s  resnet50 train eager-cl`.

    On a terminal it redraws one line; otherwise (logs, CI) it prints one line per step.
    """

    def __init__(self, total: int, width: int = 24, stream=None):
        self.total, self.width = max(total, 1), width
        self.stream = sys.stderr if stream is None else stream
        self.completed = 0
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, label: str) -> str:
        filled = self.width * self.completed // self.total
        elapsed = int(time.perf_counter() - self.start)
        bar = "#" * filled + "." * (self.width - filled)
        return (
            f"[{bar}] {self.completed}/{self.total}  {elapsed // 60}m{elapsed % 60:02d}s  {label}"
        )

    def show(self, label: str) -> None:
        """Shows what is running now (without advancing)."""
        if self.tty:
            self.stream.write("\r\033[K" + self._line(label))
        else:
            self.stream.write(self._line(label) + "\n")
        self.stream.flush()

    def advance(self, label: str = "") -> None:
        """Counts one more step as completed; on a terminal, redraws the bar with `label`."""
        self.completed = min(self.completed + 1, self.total)
        if self.tty:
            self.show(label)

    def finish(self) -> None:
        """Ends the bar with a last line, labelled 'done'."""
        if self.tty:
            self.stream.write("\r\033[K" + self._line("done") + "\n")
        else:
            self.stream.write(self._line("done") + "\n")
        self.stream.flush()
