"""Backend-specific kernels (Pallas) behind the operators' `backend`, `ssd_kernel` and `gelu_kernel` options; each
has an XLA twin it is tested against.

The TPU kernels (causal_conv, splash) and the Triton one (ssd) run on CPU through Pallas interpret mode
(`interpret=True`), which is how the tests check their numerics; the TPU ones have not been compiled or timed on TPU
hardware yet, ssd has, on an H200. The Mosaic GPU one (dense_gelu, Hopper wgmma) has no interpret mode here: the
tests check that it lowers and that differentiated calls take its XLA rule; its numbers come from the H200
(benchmarks/dense_gelu.py).
"""
