"""The constraints files agree with pyproject.toml's ranges, and make_constraints.py's pieces work."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "constraints" / "cpu-py311.txt"
GPU = ROOT / "constraints" / "gpu-py312.txt"


def _script():
    spec = importlib.util.spec_from_file_location("make_constraints", ROOT / "scripts" / "make_constraints.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_constraints"] = mod
    spec.loader.exec_module(mod)
    return mod


def _pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][e]]
    return reqs


@pytest.mark.parametrize("path,extras", [(CPU, ("test",)), (GPU, ("test", "gpu"))], ids=["cpu", "gpu"])
def test_every_requirement_is_pinned_inside_its_range(path, extras):
    pins = _pins(path)
    for req in _requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{path.name} has no pin for {req}"
        assert req.specifier.contains(pins[name]), f"{path.name} pins {name}=={pins[name]}, outside {req}"
    assert canonicalize_name("dirl") not in pins


def test_lower_bounds_are_what_ci_runs():
    """A lower bound names the release CI runs (torch aside: its range admits LMDeploy's 2.12.1)."""
    pins = _pins(CPU)
    for req in _requirements("test"):
        name = canonicalize_name(req.name)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower, f"{req} has no lower bound"
        assert any(s.operator == "<" for s in req.specifier), f"{req} has no upper bound"
        if name != "torch":
            assert lower[0] == pins[name], f"{req}: CI runs {pins[name]}"


def test_gpu_file_differs_from_cpu_only_in_torch_and_what_the_gpu_extra_adds():
    cpu, gpu = _pins(CPU), _pins(GPU)
    assert cpu["torch"] == Version("2.13.0") and gpu["torch"] <= Version("2.12.1")
    assert gpu["lmdeploy"] == Version("0.18.0")
    assert {n: (v, gpu.get(n)) for n, v in cpu.items() if gpu.get(n) != v} == {"torch": (cpu["torch"], gpu["torch"])}


def test_render_drops_dirl_and_local_labels_and_sorts():
    mc = _script()
    pins = mc.pins_from_freeze("# Editable Git install\n-e /src/dirl\nZlib_x==1.0\ntorch==2.13.0+cpu\n"
                               "dirl==0.1.0\nfoo @ file:///tmp/foo.whl\naccelerate==1.15.0\n")
    text = mc.render(pins, ["header"])
    assert text == "# header\naccelerate==1.15.0\ntorch==2.13.0\nZlib_x==1.0\n"


def _item(name, version, requires=(), extras=None):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "requested_extras": extras}


ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "platform_release": "", "platform_version": "", "implementation_version": "3.12.3"}


def test_paper_check_finds_what_pip_check_would():
    mc = _script()
    ok = {"environment": ENV, "install": [
        _item("app", "1.0", ["lib>=2,<3", "win-only; sys_platform == 'win32'", "old; python_version < '3.11'",
                             "extra-dep; extra == 'fast'"]),
        _item("lib", "2.5", ["Zlib_X==1.*"]),
        _item("zlib-x", "1.2"),
    ]}
    assert mc.paper_check(ok) == []
    bad = {"environment": ENV, "install": [
        _item("app", "1.0", ["lib>=3", "extra-dep; extra == 'fast'"], extras=["fast"]),
        _item("lib", "2.5"),
    ]}
    problems = mc.paper_check(bad)
    assert len(problems) == 2
    assert "app 1.0 requires lib>=3, the set has 2.5" in problems
    assert any("extra-dep" in p and "not in the set" in p for p in problems)
