"""Entities shared by several layers (base level: they import nothing else of OpenMaaS).

``tensors``: datatypes, tensor specs and signatures; ``models``: models, versions and cards; ``tables``: the
parsed table that datasets produce and training reads; ``generation`` and ``speech``: what runtimes hand back.
"""
