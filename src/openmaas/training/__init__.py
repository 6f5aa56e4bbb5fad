"""Training code run inside jobs (never in the serving process)."""
