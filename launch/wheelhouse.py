#!/usr/bin/env python
"""Wheels for a GPU machine that cannot reach a package index (a cluster's compute nodes, an offline box).

Such a machine usually has a CUDA PyTorch of its own (a cluster module, a container image) and lacks the
rest of this project's dependencies, or has older versions of them. Run this where pip reaches the index,
with the GPU machine's `python3 -m pip freeze` as HAVE:

    python launch/wheelhouse.py --have gpu-freeze.txt --out wheels/gpu [--python-version 3.12]
    make gpu-wheels HAVE=gpu-freeze.txt                       (the same, from the project's venv)

then copy OUT next to the project on the GPU machine; `make gpu-check` there installs it with
`pip install --no-index --no-deps --target .gpu-site` and runs with `PYTHONPATH=src:.gpu-site`.

How the set is chosen:
- the requirements are setup.cfg's install_requires plus the `gpu` extra; the versions are the ones of the
  interpreter running this script (the environment the tests passed in), so the GPU side runs what was
  tested, wherever the index has a wheel of that version for the target Python and platform;
- pip resolves them for the target (`pip install --dry-run --report`, metadata only, nothing is installed);
- a resolved package is left out when HAVE holds a version that meets every requirement on it (ours and
  those of the other resolved packages), so the GPU machine's own builds stay in use;
- PyTorch, Triton and the CUDA libraries are never carried: they belong to the GPU machine. When its
  torch is older than setup.cfg's bound, a warning says so (the check then measures an untested torch);
- packages published only as source (DeepSpeed) are built here into pure-Python wheels
  (`pip wheel --no-deps --no-build-isolation`; DeepSpeed compiles its ops on the GPU machine at first use).

OUT/carry.txt lists each wheel, its size and why it is carried. Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
# the GPU machine's own: a wheel of these from an index would be the wrong build (CPU, or another CUDA)
NEVER_CARRIED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")
SOURCE_ONLY = ("deepspeed",)  # no wheel on PyPI: built here, pure Python
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]


class UserError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(setup_cfg: Path, extras: list[str]) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg.get("options", "install_requires").split("\n")
    for extra in extras:
        if not cfg.has_option("options.extras_require", extra):
            raise UserError(f"setup.cfg has no extra {extra!r}")
        lines += cfg.get("options.extras_require", extra).split("\n")
    return [Requirement(x.strip()) for x in lines if x.strip() and not x.strip().startswith("#")]


def read_have(path: Path) -> dict[str, Version | None]:
    """`pip freeze` / `pip list --format=freeze` output: name -> version (None where it names no version)."""
    if not path.is_file():
        raise UserError(f"--have {path}: no such file (make it on the GPU machine: python3 -m pip freeze > {path.name})")
    have: dict[str, Version | None] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+)|@.*)?\s*$", line)
        if not m:
            raise UserError(f"--have {path}:{n}: not a 'name==version' line: {raw.strip()!r}")
        try:
            have[canonical(m.group(1))] = Version(m.group(2)) if m.group(2) else None
        except InvalidVersion:
            raise UserError(f"--have {path}:{n}: bad version in {raw.strip()!r}") from None
    if "torch" not in have:
        raise UserError(f"--have {path} lists no torch: the GPU machine needs its own CUDA PyTorch")
    return have


def target_environment(python_version: str) -> dict[str, str]:
    major_minor = ".".join(python_version.split(".")[:2])
    return {"python_version": major_minor, "python_full_version": f"{major_minor}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirements_of(item: dict, env: dict[str, str]) -> list[Requirement]:
    """A resolved package's own requirements that apply on the target (markers evaluated, no extras)."""
    out = []
    for spec in item["metadata"].get("requires_dist", []) or []:
        r = Requirement(spec)
        if r.marker is None or Marker(str(r.marker)).evaluate(env):
            out.append(r)
    return out


