#!/usr/bin/env python3
"""Write a pip constraints file: the exact version of every package an install of dirl holds.

    python scripts/make_constraints.py                      # fresh venv, newest releases in pyproject's ranges
    python scripts/make_constraints.py --venv .venv         # what an existing venv holds
    python scripts/make_constraints.py --report gpu.json -o constraints/gpu-py312.txt
                                                            # what a `pip install --dry-run --report` resolved
    python scripts/make_constraints.py --check .venv constraints/cpu-py311.txt
                                                            # exit 1 unless the venv holds exactly those
    python scripts/make_constraints.py --gpu --gpu-python python3.12 -o constraints/gpu-py312.txt
                                                            # the GPU install resolved on paper (below)

With no --venv/--report it makes a new virtual environment in a temporary folder, installs dirl
there with `DIRL_CONSTRAINTS=none bash scripts/install.sh` (torch first and alone, then the newest
releases pyproject.toml's ranges admit) and freezes it. dirl itself is left out, and so is a local
version label (`torch==2.13.0+cpu` is written `torch==2.13.0`, which the CPU wheel satisfies).
The default output is constraints/cpu-py<major><minor>.txt for the Python that runs the install.

--gpu resolves `dirl[gpu,test]` for a CUDA machine without installing anything: `pip install
--dry-run --report` run by a CPython of the GPU image's version (--gpu-python, so environment markers
are evaluated for it), binary wheels only, for manylinux x86_64, with the CPU constraints except
torch (LMDeploy 0.18.0 needs torch<=2.12.1), reading each wheel's metadata by HTTP range requests
(pip's fast-deps) so that no multi-GB CUDA wheel is downloaded. deepspeed is published only as a
source archive: it is built here first (a pure-Python wheel, as every install builds it) and offered
with --find-links. The resolved set is then checked on paper as `pip check` would check it: every
requirement of every package, markers evaluated for that interpreter, satisfied within the set.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = "dirl"
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_freeze(text: str) -> dict[str, str]:
    """``name -> version`` from ``pip freeze`` output; editable, VCS and path lines are skipped."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        m = _NAME.match(line)
        if not m:  # comments, "-e ...", "name @ file://..."
            continue
        pins[m.group(1)] = m.group(2)
    return pins


def pins_from_report(path: Path) -> dict[str, str]:
    """``name -> version`` from the JSON of ``pip install --dry-run --report``."""
    data = json.loads(path.read_text())
    pins = {}
    for item in data.get("install", []):
        meta = item["metadata"]
        pins[meta["name"]] = meta["version"]
    return pins


def render(pins: dict[str, str], header: list[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    for name in sorted(pins, key=canonical):
        if canonical(name) == SELF:
            continue
        version = pins[name].split("+", 1)[0]  # drop a local label such as +cpu
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def freeze(python: Path) -> str:
    return subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                          capture_output=True, text=True).stdout


def python_tag(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out


def fresh_venv(tmp: Path) -> Path:
    venv = tmp / "venv"
    env = dict(os.environ, VENV=str(venv), DIRL_CONSTRAINTS="none", PYTHON=sys.executable)
    print(f"installing dirl into a fresh venv at {venv} (newest releases within pyproject.toml's ranges) ...",
          file=sys.stderr)
    subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], check=True, env=env, cwd=ROOT)
    return venv


def check(venv: Path, path: Path) -> int:
    """0 when every package in ``venv`` (dirl aside) is pinned in ``path`` at the version it has."""
    have = {canonical(n): v.split("+", 1)[0] for n, v in pins_from_freeze(freeze(venv / "bin" / "python")).items()}
    want = {canonical(n): v for n, v in pins_from_freeze(path.read_text()).items()}
    have.pop(SELF, None)
    problems = [f"{n}=={v} is installed but not pinned" for n, v in sorted(have.items()) if n not in want]
    problems += [f"{n}=={have[n]} is installed, {path} pins {want[n]}" for n in sorted(have)
                 if n in want and want[n] != have[n]]
    for p in problems:
        print(f"make_constraints --check: {p}", file=sys.stderr)
    if problems:
        print(f"make_constraints --check: {venv} differs from {path}; regenerate it (docs/INSTALL.md)", file=sys.stderr)
        return 1
    print(f"{venv}: {len(have)} packages, all at the versions of {path}")
    return 0


MANYLINUX = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64"]


