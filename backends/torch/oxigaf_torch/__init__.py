"""oxigaf PyTorch backend (NCHW)."""
