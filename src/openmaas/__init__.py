"""OpenMaaS: a self-hosted model-as-a-service platform."""

__version__ = "0.1.0"
