"""The model registry: models, immutable versions, signatures and model cards."""
