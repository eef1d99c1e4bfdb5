"""The package layout: ``strategies/`` and ``scenarios/`` ship as ``fedcl_dd.strategies`` and
``fedcl_dd.scenarios`` (setuptools package-dir), both in the editable install and in a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedcl_dd", "fedcl_dd.strategies", "fedcl_dd.scenarios")

# Run in a child interpreter: prints where each package was imported from, as JSON.
_LOCATE = (
    "import importlib, json, sys; "
    f"print(json.dumps({{m: list(importlib.import_module(m).__path__) for m in {PACKAGES!r}}}))"
)

# Prints the install's direct_url.json (PEP 610; says whether it is editable), null if absent.
_DIRECT_URL = """
import importlib.metadata as md
try:
    print(md.distribution("fedcl-dd").read_text("direct_url.json") or "{}")
except md.PackageNotFoundError:
    print("null")
"""


def _run(args: list[str], cwd: Path) -> str:
    # Without PYTHONPATH: Flower's Ray backend sets it in-process (an earlier test on the same
    # xdist worker), and pip would then find the repo's fedcl_dd "already installed".
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_pyproject_maps_folders_into_the_package() -> None:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["fedcl_dd.strategies"] == "strategies"
    assert config["package-dir"]["fedcl_dd.scenarios"] == "scenarios"
    assert set(PACKAGES) <= set(config["packages"])


def test_editable_install_resolves_to_repo_folders(tmp_path: Path) -> None:
    # Both lookups run in a child started outside the repo: from the repo root, the
    # fedcl_dd.egg-info that setuptools leaves there would shadow the installed metadata,
    # and the fedcl_dd/ folder would import without any install at all.
    direct_url = json.loads(_run([sys.executable, "-I", "-c", _DIRECT_URL], cwd=tmp_path))
    if direct_url is None:
        pytest.skip("fedcl-dd is not installed; run `pip install -e .`")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("fedcl-dd is not installed in editable mode (`pip install -e .`)")
    found = json.loads(_run([sys.executable, "-I", "-c", _LOCATE], cwd=tmp_path))
    assert [Path(p) for p in found["fedcl_dd"]] == [REPO / "fedcl_dd"]
    assert [Path(p) for p in found["fedcl_dd.strategies"]] == [REPO / "strategies"]
    assert [Path(p) for p in found["fedcl_dd.scenarios"]] == [REPO / "scenarios"]


def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    # Build from a copy so the build's own droppings (build/, *.egg-info) stay out of the repo.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".cache",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            "runs",
            "out",
            ".whl",
            ".gl",
        ),
    )
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("fedcl_dd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedcl_dd/strategies/__init__.py" in names and "fedcl_dd/scenarios/__init__.py" in names
    assert not any(n.startswith(("strategies/", "scenarios/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    candidates = (venv / "bin" / "python", venv / "Scripts" / "python.exe")
    python = next(p for p in candidates if p.exists())
    # pip --python installs into the fresh interpreter without pip having to live there.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=tmp_path,
    )
    paths = json.loads(
        _run(
            [
                str(python),
                "-c",
                "import json, sysconfig; print(json.dumps("
                "{k: sysconfig.get_path(k) for k in ('purelib', 'scripts')}))",
            ],
            cwd=tmp_path,
        )
    )
    site_packages, scripts = Path(paths["purelib"]), Path(paths["scripts"])
    # Dependencies come from this interpreter's site-packages, appended after the fresh one
    # (a .pth line adds a folder without running its own .pth files, so the editable finder
    # installed here stays out of the fresh venv).
    import site

    (site_packages / "_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    found = json.loads(_run([str(python), "-I", "-c", _LOCATE], cwd=tmp_path))
    for module, locations in found.items():
        assert [Path(p) for p in locations] == [site_packages.joinpath(*module.split("."))], module
    assert any((scripts / name).is_file() for name in ("fedcl-dd", "fedcl-dd.exe"))
    entry = _run(
        [
            str(python),
            "-I",
            "-c",
            "from importlib.metadata import entry_points; "
            "print(entry_points(group='console_scripts')['fedcl-dd'].value)",
        ],
        cwd=tmp_path,
    )
    assert entry.strip() == "fedcl_dd.cli:main"


@pytest.mark.parametrize("dist", ["flwr", "avalanche-lib"])
def test_the_installed_frameworks_are_in_the_declared_range(dist: str) -> None:
    """The suite runs against the framework release the extras admit (Flower 1.41 and 1.42 are
    both admitted; a fresh install takes the newest), so a pass here is a pass on that release."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    declared = [
        Requirement(r) for reqs in extras.values() for r in reqs if Requirement(r).name == dist
    ]
    assert declared, f"{dist} is not declared in an extra"
    version = md.version(dist)
    assert all(r.specifier.contains(version) for r in declared), (version, declared)
