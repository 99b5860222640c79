"""Triton kernels for the fused MoEE ops, one op per module (kernel + launcher).

Installed as `moee_fast.kernels`; import the modules lazily, since each one imports triton.
"""
