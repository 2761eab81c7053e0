"""Result packaging and analysis: ``python -m scripts.<name> --help`` from the repository root."""
