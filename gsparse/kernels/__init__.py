"""Pallas kernels for gsparse.

`gsparse.kernels.sparse_gather` holds the sparse-gather attention kernels
(token- and block-level, GPU/Triton and TPU/Mosaic variants) behind
`gsparse.sparse_gather_attention(..., implementation="pallas")`.
"""
