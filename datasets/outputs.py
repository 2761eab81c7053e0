"""Moved to :mod:`datasets.io`; this name stays for one release."""

from datasets.io import (  # noqa: F401
    OutputExistsError,
    check_output_dir,
    only_names,
    refuse_current_dir,
    replace_dir,
)
