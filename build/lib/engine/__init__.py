"""x402 batch settlement engine.

Embed it in a trio program with :class:`Engine` (``async with Engine.open(config) as engine``),
or in any other program with the thread-safe :class:`EngineHandle`.
"""

from __future__ import annotations

from .clock import Clock, TrioWallClock
from .config import ConfigError, EngineConfig, load_config
from .engine import Engine
from .gctune import tuned_gc
from .handle import EngineHandle
from .model import Accepted, ChainMismatch, EngineError, Outcome, Rejected, SettleAnswer
from .outcomes import Statistics

__all__ = [
    "Accepted",
    "ChainMismatch",
    "Clock",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineHandle",
    "Outcome",
    "Rejected",
    "SettleAnswer",
    "Statistics",
    "TrioWallClock",
    "load_config",
    "tuned_gc",
]
