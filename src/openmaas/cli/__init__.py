"""The ``openmaas`` command line."""
