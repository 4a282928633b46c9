"""Quantized weights: one exchange format (qtensor.py), readers of the formats that produce it (GGUF blocks), and
the linear-layer weight that runs it (cpu_weight.py)."""