def choose(report: dict, ours: list[Requirement], have: dict[str, Version | None], env: dict[str, str]):
    """(carry, kept, warnings): carry = [(name, version, why)] for the packages the GPU machine lacks.

    Only packages in use count: ours, and the requirements of each package that is carried (a package the
    GPU machine keeps brings its own requirements there). A kept version must meet every requirement on it
    from ours and the carried packages; carrying one package can raise the bar for another, so the choice is
    repeated until it stops changing."""
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    deps = {n: requirements_of(i, env) for n, i in items.items()}
    carried: set[str] = set()
    while True:
        needs: dict[str, list[Requirement]] = {}
        todo = [*ours]
        seen: set[str] = set()
        while todo:
            r = todo.pop()
            n = canonical(r.name)
            needs.setdefault(n, []).append(r)
            if n in seen:
                continue
            seen.add(n)
            if n in carried or n not in have:
                todo += deps.get(n, [])
        now = set()
        for n in seen:
            hv = have.get(n, None)
            ok = n in have and (hv is None or all(r.specifier.contains(hv, prereleases=True) for r in needs[n]))
            if not ok and not NEVER_CARRIED.match(n):
                now.add(n)
        if now == carried:
            break
        carried = now
    carry, kept, warnings = [], [], []
    for n in sorted(seen):
        spec = ",".join(sorted({str(s) for r in needs[n] for s in r.specifier})) or "any"
        hv = have.get(n)
        if n in carried:
            if n not in items:
                raise UserError(f"{n} is needed ({spec}) but the resolver chose no version of it")
            carry.append((n, items[n]["metadata"]["version"], f"has {hv}, needs {spec}" if n in have else "missing"))
        elif n not in have:
            warnings.append(f"{n} is needed ({spec}) and the GPU machine has none: install a build for its CUDA there")
        else:
            if hv is not None and spec != "any" and not all(r.specifier.contains(hv, prereleases=True) for r in needs[n]):
                warnings.append(f"{n} {hv} on the GPU machine does not meet {spec}: it stays (never carried), so the "
                                "check runs on an untested version")
            kept.append((n, str(hv) if hv else "?"))
    return carry, kept, warnings


def pip(args: list[str], quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
        raise UserError(f"pip {args[0]} failed:\n" + "\n".join(tail))


def local_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--have", required=True, type=Path, help="the GPU machine's `python3 -m pip freeze`")
    p.add_argument("--out", type=Path, default=Path("wheels/gpu"), help="folder for the wheels and carry.txt")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    p.add_argument("--platform", action="append", help="wheel platform tags accepted there (default: x86-64 manylinux)")
    p.add_argument("--extra", action="append", default=["gpu"], help="setup.cfg extras to carry too (default: gpu)")
    a = p.parse_args(argv)
    try:
        if not re.fullmatch(r"3\.\d+", a.python_version):
            raise UserError(f"--python-version {a.python_version!r}: expected major.minor, e.g. 3.12")
        have = read_have(a.have)
        ours = project_requirements(REPO / "setup.cfg", a.extra)
        env = target_environment(a.python_version)
        target = ["--only-binary=:all:", "--python-version", a.python_version, "--implementation", "cp"]
        for plat in a.platform or PLATFORMS:
            target += ["--platform", plat]
        a.out.mkdir(parents=True, exist_ok=True)
        for name in SOURCE_ONLY:  # a pure wheel of the tested version, for the resolver and the GPU side
            v = local_version(name)
            if v and not list(a.out.glob(f"{name}-{v}-*.whl")):
                print(f"building {name} {v} into a pure-Python wheel")
                pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(a.out), f"{name}=={v}"])
        with tempfile.TemporaryDirectory() as tmp:
            tested = Path(tmp, "tested.txt")  # the versions of this environment, where the target has them
            pins = []
            for r in ours:
                v = local_version(r.name)
                if v and not NEVER_CARRIED.match(canonical(r.name)):
                    pins.append(f"{r.name}=={Version(v).public}")
            tested.write_text("\n".join(pins) + "\n")
            reqs = Path(tmp, "reqs.txt")
            reqs.write_text("\n".join(str(r) for r in ours) + "\n")
            report_file = Path(tmp, "report.json")
            print(f"resolving {len(ours)} requirements for CPython {a.python_version} (metadata only)")
            pip(["install", "--dry-run", "--ignore-installed", "--report", str(report_file), "--find-links", str(a.out),
                 *target, "-r", str(reqs), "-c", str(tested)])
            report = json.loads(report_file.read_text())
        carry, kept, warnings = choose(report, ours, have, env)
        wanted = [f"{n}=={v}" for n, v, _ in carry]
        if wanted:
            print(f"downloading {len(wanted)} wheels into {a.out}")
            pip(["download", "--no-deps", "--find-links", str(a.out), "-d", str(a.out), *target, *wanted])
        names = {n for n, _, _ in carry}
        for whl in a.out.glob("*.whl"):  # leftovers of an earlier run with another HAVE
            if canonical(whl.name.split("-")[0]) not in names:
                whl.unlink()
        lines, total = [], 0
        for n, v, why in sorted(carry):
            files = [w for w in a.out.glob("*.whl") if canonical(w.name.split("-")[0]) == n]
            size = sum(w.stat().st_size for w in files)
            total += size
            lines.append(f"{n}=={v}\t{size / 2**20:.1f} MiB\t{why}")
        lines.append(f"# {len(carry)} wheels, {total / 2**20:.1f} MiB; kept from the GPU machine: "
                     + ", ".join(f"{n} {v}" for n, v in sorted(kept)))
        lines += [f"# warning: {w}" for w in warnings]
        (a.out / "carry.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
