"""Progress lines of a running evaluation: rows done / total per method, throughput, ETA."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable


class Progress:
    """Counts finished rows per method and prints a line at most every ``interval_s`` seconds.

    Args:
        totals: rows expected per method (in display order).
        done: rows already finished before this run (resume), per method.
        interval_s: minimum seconds between two lines.
        log: where lines go (``print`` by default; flushes).
    """

    def __init__(
        self,
        totals: dict[str, int],
        done: dict[str, int] | None = None,
        *,
        interval_s: float = 5.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.totals = dict(totals)
        self.done = Counter({m: 0 for m in totals}) + Counter(done or {})
        self.errors = 0
        self.new = 0
        self.interval_s = interval_s
        self.log = log or (lambda line: print(line, flush=True))
        self.started = time.monotonic()
        self._last = 0.0
        self._reported: int | None = None

    def update(self, methods: Iterable[str], errors: Iterable[str] = ()) -> None:
        """Record finished rows (their method names and error strings)."""
        methods = list(methods)
        self.done.update(methods)
        self.new += len(methods)
        self.errors += sum(1 for e in errors if e)
        self.maybe_report()

    def line(self) -> str:
        """The current progress line."""
        total, done = sum(self.totals.values()), sum(self.done[m] for m in self.totals)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.new / elapsed
        remaining = total - done
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        per_method = " | ".join(f"{m} {self.done[m]}/{t}" for m, t in self.totals.items())
        pct = 100.0 * done / total if total else 100.0
        return (
            f"progress: {done}/{total} ({pct:.0f}%) | {per_method} | {rate:.2f} rows/s"
            f" | errors {self.errors} | elapsed {elapsed:.0f}s | eta {eta}"
        )

    def maybe_report(self, force: bool = False) -> None:
        """Print the line if ``interval_s`` has passed since the last one, or if forced and
        rows finished since the last line."""
        now = time.monotonic()
        if (force and self._reported != self.new) or now - self._last >= self.interval_s:
            self._last, self._reported = now, self.new
            self.log(self.line())
