"""Batch NLP jobs: a durable job queue with idempotent results, and the OpenAI Batch API on top."""
