"""The PyTorch versions users have: the core tests on the declared floor and on the lent GPU image's release, each
in a cached virtual environment of its own (`make test-versions`):

    python scripts/torch_versions.py             # every version below, one after the other
    python scripts/torch_versions.py 2.5         # only torch 2.5 (Python 3.11)
    python scripts/torch_versions.py --list      # the versions, their environments and the core test files

For each version: make (once) the environment $SAM_TORCH_TIER_DIR/torch<ver>-py<py> (default
~/.cache/sam_repro/torch-tier) with that Python and that torch + torchvision, install the project's other
dependencies into it within pyproject.toml's ranges (at constraints.txt's pins, less its PyTorch block, so the
environment's torch stays) and the project itself (`pip install --no-deps -e .`), check that torch did not change,
run the core test files (CORE_FILES) with `python -m pytest -p no:cacheprovider -q FILES --junitxml=...`, and write
results/torch_versions/torch<ver>-py<py>.json (counts, each failure's and skip's name with its first line, the
versions, the command, provenance) and results/torch_versions/README.md, the table of every JSON there.

A run installs torch only where the environment lacks that exact torch and torchvision (the first time, or after
something replaced them; `.torch` in it keeps that install's pip freeze), and pins both while installing the rest, so
pip fails rather than replace them; a constraints.txt pin that this torch or torchvision itself rejects is left out,
and said (torch 2.11 requires setuptools<82, constraints.txt pins 84.2.1). The pytest log and JUnit XML stay beside
the environments (<env>.log, <env>.junit.xml). The interpreter comes from $SAM_PYTHON<major><minor>, `python3.X` on
the PATH or pyenv's newest 3.X (scripts/torch_envs.py). The first build needs the package index (PyPI's torch for
Linux is the CUDA build: about 5 GB per environment).
Exit status: 0 when every test passed or was skipped, 1 when one failed, 2 when an environment could not be made.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deps  # noqa: E402  (scripts/deps.py: constraints.txt's blocks)
from torch_envs import EnvError, find_python  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the script itself needs 3.11 (the environments have their own Python)
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
TIER = Path(os.environ.get("SAM_TORCH_TIER_DIR", "~/.cache/sam_repro/torch-tier")).expanduser()
RESULTS = ROOT / "results" / "torch_versions"
STAMP = ".torch"


@dataclass(frozen=True)
class Version:
    torch: str  # "2.5": the release, as named in the results
    python: str  # "3.11"
    pins: tuple[str, ...]  # the torch and torchvision of that release
    why: str

    @property
    def name(self) -> str:
        return f"torch{self.torch}-py{self.python}"

    @property
    def folder(self) -> Path:
        return TIER / self.name


VERSIONS = (
    Version("2.5", "3.11", ("torch==2.5.1", "torchvision==0.20.1"), "the floor pyproject.toml declares"),
    Version("2.11", "3.12", ("torch==2.11.0", "torchvision==0.26.0"), "the lent GPU node's image"),
)

# The core: the SAM step and every optimizer, the schedules, the models, the device-resident loader, device
# placement on fake CUDA and host reads, checkpoints (weights-only loading, sam-train's files), TF32 through
# compat.py, a short trainer run on dataset=synthetic (debug=tiny), and the GPU check's parts and its --smoke run.
CORE_FILES = (
    "tests/test_sam_step.py",
    "tests/test_sam_optimizer.py",
    "tests/test_sam_schedule.py",
    "tests/test_gsam_msam.py",
    "tests/test_looksam.py",
    "tests/test_models.py",
    "tests/test_loader.py",
    "tests/test_fake_cuda.py",
    "tests/test_host_reads.py",
    "tests/test_checkpoint_safety.py",
    "tests/test_backends.py",
    "tests/test_synthetic_data.py",
    "tests/test_gpu_check.py",
)


class TierError(Exception):
    pass


def log(line: str) -> None:
    print(f"torch-versions: {line}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        lines = [
            line for line in (result.stdout + result.stderr).splitlines() if "is ignored: it is neither" not in line
        ]
        raise TierError(f"{what} failed ({result.returncode}):\n" + "\n".join(lines[-20:]))
    return result


def _pip(folder: Path, *args: str, what: str) -> subprocess.CompletedProcess:
    return _run([str(folder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args], what)


def _probe(folder: Path, code: str) -> dict:
    """Run `code` (which prints one JSON object) in the environment, from outside the checkout."""
    result = _run([str(folder / "bin" / "python"), "-c", code], "probe", cwd=folder)
    return json.loads(result.stdout.strip().splitlines()[-1])


VERSIONS_CODE = (
    "import json, platform, numpy, torch, torchvision; print(json.dumps({'torch': torch.__version__, "
    "'torchvision': torchvision.__version__, 'python': platform.python_version(), 'numpy': numpy.__version__, "
    "'cuda_build': torch.version.cuda}))"
)


def _release_of(pin: str) -> str:
    return pin.split("==", 1)[1]


def _installed(folder: Path) -> dict | None:
    try:
        return _probe(folder, VERSIONS_CODE)
    except (TierError, json.JSONDecodeError, IndexError):
        return None


def _matches(installed: dict | None, version: Version) -> bool:
    """Whether the environment has exactly the torch and torchvision of `version` (local labels like +cu124
    ignored)."""
    if installed is None:
        return False
    have = {name: installed[name].split("+")[0] for name in ("torch", "torchvision")}
    return all(have[pin.split("==")[0]] == _release_of(pin) for pin in version.pins)


def ensure_torch(version: Version) -> None:
    """The environment with its torch and torchvision: made the first time; later runs find them and install
    nothing (or put them back if something replaced them)."""
    folder = version.folder
    if not (folder / "bin" / "python").exists():
        python = find_python(version.python)
        log(f"{version.name}: making {folder} with {python}")
        _run([str(python), "-m", "venv", str(folder)], "venv")
    if _matches(_installed(folder), version):
        return
    log(f"{version.name}: installing {' '.join(version.pins)} (needs the package index the first time)")
    _pip(folder, "install", "-q", *version.pins, what=f"pip install {' '.join(version.pins)}")
    (folder / STAMP).write_text(_pip(folder, "freeze", what="pip freeze").stdout)


def project_requirements() -> list[str]:
    """pyproject.toml's dependencies but torch and torchvision, and what the tests need of the dev extra."""
    if tomllib is None:
        raise TierError("run this script with Python 3.11 or newer (it reads pyproject.toml with tomllib)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [r for r in project["dependencies"] if deps.normalize(re.split(r"[<>=!~ ;\[]", r)[0]) not in deps.STUBBED]
    dev = [r for r in project["optional-dependencies"]["dev"] if re.match(r"(pytest|hypothesis|setuptools)\b", r)]
    return runtime + dev


def install_project(version: Version) -> tuple[dict, list[dict]]:
    """The project and its other dependencies into the environment, at constraints.txt's pins less its PyTorch block
    and less any pin this torch or torchvision rejects; torch and torchvision are constrained to what is installed,
    so pip fails rather than replace them. Returns the versions and the pins left out."""
    folder = version.folder
    before = _probe(folder, VERSIONS_CODE)
    constraints = folder / "constraints.txt"
    # `make setup`'s own constraints, written by the environment's interpreter (scripts/deps.py owns the rule).
    result = _run(
        [str(folder / "bin" / "python"), str(ROOT / "scripts" / "deps.py"), "constraints", str(constraints)],
        "deps.py constraints",
        cwd=folder,
    )
    notes = [line.removeprefix("setup: ") for line in result.stderr.splitlines() if line.startswith("setup: ")]
    pins = constraints.read_text().split()
    if f"torch=={before['torch'].split('+')[0]}" not in pins:
        raise TierError(f"{version.name}: torch {before['torch']} is outside pyproject.toml's range")
    note = notes[0] if notes else ""
    dropped = [
        {"pin": line.split(": ", 1)[0].removeprefix("leaving out "), "because": line.split(": ", 1)[1]}
        for line in notes[1:]
        if line.startswith("leaving out ")
    ]
    log(f"{version.name}: installing the other dependencies ({note})")
    for d in dropped:
        log(f"{version.name}: leaving out the pin {d['pin']}: {d['because']}")
    _pip(folder, "install", "-q", "-c", str(constraints), *project_requirements(), what="pip install (dependencies)")
    _pip(folder, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT), what="pip install -e .")
    after = _probe(folder, VERSIONS_CODE)
    if (after["torch"], after["torchvision"]) != (before["torch"], before["torchvision"]):
        raise TierError(f"{version.name}: the install changed torch/torchvision: {before} -> {after}")
    return after, dropped


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def test_id(classname: str, name: str) -> str:
    """pytest's node id from JUnit's `tests.test_x.TestY` and `test_z[case]`: `tests/test_x.py::TestY::test_z[case]`."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        if (ROOT / Path(*parts[:cut])).with_suffix(".py").is_file():
            return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
    return "::".join(p for p in (classname, name) if p)


def read_junit(path: Path) -> dict:
    """Counts, and each failed, errored and skipped test with the first line of its message."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        test = test_id(case.get("classname", ""), case.get("name", ""))
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = re.sub(r"^Skipped: ", "", outcome.get("message") or "")
            skips.append({"test": test, "reason": first_line(reason)})
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = first_line(outcome.get("message"))
            if not message:
                found = re.search(r"^E +(.+)$", outcome.text or "", re.MULTILINE)
                message = found.group(1).strip() if found else first_line(outcome.text)
            failures.append({"test": test, "kind": outcome.tag, "error": message})
    return {**counts, "failures": failures, "skips": skips}


PROVENANCE_CODE = (
    "import json, sys; from sam_repro.engine.provenance import provenance; "
    "print(json.dumps(provenance(json.loads(sys.argv[1]))))"
)


def provenance(folder: Path, command: list[str]) -> dict:
    """sam_repro's provenance record, made inside the environment (its packages, this checkout's commit)."""
    try:
        result = _run([str(folder / "bin" / "python"), "-c", PROVENANCE_CODE, json.dumps(command)], "provenance",
                      cwd=ROOT)  # fmt: skip
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (TierError, json.JSONDecodeError, IndexError) as error:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        return {"command": command, "git_commit": commit.stdout.strip() or None, "error": str(error)}


def run_tests(version: Version, files: tuple[str, ...]) -> tuple[int, float, Path]:
    """pytest over `files` in the environment, from the checkout; its output goes to the terminal and a log."""
    folder = version.folder
    junit = TIER / f"{version.name}.junit.xml"
    junit.unlink(missing_ok=True)
    command = [str(folder / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", *files]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", VIRTUAL_ENV=str(folder), PATH=f"{folder / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    log(f"{version.name}: {' '.join(command[1:])} --junitxml={junit}")
    start = time.monotonic()
    with open(TIER / f"{version.name}.log", "w") as out:
        proc = subprocess.Popen([*command, f"--junitxml={junit}"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
        code = proc.wait()
    return code, time.monotonic() - start, junit


def run_version(version: Version, files: tuple[str, ...]) -> dict:
    TIER.mkdir(parents=True, exist_ok=True)
    # One run per environment at a time: the editable install points it at this checkout.
    with open(TIER / f"{version.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        ensure_torch(version)
        versions, dropped = install_project(version)
        install_s = time.monotonic() - start
        code, tests_s, junit = run_tests(version, files)
        if not junit.exists():
            raise TierError(f"{version.name}: pytest exited {code} and wrote no {junit}")
        outcome = read_junit(junit)
        shown = ["python", "-m", "pytest", "-p", "no:cacheprovider", "-q", *files, "--junitxml=<env>.junit.xml"]
        result = {
            "version": version.torch,
            "python_asked": version.python,
            "why": version.why,
            "environment": str(version.folder).replace(str(Path.home()), "~"),
            "pins": list(version.pins),
            "constraints_left_out": dropped,
            **versions,
            "exit_code": code,
            "passed": outcome["passed"],
            "failed": outcome["failed"],
            "errors": outcome["errors"],
            "skipped": outcome["skipped"],
            "total": sum(outcome[k] for k in ("passed", "failed", "errors", "skipped")),
            "install_s": round(install_s, 1),
            "tests_s": round(tests_s, 1),
            "files": list(files),
            "failures": outcome["failures"],
            "skips": outcome["skips"],
            "provenance": provenance(version.folder, shown),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{version.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{version.name}: wrote {path.relative_to(ROOT)}")
    return result


def _grouped(entries: list[dict], key: str, verb: str) -> list[str]:
    """Tests grouped by their first line: `- 6 skipped: reason (file::test, ...)`, parametrised cases counted once
    by name."""
    by_line: dict[str, list[str]] = {}
    for entry in entries:
        by_line.setdefault(entry[key], []).append(entry["test"])
    lines = []
    for text, tests in sorted(by_line.items(), key=lambda item: -len(item[1])):
        names = sorted({re.sub(r"\[.*\]$", "", t) for t in tests})
        shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"- {len(tests)} {verb}: {text} ({shown})")
    return lines


def write_readme() -> Path:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("torch*-py*.json"))]
    results.sort(key=lambda r: tuple(int(x) for x in r["version"].split(".")))
    lines = [
        "# The core tests on the PyTorch versions users have",
        "",
        "Written by `make test-versions` (scripts/torch_versions.py) from the JSON files beside this one; each",
        "version ran in its own cached environment with the project installed beside that PyTorch.",
        "",
        "| PyTorch | torchvision | Python | numpy | why | passed | failed | errors | skipped | tests | commit | date |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        prov = r.get("provenance", {})
        commit = prov.get("git_commit") or "?"
        commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
        date = (prov.get("time") or "?")[:10]
        lines.append(
            f"| {r['torch']} | {r['torchvision']} | {r['python']} | {r['numpy']} | {r['why']} | {r['passed']} | "
            f"{r['failed']} | {r['errors']} | {r['skipped']} | {r['tests_s']:.0f} s | {commit} | {date} |"
        )
    lines += ["", "Test files: " + ", ".join(f"`{f}`" for f in (results[0]["files"] if results else CORE_FILES)) + "."]
    for r in results:
        lines += ["", f"## torch {r['torch']}, Python {r['python']}", ""]
        lines.append(f"{r['passed']} passed of {r['total']} in {r['tests_s']:.0f} s.")
        failed = [
            {**f, "line": f["error"] if f["kind"] == "failure" else f"error: {f['error']}"} for f in r["failures"]
        ]
        for group, key, verb in ((failed, "line", "failed"), (r["skips"], "reason", "skipped")):
            if group:
                lines += ["", *_grouped(group, key, verb)]
        for d in r.get("constraints_left_out", []):
            lines += ["", f"constraints.txt's `{d['pin']}` was left out: {d['because']}."]
    path = RESULTS / "README.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help=f"torch releases to run (default: {[v.torch for v in VERSIONS]})")
    parser.add_argument("--files", nargs="+", default=CORE_FILES, help="test files (default: the core files)")
    parser.add_argument("--list", action="store_true", help="print the versions and the core test files, run nothing")
    args = parser.parse_args(argv)
    known = {v.torch: v for v in VERSIONS}
    unknown = [v for v in args.versions if v not in known]
    if unknown:
        parser.error(f"unknown version(s) {unknown}: choose from {sorted(known)}")
    chosen = [known[v] for v in args.versions] or list(VERSIONS)
    if args.list:
        for v in chosen:
            print(f"torch {v.torch} on Python {v.python} ({', '.join(v.pins)}; {v.why}): {v.folder}")
        print("\n".join(args.files))
        return 0
    failed = False
    for version in chosen:
        try:
            result = run_version(version, tuple(args.files))
        except (TierError, EnvError, subprocess.CalledProcessError) as error:
            log(f"error: {error}")
            return 2
        failed |= bool(result["failed"] or result["errors"] or result["exit_code"] not in (0, 5))
        log(
            f"{version.name}: {result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
            f"{result['skipped']} skipped in {result['tests_s']:.0f} s (install {result['install_s']:.0f} s)"
        )
    log(f"wrote {write_readme().relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
