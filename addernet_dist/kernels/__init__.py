"""GPU (Triton) kernels and the CPU fast path, installed as ``addernet_dist.kernels``."""
