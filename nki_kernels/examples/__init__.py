"""Example kernels that prove the emulator on real NKI idioms: tiled matmul, row softmax, RMSNorm."""
