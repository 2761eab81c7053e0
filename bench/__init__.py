"""The benchmark sections that ``bench.py`` drives, one module per subject: ``common``
(cache, data, cached runs, tables), ``training``, ``preprocess``, ``lookups``, ``sweeps``
(protocol sweeps), ``search`` (pruning and dimension search), ``serving`` and its
``loadgen``."""
