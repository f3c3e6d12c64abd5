"""The x402 facilitator HTTP service: protocol logic, the ASGI app, metrics."""
