"""The pipeline's stages: verify -> dedup -> intake (ingest) -> batch -> submit -> confirm,
one chain's stages joined in pipeline.py; /verify's chain-state reader; /settle's sales desk."""
