"""Offline batch inference: the OpenAI Files and Batches API over the online serving path."""
