"""Garbage-collector settings for a process whose main job is the engine.

CPython's full collections scan every tracked object; with hundreds of thousands of live
payments they pause the trio thread for tens of milliseconds, which is most of the
acknowledgement tail (measured: p99 at 3,000 payments/s offered fell from about 55 ms to about
20 ms). The engine's own records are untracked Structs; this also makes young collections rarer
and moves everything allocated during start-up out of the collector's sight. Process-wide, so
the CLI calls it; an embedding application decides for itself.
"""

from __future__ import annotations

import gc


def tune_gc(gen0_threshold: int = 50_000) -> None:
    """Call once start-up is done (configuration loaded, engine open, workload in memory)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, max(gen1, 50), max(gen2, 100))
