"""Adapters that embed the engine in other x402 stacks (optional dependencies)."""
