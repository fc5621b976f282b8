"""``python -m spcl_fast.train ARGS`` with faults injected, for tests/test_train_kill.py::

    python tests/fault_driver.py FAULT[,FAULT...] -- ARGS...

Faults enter through public surfaces only (torch's functions, the data package's synthetic set,
``spcl_fast.ops.info_nce``), so the engine's internals can change freely:

* ``nan-batch:I`` image ``I`` of the synthetic training set is NaN (every batch holding it);
* ``nan-loss:S`` the loss of optimizer step ``S`` (0-based, counted in this process) is NaN;
* ``inf-grad:S`` one gradient entry of step ``S`` is infinite;
* ``slow-save:T`` every checkpoint write stops halfway for ``T`` seconds (a slow disk: the
  test kills the run inside the write);
* ``full-disk:K`` the ``K``-th checkpoint write (1-based) fails halfway with ENOSPC.

Optimizer steps are counted by ``torch.nn.utils.clip_grad_norm_`` calls (one per step, after
backward), which is where the injected gradient goes.
"""

from __future__ import annotations

import errno
import io
import runpy
import sys
import time

import torch


def _install(fault: str, state: dict) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "nan-batch":
        from spcl_fast.data.synthetic import SyntheticCXR

        images = SyntheticCXR.images

        def poisoned(self, start=0, stop=None):
            out = images(self, start, stop)
            if self.split == "train" and start <= int(arg) < start + len(out):
                out[int(arg) - start] = float("nan")
            return out

        SyntheticCXR.images = poisoned
    elif kind == "nan-loss":
        import spcl_fast.ops  # the methods bind spcl_fast.ops.info_nce when first imported

        loss = spcl_fast.ops.info_nce

        def nan_loss(*args, **kwargs):
            value = loss(*args, **kwargs)
            return value * float("nan") if state["step"] == int(arg) else value

        spcl_fast.ops.info_nce = nan_loss
    elif kind == "inf-grad":
        clip = state["clip"]

        def inf_grad(parameters, *args, **kwargs):
            parameters = list(parameters)
            if state["step"] == int(arg):
                next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = float("inf")
            return clip(parameters, *args, **kwargs)

        state["clip"] = inf_grad
    elif kind in ("slow-save", "full-disk"):
        save = torch.save

        def faulty_save(obj, f, *args, **kwargs):
            if not str(f).endswith(".pt.tmp"):
                return save(obj, f, *args, **kwargs)
            state["saves"] += 1
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                if kind == "full-disk" and state["saves"] == int(arg):
                    raise OSError(errno.ENOSPC, "No space left on device", str(f))
                if kind == "slow-save":
                    time.sleep(float(arg))
                out.write(data[len(data) // 2:])
            return None

        torch.save = faulty_save
    else:
        raise SystemExit(f"fault_driver: unknown fault {fault!r}")


def main() -> None:
    faults, sep, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--", "usage: fault_driver.py FAULTS -- ARGS"
    state = {"step": 0, "saves": 0, "clip": torch.nn.utils.clip_grad_norm_}
    for fault in filter(None, faults.split(",")):
        _install(fault, state)

    def counting_clip(*a, **k):
        try:
            return state["clip"](*a, **k)
        finally:
            state["step"] += 1

    torch.nn.utils.clip_grad_norm_ = counting_clip
    sys.argv = ["spcl_fast.train", *args]
    runpy.run_module("spcl_fast.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
