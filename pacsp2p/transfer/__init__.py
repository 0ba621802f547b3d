"""Moving instances: ingest (placement, quorum) and retrieval (plan, run, fail over)."""
