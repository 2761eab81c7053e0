"""``ctr serve``: an artifact behind HTTP, one module per job.

``requests`` (parsing and validating a request), ``models`` (loading the served artifact and
its forward), ``batcher`` (micro-batching), ``reload`` (hot swap), ``metrics`` (Prometheus),
``config`` (:class:`~ctr.serving.http.config.ServeConfig`, no torch) and ``app`` (the
Starlette app, :func:`~ctr.serving.http.app.serve` and its worker processes).
"""
