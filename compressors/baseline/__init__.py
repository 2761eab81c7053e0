"""The uncompressed baseline, ``full``."""

from compressors.baseline import full  # noqa: F401
