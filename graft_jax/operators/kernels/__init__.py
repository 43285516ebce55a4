"""Backend-specific kernels (Pallas) behind the operators' `backend` and `ssd_kernel` options; each has an XLA twin it
is tested against.

They run on CPU through Pallas interpret mode (`interpret=True`), which is how the tests check their numerics. The
TPU kernels (causal_conv, splash) have not been compiled or timed on TPU hardware yet; the GPU one (ssd, Triton)
has, on an H200.
"""