def paper_check(report: dict) -> list[str]:
    """What `pip check` would say of the resolved set of a report: unmet or conflicting requirements."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    env = dict(report["environment"])
    have = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in report["install"]}
    problems = []
    for item in report["install"]:
        meta = item["metadata"]
        extras = set(item.get("requested_extras") or [])
        for line in meta.get("requires_dist") or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""})):
                continue
            name = canonicalize_name(req.name)
            if name not in have:
                problems.append(f"{meta['name']} {meta['version']} requires {req}, which is not in the set")
            elif not req.specifier.contains(have[name], prereleases=True):
                problems.append(f"{meta['name']} {meta['version']} requires {req}, the set has {have[name]}")
    return problems


def resolve_gpu(gpu_python: str, cpu_constraints: Path, tmp: Path) -> dict:
    """The dry-run resolve of dirl[gpu,test] for the GPU image; returns pip's report."""
    pins = pins_from_freeze(cpu_constraints.read_text())
    links = tmp / "wheels"
    links.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    clean["PIP_CONFIG_FILE"] = os.devnull  # the index as a GPU machine sees it: no local caps or mirrors
    run = lambda cmd: subprocess.run(cmd, check=True, env=clean, cwd=ROOT)  # noqa: E731
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(links), str(ROOT)])
    ds = next((f"deepspeed=={v}" for n, v in pins.items() if canonical(n) == "deepspeed"), "deepspeed")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(links), ds])
    cons = tmp / "gpu-constraints.txt"
    cons.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if canonical(n) != "torch"))
    version = subprocess.run([sys.executable, "-c", "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))"
                              "['project']['version'])", str(ROOT / "pyproject.toml")],
                             check=True, capture_output=True, text=True).stdout.strip()
    report = tmp / "report.json"
    cmd = [gpu_python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--use-feature=fast-deps",
           "--report", str(report), "--only-binary=:all:", "--implementation", "cp"]
    for plat in MANYLINUX:
        cmd += ["--platform", plat]
    cmd += ["--find-links", str(links), "-c", str(cons), f"dirl[gpu,test]=={version}"]
    print("resolving:", " ".join(cmd[:12]), "... --platform manylinux_2_17..39_x86_64 ...", file=sys.stderr)
    run(cmd)
    return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--venv", type=Path, help="freeze this existing virtual environment instead of a fresh one")
    src.add_argument("--report", type=Path, help="a `pip install --dry-run --report` JSON (e.g. the GPU resolve)")
    src.add_argument("--gpu", action="store_true", help="resolve dirl[gpu,test] for the GPU image on paper")
    src.add_argument("--check", nargs=2, type=Path, metavar=("VENV", "FILE"),
                     help="compare a venv with a constraints file: every package pinned, at that version")
    ap.add_argument("-o", "--output", type=Path, help="where to write (default constraints/cpu-pyXY.txt)")
    ap.add_argument("--gpu-python", default="python3.12", help="a CPython of the GPU image's version (with --gpu)")
    ap.add_argument("--cpu-constraints", type=Path, default=ROOT / "constraints" / "cpu-py311.txt",
                    help="pins the GPU resolve keeps (all but torch; with --gpu)")
    ap.add_argument("--save-report", type=Path, help="keep the resolver's JSON report here (with --gpu)")
    ap.add_argument("--note", action="append", default=[], help="an extra header line (repeatable)")
    args = ap.parse_args(argv)

    if args.check is not None:
        return check(*args.check)
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    header = ["Exact versions of a dirl install: pip install -c <this file> (scripts/install.sh does).",
              "Regenerate with scripts/make_constraints.py; ranges and reasons: docs/INSTALL.md."]
    if args.report is not None or args.gpu:
        if args.output is None:
            ap.error("--report/--gpu need -o/--output")
        if args.gpu:
            with tempfile.TemporaryDirectory(prefix="dirl-gpu-resolve-") as tmp:
                report = resolve_gpu(args.gpu_python, args.cpu_constraints, Path(tmp))
            if args.save_report is not None:
                args.save_report.write_text(json.dumps(report, indent=1))
        else:
            if not args.report.is_file():
                ap.error(f"--report: no such file: {args.report}")
            report = json.loads(args.report.read_text())
        problems = paper_check(report)
        for p in problems:
            print(f"make_constraints: {p}", file=sys.stderr)
        if problems:
            print("make_constraints: the resolved set does not pass pip check; nothing written", file=sys.stderr)
            return 1
        pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}
        env = report.get("environment", {})
        header.append(f"From a resolver dry run ({today}): CPython {env.get('python_full_version', '?')}, "
                      f"{env.get('sys_platform', '?')} {env.get('platform_machine', '?')}, manylinux wheels; "
                      f"on paper pip check: {sum(canonical(n) != SELF for n in pins)} packages, no problem.")
        out = args.output
    else:
        with tempfile.TemporaryDirectory(prefix="dirl-constraints-") as tmp:
            venv = args.venv if args.venv is not None else fresh_venv(Path(tmp))
            python = venv / "bin" / "python"
            if not python.is_file():
                ap.error(f"--venv: {python} does not exist")
            pins = pins_from_freeze(freeze(python))
            tag = python_tag(python)
        header.append(f"From pip freeze of {'a fresh install' if args.venv is None else 'an install'} "
                      f"({today}, CPython {tag[0]}.{tag[1:]}).")
        out = args.output or ROOT / "constraints" / f"cpu-py{tag}.txt"
    header += args.note
    for must in ("torch", "transformers"):
        if not any(canonical(n) == must for n in pins):
            print(f"make_constraints: {must} is not in the install; refusing to write {out}", file=sys.stderr)
            return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text(render(pins, header))
    tmp_out.replace(out)
    print(f"wrote {out} ({sum(canonical(n) != SELF for n in pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
