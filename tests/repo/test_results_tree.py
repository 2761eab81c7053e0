"""results/ holds summaries only: each sweep's README and report, under 1 MB in all.

The cells (every run's config and result) live on the ``results-archive`` branch and the
scripts that package them in ``scripts/``; this keeps them from drifting back."""

from pathlib import Path

from tests.helpers import ROOT

RESULTS = ROOT / "results"
LIMIT_BYTES = 1_000_000


def _files() -> list[Path]:
    return [p for p in RESULTS.rglob("*") if p.is_file()]


def test_results_under_one_megabyte():
    total = sum(p.stat().st_size for p in _files())
    largest = sorted(_files(), key=lambda p: p.stat().st_size)[-3:]
    assert total < LIMIT_BYTES, (
        f"results/ holds {total:,} bytes (limit {LIMIT_BYTES:,}); largest: "
        + ", ".join(f"{p.relative_to(RESULTS)} {p.stat().st_size:,}" for p in largest)
        + "; cells and raw outputs go to the results-archive branch"
    )


def test_results_has_no_cells_or_code():
    cells = [p.relative_to(RESULTS) for p in RESULTS.rglob("cells") if p.is_dir()]
    code = [p.relative_to(RESULTS) for p in _files() if p.suffix in {".py", ".sh"}]
    assert not cells, f"cell directories belong on the results-archive branch: {cells}"
    assert not code, f"scripts belong in scripts/ (paths as arguments): {code}"


def test_each_folder_has_readme_and_report():
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        assert (folder / "README.md").is_file(), f"{folder.name}/: no README.md"
        assert (folder / "report" / "summary.md").is_file(), f"{folder.name}/: no report/"
        for png in (folder / "report").glob("*.png"):
            readme = (folder / "README.md").read_text()
            assert "python -m scripts.package_sweep" in readme, (
                f"{png.relative_to(RESULTS)}: its README gives no command that regenerates it"
            )
