"""Moved to :mod:`ctr.training.resources`; this name stays for one release.

The name is the moved module itself (not a copy of its names), so that patching
``ctr.resources.available_memory_bytes`` still reaches the code that reads it.
"""

import sys

from ctr.training import resources as _moved

sys.modules[__name__] = _moved
