"""pyproject.toml and environment.yml describe the same environment; torch is never a build requirement."""
import re
import tomllib

import yaml

from packaging.requirements import Requirement


def _name(spec: str) -> str:
    return Requirement(spec).name.lower().replace("_", "-")


def test_environment_yml_agrees_with_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = {_name(s): str(Requirement(s).specifier) for s in
                project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = {_name(s): str(Requirement(s).specifier) for s in pip_section if not s.startswith("-e")}
    assert set(conda) == set(declared), f"only in environment.yml: {set(conda) - set(declared)}, " \
                                        f"only in pyproject.toml: {set(declared) - set(conda)}"
    for name, spec in declared.items():
        if name == "torch":
            continue  # pyproject allows a range; environment.yml pins what `make setup` installs
        assert conda[name] == spec, f"{name}: environment.yml says {conda[name]!r}, pyproject.toml {spec!r}"


def test_torch_pin_matches_makefile(repo_root):
    env = (repo_root / "environment.yml").read_text()
    make = (repo_root / "Makefile").read_text()
    pinned = re.search(r"torch==([\d.]+)", env).group(1)
    assert f"TORCH_SPEC ?= torch=={pinned}" in make


def test_no_torch_in_build_requirements(repo_root):
    build = tomllib.loads((repo_root / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(_name(r) == "torch" for r in build), build
