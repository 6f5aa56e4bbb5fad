"""Datasets: uploaded training data, validated at upload and stored content-addressed."""
