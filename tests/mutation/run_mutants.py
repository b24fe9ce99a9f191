#!/usr/bin/env python3
"""Run the mutation suite of tests/mutation/mutants.toml: privacy code is tested by breaking it.

For each mutant: copy the repository's source (``git ls-files -co --exclude-standard``: tracked
plus untracked-not-ignored files; never .venv or results) into a scratch folder, apply the
mutant's edits there, run only its ``kills`` tests there with the project's Python, and record

* ``killed``   — the named tests fail (every one; ``require = "any"``: at least one);
* ``survived`` — they pass (a named test that passes is listed);
* ``stale``    — a ``find`` does not occur exactly once: the mutant no longer applies;
* ``invalid``  — the tests could not run as tests (collection/import error, a named test that
  does not exist, the scratch copy not the code under test);
* ``timeout``.

Before any mutant counts, the union of the kill tests runs once on an unmutated scratch copy
and must pass (else "killed" would mean nothing). Exit status 0 only when the baseline passes
and every mutant is killed.

Importability: the project venv installs ``fedrec`` in editable mode, mapping
``fedrec.common`` -> <repo>/common etc., so tests in a scratch copy would import the original
code. Each scratch copy gets ``_pkg/fedrec/{__init__.py, common, client, server, simulations}``
(symlinks to the scratch folders, per pyproject's ``package-dir``) and ``_pkg`` first on
PYTHONPATH: the ordinary path finder runs before the editable finder (which setuptools appends
to ``sys.meta_path``), so ``fedrec`` resolves to the scratch copy. The runner checks that in a
separate interpreter before each run, and a pytest plugin (``-p _fedrec_mutation_guard``)
checks it again inside every test session, failing it otherwise. Flower's Ray workers inherit
the environment.

Speed: starting pytest costs ~5 s of imports (numpy, torch, opacus, flwr, statsmodels...) and
each of ~60 mutants needs a fresh interpreter (a mutated ``fedrec`` must be imported anew). When
the runner's interpreter is the one that runs the tests, each pytest run is forked from a
``multiprocessing`` fork server that imported those third-party modules once (``PRELOAD``; never
``fedrec``, which each child imports from its scratch copy, as the guard plugin checks). A
preloaded module that fails to import is skipped; ``--no-fork`` runs every test session in a
fresh ``python -m pytest`` as before.

Usage: run_mutants.py [--list] [--only ID[,ID]] [--jobs N] [--json PATH] [--keep] [--no-fork]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MUTANTS = Path(__file__).resolve().with_name("mutants.toml")
SKIP_TOP = {".venv", "results", ".git", "build", "runs", "scratch"}  # never copied
GUARD_PLUGIN = "_fedrec_mutation_guard"
ROOT_ENV = "FEDREC_MUTATION_ROOT"
DEFAULT_TIMEOUT = 300.0
#: third-party modules the fork server imports once (never fedrec: the children import their copy)
PRELOAD = ("numpy", "scipy.stats", "scipy.optimize", "pandas", "torch", "opacus", "cryptography.hazmat.primitives.asymmetric.ec",
           "statsmodels.api", "networkx", "flwr.serverapp", "flwr.clientapp", "pytest", "_pytest.python")
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")

GUARD_SOURCE = '''"""pytest plugin of the mutation runner: the code under test must be the scratch copy."""
import importlib
import os
from pathlib import Path

import pytest

NAMES = @NAMES@


def pytest_sessionstart(session):
    root = Path(os.environ["@ROOT_ENV@"]).resolve()
    bad = []
    for name in NAMES:
        mod = importlib.import_module(name)
        for p in list(getattr(mod, "__path__", [])) or [mod.__file__]:
            if not Path(p).resolve().is_relative_to(root):
                bad.append(name + " -> " + str(Path(p).resolve()))
    if bad:
        raise pytest.UsageError("mutation guard: code under test is not the scratch copy " + str(root)
                                + ": " + "; ".join(bad))
'''


# ----------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclass(frozen=True)
class Mutant:
    id: str
    edits: tuple[Edit, ...]
    kills: tuple[str, ...]
    why: str
    require: str = "all"


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    """Parse and validate the mutant list (ValueError naming the entry on a malformed one)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    out: list[Mutant] = []
    seen: set[str] = set()
    for k, m in enumerate(data.get("mutant", [])):
        where = f"{path.name} mutant #{k + 1} ({m.get('id', '?')})"
        for key in ("id", "file", "find", "replace", "kills", "why"):
            if key not in m:
                raise ValueError(f"{where}: missing {key!r}")
        if m["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(m["id"])
        kills = tuple(str(t) for t in m["kills"])
        if not kills or any("::" not in t for t in kills):
            raise ValueError(f"{where}: kills must be a non-empty list of pytest node ids (file::test)")
        if any(t.startswith("tests/mutation/") for t in kills):
            raise ValueError(f"{where}: a kill test may not live in tests/mutation/ (the suite would recurse)")
        require = str(m.get("require", "all"))
        if require not in ("all", "any"):
            raise ValueError(f"{where}: require must be 'all' or 'any'")
        edits = [Edit(str(m["file"]), str(m["find"]), str(m["replace"]))]
        for e in m.get("also", []):
            edits.append(Edit(str(e["file"]), str(e["find"]), str(e["replace"])))
        if any(not e.find or e.find == e.replace for e in edits):
            raise ValueError(f"{where}: every edit needs a non-empty find that differs from its replace")
        out.append(Mutant(id=str(m["id"]), edits=tuple(edits), kills=kills, why=str(m["why"]).strip(),
                          require=require))
    if not out:
        raise ValueError(f"{path}: no [[mutant]] entries")
    return out


# ----------------------------------------------------------------------------- scratch copies
def source_files(repo: Path = REPO) -> list[str]:
    """Tracked + untracked-not-ignored files, relative, minus SKIP_TOP; files that exist."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError) as err:  # not a git checkout (e.g. an sdist)
        print(f"run_mutants: git cannot list the files ({err}); copying the tree minus build outputs",
              file=sys.stderr)
        junk = ("__pycache__", ".pytest_cache", ".egg-info")
        files = []
        for d, dirs, names in os.walk(repo):
            rel = Path(d).relative_to(repo)
            dirs[:] = [x for x in dirs if not x.endswith(junk) and not (rel == Path(".") and x in SKIP_TOP)]
            files += [(rel / n).as_posix() for n in names if not n.endswith((".pyc", ".db"))]
    return sorted(f for f in files if f.split("/", 1)[0] not in SKIP_TOP
                  and ((repo / f).is_file() or (repo / f).is_symlink()))


def package_dirs(repo: Path = REPO) -> dict[str, str]:
    """``fedrec.X`` -> folder, from pyproject's [tool.setuptools] package-dir."""
    py = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    pdirs = py["tool"]["setuptools"]["package-dir"]
    return {k: v for k, v in pdirs.items() if k.count(".") == 1 and k.startswith("fedrec.")}


def make_scratch(parent: Path, name: str, files: Sequence[str], pdirs: dict[str, str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    for rel in files:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst, follow_symlinks=False)
    pkg = root / "_pkg" / "fedrec"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""fedrec, as laid out for a mutation-suite scratch copy."""\n')
    for mod, folder in pdirs.items():
        (pkg / mod.split(".", 1)[1]).symlink_to(root / folder, target_is_directory=True)
    (root / "_pkg" / f"{GUARD_PLUGIN}.py").write_text(
        GUARD_SOURCE.replace("@NAMES@", repr(sorted(pdirs))).replace("@ROOT_ENV@", ROOT_ENV))
    return root


def apply_edits(root: Path, edits: Sequence[Edit]) -> str | None:
    """Apply the edits in ``root``; the reason when one does not apply exactly once, else None."""
    for e in edits:
        path = root / e.file
        if not path.is_file():
            return f"{e.file}: no such file"
        text = path.read_text(encoding="utf-8")
        n = text.count(e.find)
        if n != 1:
            return f"{e.file}: find occurs {n} times (needs exactly 1): {e.find.strip()[:70]!r}"
        path.write_text(text.replace(e.find, e.replace), encoding="utf-8")
    return None


def scratch_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "_pkg")] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env[ROOT_ENV] = str(root)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def check_importable(python: str, root: Path, pdirs: dict[str, str]) -> str | None:
    """None when every fedrec.X resolves into ``root`` in a fresh interpreter, else why not."""
    code = ("import json, importlib\n"
            f"mods = {sorted(pdirs)!r}\n"
            "out = {}\n"
            "for m in mods:\n"
            "    mod = importlib.import_module(m)\n"
            "    out[m] = list(getattr(mod, '__path__', [])) or [mod.__file__]\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([python, "-c", code], cwd=root, env=scratch_env(root), capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        return f"importing fedrec in the scratch copy failed: {r.stderr.strip()[-500:]}"
    paths = json.loads(r.stdout.strip().splitlines()[-1])
    real = root.resolve()
    bad = [f"{m} -> {p}" for m, ps in paths.items() for p in ps if not Path(p).resolve().is_relative_to(real)]
    return f"code under test is not the scratch copy: {'; '.join(bad)}" if bad else None


# ----------------------------------------------------------------------------- running tests
@dataclass
class Outcome:
    status: str  #: killed | survived | stale | invalid | timeout | passed | failed (baseline)
    seconds: float = 0.0
    failing: list[str] = field(default_factory=list)  #: named tests that failed
    passing: list[str] = field(default_factory=list)  #: named tests that passed
    detail: str = ""


def run_pytest(python: str, root: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    cmd = [python, "-m", "pytest", "-q", "-rA", "--no-header", "-p", "no:cacheprovider", "-p", GUARD_PLUGIN,
           "-o", "addopts=", *tests]
    try:
        r = subprocess.run(cmd, cwd=root, env=scratch_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, out
    return r.returncode, r.stdout + r.stderr


def _forked_pytest(root: str, tests: list[str], log: str) -> None:
    """Child of the fork server: become ``python -m pytest ...`` run in ``root``, output to ``log``."""
    env = scratch_env(Path(root))
    os.environ.clear()
    os.environ.update(env)
    os.chdir(root)
    sys.path[:0] = [root, str(Path(root) / "_pkg")]  # as `python -m pytest` with PYTHONPATH=_pkg
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import pytest
    code = pytest.main(["-q", "-rA", "--no-header", "-p", "no:cacheprovider", "-p", GUARD_PLUGIN,
                        "-o", "addopts=", *tests])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


_FORK_CTX: multiprocessing.context.BaseContext | None = None


def fork_context() -> multiprocessing.context.BaseContext:
    """The fork server, started (and its modules preloaded) on first use."""
    global _FORK_CTX
    if _FORK_CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        # the fork server imports these once (an ImportError only costs speed); "__main__" is
        # this runner, so that each child finds _forked_pytest without re-importing it
        ctx.set_forkserver_preload(["__main__", *PRELOAD])
        _FORK_CTX = ctx
    return _FORK_CTX


def run_pytest_forked(root: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """:func:`run_pytest` through the fork server (same outcome; ~5 s less per run)."""
    log = root / "_pytest_output.log"
    proc = fork_context().Process(target=_forked_pytest, args=(str(root), list(tests), str(log)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None, log.read_text(errors="replace") if log.exists() else ""
    return proc.exitcode, log.read_text(errors="replace") if log.exists() else ""


def per_test(output: str, tests: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Outcomes of each named test's cases (a parametrized name covers its cases) and the
    collection errors (ERROR lines without a test)."""
    got: dict[str, list[str]] = {t: [] for t in tests}
    collect_errors = []
    for line in output.splitlines():
        m = _OUTCOME.match(line.strip())
        if not m:
            continue
        outcome, node = m.groups()
        if "::" not in node:
            collect_errors.append(node)
            continue
        for t in tests:
            if node == t or (node.startswith(t + "[") and "[" not in t):
                got[t].append(outcome)
    return got, collect_errors


def judge(code: int | None, output: str, tests: Sequence[str], require: str, baseline: bool) -> Outcome:
    tail = "\n".join(output.strip().splitlines()[-15:])
    if code is None:
        return Outcome("timeout", detail=tail)
    got, collect_errors = per_test(output, tests)
    if collect_errors or code in (2, 3, 4):
        return Outcome("invalid", detail=f"pytest exit {code}; collection errors {collect_errors}\n{tail}")
    missing = [t for t, o in got.items() if not o]
    if missing:
        return Outcome("invalid", detail=f"no such test (or not run): {missing}\n{tail}")
    failing = [t for t, o in got.items() if any(x in ("FAILED", "ERROR") for x in o)]
    passing = [t for t, o in got.items() if all(x == "PASSED" for x in o)]
    if baseline:
        odd = [t for t, o in got.items() if any(x not in ("PASSED",) for x in o)]
        return Outcome("passed" if not odd else "failed", failing=failing, passing=passing,
                       detail="" if not odd else f"not passing on unmutated code: {odd}\n{tail}")
    killed = len(failing) == len(tests) if require == "all" else bool(failing)
    return Outcome("killed" if killed else "survived", failing=failing, passing=passing,
                   detail="" if killed else f"still passing: {[t for t in tests if t not in failing]}")


def run_one(python: str, parent: Path, files: Sequence[str], pdirs: dict[str, str], name: str,
            edits: Sequence[Edit], tests: Sequence[str], require: str, timeout: float, keep: bool,
            fork: bool = False) -> Outcome:
    t0 = time.monotonic()
    root = make_scratch(parent, re.sub(r"[^A-Za-z0-9_-]", "_", name), files, pdirs)
    try:
        why = apply_edits(root, edits)
        if why is not None:
            return Outcome("stale", detail=why)
        if fork:  # the guard plugin checks, inside the session, that fedrec is the scratch copy
            code, output = run_pytest_forked(root, tests, timeout)
        else:
            why = check_importable(python, root, pdirs)
            if why is not None:
                return Outcome("invalid", detail=why)
            code, output = run_pytest(python, root, tests, timeout)
        out = judge(code, output, tests, require, baseline=not edits)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    out.seconds = round(time.monotonic() - t0, 1)
    return out


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], help="run only these ids (repeat or comma-separate)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--json", type=Path, help="also write the JSON summary here")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per pytest run")
    ap.add_argument("--python", default=default_python(), help="interpreter that runs the tests (default: the venv's)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies (printed)")
    ap.add_argument("--no-fork", action="store_true",
                    help="start every pytest run as a fresh interpreter (default: fork them from a preloaded server "
                         "when --python is this interpreter)")
    args = ap.parse_args(argv)

    mutants = load_mutants()
    if args.list:
        for m in mutants:
            files = ", ".join(sorted({e.file for e in m.edits}))
            why = " ".join(m.why.split())
            print(f"{m.id}\n    {files}\n    {why}\n    kills: " + "\n           ".join(m.kills))
        return 0
    only = {x for o in args.only for x in o.split(",") if x}
    if only:
        unknown = only - {m.id for m in mutants}
        if unknown:
            print(f"unknown mutant id(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in only]

    files = source_files()
    pdirs = package_dirs()
    parent = Path(tempfile.mkdtemp(prefix="fedrec-mutants-"))
    union = list(dict.fromkeys(t for m in mutants for t in m.kills))
    fork = not args.no_fork and Path(args.python).absolute() == Path(sys.executable).absolute()
    if fork:
        fork_context()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        base_f = pool.submit(run_one, args.python, parent, files, pdirs, "baseline", (), union, "all",
                             args.timeout, args.keep, fork)
        futs = {m.id: pool.submit(run_one, args.python, parent, files, pdirs, m.id, m.edits, m.kills, m.require,
                                  args.timeout, args.keep, fork) for m in mutants}
        baseline = base_f.result()
        results = {k: f.result() for k, f in futs.items()}
    wall = round(time.monotonic() - t0, 1)
    if not args.keep:
        shutil.rmtree(parent, ignore_errors=True)

    label = "(baseline: unmutated)"
    width = max([len(label)] + [len(m.id) for m in mutants])
    print(f"{'mutant':<{width}}  {'status':<8}  {'seconds':>7}  detail")
    print(f"{label:<{width}}  {baseline.status:<8}  {baseline.seconds:>7.1f}  all {len(union)} kill tests")
    for m in mutants:
        r = results[m.id]
        first = r.detail.splitlines()[0] if r.detail else ""
        print(f"{m.id:<{width}}  {r.status:<8}  {r.seconds:>7.1f}  {first}")
    killed = sum(r.status == "killed" for r in results.values())
    ok = baseline.status == "passed" and killed == len(mutants)
    summary = {
        "ok": ok, "killed": killed, "total": len(mutants), "wall_seconds": wall, "jobs": args.jobs, "forked": fork,
        "baseline": {"tests": union, **asdict(baseline)},
        "mutants": [{"id": m.id, "files": sorted({e.file for e in m.edits}), "kills": list(m.kills),
                     **asdict(results[m.id])} for m in mutants],
    }
    if baseline.status != "passed":
        print(f"\nBASELINE FAILED: the kill tests do not pass on the unmutated code:\n{baseline.detail}")
    for m in mutants:
        r = results[m.id]
        if r.status != "killed":
            print(f"\n{m.id}: {r.status}\n{r.detail}")
    print(f"\n{killed}/{len(mutants)} mutants killed in {wall:.0f} s ({args.jobs} jobs)")
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
