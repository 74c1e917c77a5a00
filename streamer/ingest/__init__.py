"""Ingest: sources, sampling, clips, bounded queues and the per-stream supervisor."""
