"""pyproject.toml, environment.yml and qadapter_utils.env.PINNED must name the same pinned stack."""
import re
import tomllib
from pathlib import Path

from qadapter_utils import env

ROOT = Path(__file__).resolve().parents[1]


def _requirement_map(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*((?:==|>=|~=|<=|<|>).+)?\s*", line)
        if m:
            out[m.group(1).lower()] = (m.group(2) or "").strip()
    return out


def _pyproject():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["dev"])
    return _requirement_map(deps)


def _environment_yml():
    import yaml  # PyYAML comes with datasets

    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e ." in pip, "environment.yml must install qadapter_utils itself"
    return _requirement_map(line for line in pip if line != "-e .")


def test_environment_yml_and_pyproject_agree():
    py, conda = _pyproject(), _environment_yml()
    assert set(py) == set(conda), f"packages differ: {set(py) ^ set(conda)}"
    for name, spec in py.items():
        if name == "torch":  # open in pyproject (Colab keeps its CUDA torch); the CI build is pinned in conda
            assert conda[name] == f"=={env.PINNED['torch']}"
            continue
        assert conda[name] == spec, f"{name}: pyproject {spec!r} vs environment.yml {conda[name]!r}"


def test_pins_match_env_report():
    py = _pyproject()
    for name, version in env.PINNED.items():
        if name == "torch":
            continue
        assert py[name] == f"=={version}", f"{name}: pyproject {py[name]!r}, env.PINNED {version!r}"


def test_makefile_installs_the_pinned_cpu_torch():
    assert f"torch=={env.PINNED['torch']}" in (ROOT / "Makefile").read_text()


def test_installed_stack_matches_pins():
    assert env.version_warnings() == []


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
