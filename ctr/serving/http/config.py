"""A server's limits, batching and serving options: :class:`ServeConfig`.

Light on purpose (no torch): ``ctr serve``'s flags take their defaults from these fields.

Serving options are generic: ``serving_options`` maps ``<kind>.<option>`` to a value, passed to
the serving module of artifacts of that export kind (the method's name for ``binary``), e.g.
``{"binary.decode": "auto"}`` (``--serving-opt binary.decode=auto``). The accepted keys are the
keyword parameters of the registered serving modules (:func:`serving_option_keys`); options for
another kind than the served artifact's are ignored, as ``compressors.build_serving`` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

MiB = 1 << 20


@dataclass
class ServeConfig:
    """Limits and batching of one server."""

    max_batch: int = 4096
    # 0: a batch is what queued while the previous forward ran; > 0 waits for fuller batches
    max_delay_ms: float = 0.0
    max_body_bytes: int = 8 * MiB
    max_rows: int = 16384
    max_queue_rows: int = 65536
    poll_s: float = 2.0
    # server processes on the one port (see ``serve``)
    workers: int = 1
    # "<kind>.<option>" -> value, e.g. binary.decode: "bits" (the default) holds exactly the
    # artifact's bytes (serve_bytes); "auto", "planes" and "rows" serve through fbgemm rows,
    # faster and larger (resident_bytes).
    serving_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_rows", "max_queue_rows", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_delay_ms < 0 or self.poll_s < 0:
            raise ValueError("--max-delay-ms and --poll-s must not be negative")
        if self.max_rows > self.max_queue_rows:
            # A request larger than the queue could never be accepted.
            raise ValueError(
                f"--max-rows ({self.max_rows}) must not exceed --max-queue-rows "
                f"({self.max_queue_rows})"
            )
        if self.serving_options:
            accepted = serving_option_keys()
            for key in self.serving_options:
                if key not in accepted:
                    raise ValueError(
                        f"--serving-opt {key}: unknown serving option; accepted: "
                        + (", ".join(accepted) or "none")
                    )

    def module_options(self) -> dict[str, dict[str, str]]:
        """The options as ``build_serving`` takes them: kind -> {option: value}."""
        nested: dict[str, dict[str, str]] = {}
        for key, value in self.serving_options.items():
            kind, option = key.split(".", 1)
            nested.setdefault(kind, {})[option] = value
        return nested


def parse_serving_options(items: list[str] | None) -> dict[str, str]:
    """Repeated ``--serving-opt`` values, ``["binary.decode=auto"]`` ->
    ``{"binary.decode": "auto"}``; the keys are checked by :class:`ServeConfig`."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key or not value:
            raise ValueError(
                f"--serving-opt {item!r}: expected <kind>.<option>=<value>, e.g. binary.decode=auto"
            )
        options[key.strip()] = value.strip()
    return options


def serving_option_keys() -> list[str]:
    """Every ``<kind>.<option>`` a registered serving module accepts (its keyword parameters
    after the exported embedding), sorted."""
    import compressors  # noqa: F401 - registers every serving module
    from compressors.core.registry import SERVING

    keys = []
    for kind, module in SERVING.items():
        params = list(inspect.signature(module).parameters.values())[1:]
        keys += [
            f"{kind}.{p.name}"
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    return sorted(keys)
