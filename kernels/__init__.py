"""Triton kernels and their launchers (installed as ``spcl_fast.kernels``).

Each op module holds ``@triton.jit`` kernels and ``<op>_fwd`` / ``<op>_bwd`` launchers that
allocate outputs, size the grid and launch; no autograd and no validation live here
(``spcl_fast.ops`` does both). ``_common`` holds what the launchers share (dot precision,
allocation, autotuning switch, the launch call); ``aot`` compiles every config the launchers
can choose for GPU targets without a GPU (``python -m spcl_fast.kernels.aot``).
"""
