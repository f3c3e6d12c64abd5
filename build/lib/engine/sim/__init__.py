"""Deterministic, seeded simulation of a hostile chain for fault campaigns (VOPR-style):
:class:`FakeChain` answers the engine's :class:`~engine.chain.rpc.ChainClient` in process, and
:mod:`engine.sim.campaign` runs the real engine against it, seed after seed."""

from __future__ import annotations

from .fakechain import FakeChain, Faults

__all__ = ["FakeChain", "Faults"]
