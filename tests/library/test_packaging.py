"""The wheel ships the licence that pyproject.toml declares."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_declared_licence_files_exist_and_are_mit():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    for name in project["license-files"]:
        assert (ROOT / name).read_text().startswith("MIT License")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_version_has_one_source():
    """pyproject.toml reads the version from pml_ice.__version__ instead of repeating it."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pml_ice.__version__"}
