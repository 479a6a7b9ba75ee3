"""The version lives in one place, ``canaryd.__version__``; the copies that cannot import it are checked here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

import canaryd

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "canaryd.__version__"}


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "canaryd" / "Chart.yaml").read_text())
    assert chart["appVersion"] == canaryd.__version__
