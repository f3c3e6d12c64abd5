"""Garbage-collector settings for a process whose main job is the engine.

CPython's full collections scan every tracked object; with hundreds of thousands of live
payments they pause the trio thread for tens of milliseconds, which is most of the
acknowledgement tail (measured: p99 at 3,000 payments/s offered fell from about 55 ms to about
20 ms). The engine's own records are untracked Structs; :func:`tuned_gc` also makes young
collections rarer and moves everything allocated during start-up out of the collector's sight.
It is process-wide, so the CLI uses it; an embedding application decides for itself.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def tuned_gc(gen0_threshold: int = 50_000) -> Iterator[None]:
    """Enter once start-up is done (engine open, workload in memory); leaving restores the
    collector's settings and lets it see the frozen objects again (so they are freed)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, max(before[1], 50), max(before[2], 100))
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
