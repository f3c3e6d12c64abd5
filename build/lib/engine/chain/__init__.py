"""Talking to a chain: JSON-RPC (and the narrow ChainClient interface), calldata and log
codecs, EIP-712 crypto, transaction signing."""
