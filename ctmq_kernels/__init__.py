"""Triton kernels of ctmq: @triton.jit functions with their launchers.

Importing this package imports triton; ctmq.ops imports it lazily so that
`import ctmq` works without triton. Set TRITON_INTERPRET=1 before the first
import of triton to run these kernels on CPU tensors.
"""
