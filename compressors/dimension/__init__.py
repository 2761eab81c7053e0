"""Dimension search: fewer dims per field or frequency block (DNIS, MDE, AutoDim)."""
