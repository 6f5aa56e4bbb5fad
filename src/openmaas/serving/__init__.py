"""Serving core: neutral request/response types, validation, and the residency pool."""
