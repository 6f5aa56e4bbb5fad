"""Model compression inside job workers: quantisation with ONNX Runtime's own tooling (pruning and distillation
are planned). Pure model-to-model transforms on folders and files; the compression job (``jobs/compress.py``)
measures the result through the serving path and registers it."""
