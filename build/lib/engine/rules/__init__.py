"""Rules without I/O: batching policy and schedules, the credit book, fees, health, reason codes."""
