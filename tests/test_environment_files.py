"""The conda file and pyproject.toml pin the same packages; the Python they need and the torch build each
installs are stated, not left to chance."""
import os
import platform
import re
import shutil
import subprocess
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from common.paths import REPO_ROOT


def _normalise(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name.strip().lower())}=={version.strip()}"


# Installed on their own without dependencies (`make peers`), never by the environment files
SEPARATE_EXTRAS = {"peers"}


def test_environment_yml_and_pyproject_agree():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    from_pyproject = {_normalise(r) for r in project["dependencies"]}
    for name, extra in project["optional-dependencies"].items():
        if name not in SEPARATE_EXTRAS:
            from_pyproject |= {_normalise(r) for r in extra}

    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    from_conda = {_normalise(r) for r in pip_section if not r.startswith("-")}
    assert "-e ." in pip_section
    assert from_conda == from_pyproject


def test_every_requirement_is_pinned_and_torch_is_the_cpu_wheel_version():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for e in project["optional-dependencies"].values() for r in e]
    assert all("==" in r for r in requirements), requirements
    assert "torch==2.13.0" in requirements
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert '"torch==2.13.0"' in makefile, "the Makefile must install the pinned torch before anything pulls another"


def _lowest_python(specifier: str | None) -> tuple[int, int]:
    """The lowest Python 3.x release a Requires-Python specifier admits."""
    allowed = SpecifierSet(specifier or "")
    return next((3, minor) for minor in range(6, 30) if f"3.{minor}" in allowed)


def test_requires_python_is_the_highest_minimum_of_the_pinned_packages():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = [r.partition("==")[0] for r in project["dependencies"]]
    needed = max(_lowest_python(metadata.metadata(name).get("Requires-Python")) for name in pins)
    assert _lowest_python(project["requires-python"]) == needed
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert f"python={needed[0]}.{needed[1]}" in env["dependencies"]


def _make_env_commands(tmp_path, with_nvidia_smi: bool) -> str:
    """The commands `make env` would run, with a PATH that holds uname and, optionally, an nvidia-smi."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / f"bin-{with_nvidia_smi}"
    bin_dir.mkdir()
    os.symlink(shutil.which("uname"), bin_dir / "uname")
    if with_nvidia_smi:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_PIP_ARGS"} | {"PATH": str(bin_dir)}
    return subprocess.run([make, "-n", "env", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout


def test_make_env_takes_the_cpu_build_of_torch_on_linux_without_a_gpu(tmp_path):
    cpu_index = "--extra-index-url https://download.pytorch.org/whl/cpu"
    torch_line = next(line for line in _make_env_commands(tmp_path, False).splitlines() if '"torch==2.13.0"' in line)
    assert (cpu_index in torch_line) == (platform.system() == "Linux"), torch_line
    torch_line = next(line for line in _make_env_commands(tmp_path, True).splitlines() if '"torch==2.13.0"' in line)
    assert cpu_index not in torch_line, "with a GPU, PyPI's default (CUDA) build"
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert cpu_index in pip_section, "environment.yml states which build it installs"


def test_the_peer_libraries_install_without_dependencies():
    # BackPACK requires torchvision, whose installation would replace the pinned torch.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "peers" in project["optional-dependencies"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\npeers:"):].split("\n\n")[0]
    assert "pip install --no-deps" in recipe and "['peers']" in recipe
