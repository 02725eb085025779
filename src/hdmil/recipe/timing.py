"""Seconds per recipe stage, for the report: ``with clock.timed("encoder"): ...``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["StageClock", "cpu_seconds"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (slide makers)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return time.process_time()
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class StageClock:
    """Wall-clock (``wall``) and CPU (``cpu``: all threads and slide-making processes) seconds of
    each finished stage, in the order the stages ran: the report's ``timings_s`` and ``cpu_s``."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage``; a block that raises records nothing (there is no report)."""
        t0, c0 = time.perf_counter(), cpu_seconds()
        yield
        self.wall[stage] = time.perf_counter() - t0
        self.cpu[stage] = cpu_seconds() - c0
