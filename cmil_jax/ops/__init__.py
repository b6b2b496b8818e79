"""Custom CPU kernels for XLA: oneDNN convolutions and BatchNorm (onednn.py)."""
