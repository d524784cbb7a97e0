"""oxigaf MLX backend (NHWC inside, NCHW at the interface)."""
