"""Feature specs the compressor tests share."""

from __future__ import annotations

from compressors import FeatureSpec
from datasets.synthetic import SyntheticConfig


def criteo_features() -> list[FeatureSpec]:
    """The default synthetic data's 26 fields: Criteo Kaggle sizes x 0.01 (min 32), + OOV."""
    sizes = SyntheticConfig().field_sizes()
    return [FeatureSpec(f"C{i + 1}", n + 1) for i, n in enumerate(sizes)]
