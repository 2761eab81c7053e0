"""Moved to :mod:`compressors.core.optim`; this name stays for one release."""

from compressors.core.optim import RowwiseAdagrad  # noqa: F401
