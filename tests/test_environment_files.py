"""The conda file and pyproject.toml pin the same packages, and torch is pinned to the CPU wheel."""
import re
import tomllib

import yaml

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


def test_the_peer_libraries_install_without_dependencies():
    # BackPACK requires torchvision, whose installation would replace the pinned torch.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "peers" in project["optional-dependencies"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\npeers:"):].split("\n\n")[0]
    assert "pip install --no-deps" in recipe and "['peers']" in recipe
