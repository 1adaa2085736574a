"""Load generator for any OpenAI-compatible server and for the batch-job queue."""
