"""Moved to :mod:`ctr.training.metrics`; this name stays for one release."""

from ctr.training.metrics import auc_logloss  # noqa: F401
