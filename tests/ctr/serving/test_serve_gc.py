"""The server's collector settings: the heap frozen once ready, thawed and collected again
after a swap (so an old model's cycles are freed)."""

import gc
import weakref

from ctr.serving.http import reload


class _Node:
    pass


def test_a_settled_heap_is_frozen_and_a_settle_after_a_swap_collects_it():
    threshold = gc.get_threshold()
    try:
        node = _Node()
        node.self = node  # a cycle: only the cyclic collector frees it
        ref = weakref.ref(node)
        reload.settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == reload.GC_THRESHOLD
        del node
        gc.collect()
        assert ref() is not None, "a frozen object is never collected"
        reload.settle_gc(unfreeze=True)  # what a swap schedules
        assert ref() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        reload._settled = False
