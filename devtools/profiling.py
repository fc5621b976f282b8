"""Memory measurement shared by the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU allocator bytes while ``fn()`` runs, from the profiler's allocation
    events (``torch.cuda.max_memory_allocated`` has no CPU counterpart).

    Example::

        >>> import torch
        >>> peak_cpu_bytes(lambda: torch.empty(1024, dtype=torch.uint8)) >= 1024
        True
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))  # frees are negative
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
