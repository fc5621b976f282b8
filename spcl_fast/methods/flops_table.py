"""Where ``python -m spcl_fast.methods.flops_table`` went: the table's command is
``python -m spcl_fast.run.flops_table`` and the counting is :mod:`spcl_fast.methods.train_flops`.
"""

if __name__ == "__main__":
    raise SystemExit("error: the FLOP table's command moved: python -m spcl_fast.run.flops_table")
