"""pyproject.toml and environment.yml describe the same environment; torch is never a build requirement;
the code keeps to the oldest Python that pyproject.toml claims (3.10)."""
import ast
import re
import sys

import pytest
import yaml

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a dev dependency there)
    import tomli as tomllib

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


def test_files_named_in_environment_yml_exist(repo_root):
    named = re.findall(r"\b((?:tests|src|lessons_pkg|scripts)/[\w/.-]+\.\w+)", (repo_root / "environment.yml").read_text())
    assert named and [path for path in named if not (repo_root / path).exists()] == []


def test_code_parses_as_the_oldest_python_claimed(repo_root):
    claimed = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["requires-python"]
    oldest = tuple(int(n) for n in re.fullmatch(r">=\s*(\d+)\.(\d+)", claimed).groups())
    if sys.version_info[:2] == oldest:
        pytest.skip("running on the oldest claimed Python already: every import above is the real check")
    files = [p for folder in ("lessons_pkg", "src", "tests", "scripts") for p in (repo_root / folder).rglob("*.py")]
    failures = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            ast.parse(text, feature_version=oldest)
        except SyntaxError as error:
            failures.append(f"{path.relative_to(repo_root)}:{error.lineno}: {error.msg}")
        if re.search(r"^\s*import tomllib\s*$", text, re.M) and "import tomli as tomllib" not in text:
            failures.append(f"{path.relative_to(repo_root)}: imports tomllib (3.11+) without the tomli fallback")
    assert failures == [], "\n".join(failures)


def test_no_torch_in_build_requirements(repo_root):
    build = tomllib.loads((repo_root / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(_name(r) == "torch" for r in build), build
