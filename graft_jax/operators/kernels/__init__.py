"""Backend-specific kernels (Pallas) behind the operators' `backend` option; each has an XLA twin it is tested against.

They run on CPU through Pallas interpret mode (`interpret=True`), which is how the tests check their numerics without
a TPU. Their TPU compilation (Mosaic's layout rules) and speed have not been measured on TPU hardware yet.
"""
