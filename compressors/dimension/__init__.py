"""Dimension search: fewer dims per field or frequency block (DNIS, MDE, AutoDim).

Shared pieces: frequency blocks and their index map (``blocks.py``), mixed-dimension
sub-tables, their exact byte counts, export and fbgemm serving (``mixed.py``).
"""

from compressors.dimension import autodim, dnis, mde  # noqa: F401
