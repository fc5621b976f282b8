"""``python -m spcl_fast.flops``: the training-FLOPs table (see :func:`spcl_fast.flops.main`)."""

from . import main

main()
