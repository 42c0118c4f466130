"""Weight quantization: what to quantize (recipe.py), the math of each scheme (any4.py, int4.py, nf4.py, int8.py),
nibble packing (pack.py), the on-disk format (format.py), calibration (calibrate.py) and the streaming driver
(quantize.py). The format is documented in docs/quantization.md.

This package's __init__ stays import-free: export/checkpoint.py imports export.quant.format (pure Python) to
validate quantized checkpoints without pulling in torch.
"""
