"""Development tools: a local anvil chain, the demo, signed load, contract artifacts."""
