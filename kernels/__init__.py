"""Triton kernels and their launchers (installed as ``spcl_fast.kernels``).

Each module holds ``@triton.jit`` kernels and ``<op>_fwd`` / ``<op>_bwd`` launchers that
allocate outputs, size the grid and launch; no autograd and no validation live here
(``spcl_fast.ops`` does both).
"""
