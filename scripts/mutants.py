"""`make mutants`: apply each named mutant of scripts/mutant_catalog.py to a scratch copy of the
checkout and run the tests that should catch it; every mutant must be killed.

    python scripts/mutants.py                 all mutants, after a baseline run of their tests
    python scripts/mutants.py NAME [NAME...]  only these (substring match)
    python scripts/mutants.py --list          the catalog, checking that every mutant applies
    options: --no-baseline, --keep (leave the scratch copies), --report FILE (markdown table),
             --timeout SECONDS (per mutant; a hang counts as killed: the suite noticed)

A mutant is *killed* when its tests fail (pytest exit code 1, or the per-mutant timeout), and
*survives* when they pass. Anything else (a collection error, no tests collected) is an error of
the catalog, reported as such: it says nothing about the tests. The baseline run of the same
tests on the unmutated copy must pass first, or no kill would mean anything.

The copy is made with the compiled extension (prsgd_hvd/_C*.so) and tests run from it with the
checkout's interpreter, so the workers that tests/hvdrun.py launches import the mutated package.
Exit status: 0 when every selected mutant was killed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from mutant_catalog import MUTANTS, Mutant  # noqa: E402

_SKIP = {".git", ".venv", "build", "dist", ".gpu_carry", "__pycache__", ".pytest_cache", ".whl", ".gl"}


def scratch_copy(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in _SKIP
                                                          or n.endswith(".egg-info")])
    return dest


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: its 'old' text occurs {count} times in "
                         f"{mutant.path} (must be exactly once): update scripts/mutant_catalog.py")
    mutated = text.replace(mutant.old, mutant.new)
    path.write_text(mutated)
    # A mutant must be a bug, not a syntax error. Compiled in memory: a .pyc left in
    # __pycache__ would outlive the probe that restores the baseline's source -- same size, same
    # second -- and the "unmutated" baseline would run the mutant. (A C++ mutant is compiled by
    # rebuild(); one that does not compile is reported as an error.)
    if path.suffix == ".py":
        compile(mutated, str(path), "exec")


def rebuild(mutant: Mutant, root: Path) -> Optional[str]:
    """A mutant of the CPU kernels (csrc/, not csrc/cuda/) needs the copy's extension built
    from it; returns the build's output tail when that fails. csrc/cuda/ is compiled by the
    tests that run it (tests/test_cuda_emu.py builds the emulation from the copy's sources)."""
    if not mutant.path.startswith("csrc/") or mutant.path.startswith("csrc/cuda/"):
        return None
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return None if proc.returncode == 0 else "\n".join(proc.stdout.splitlines()[-15:])


def run_tests(root: Path, tests: Sequence[str], timeout: float) -> Tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout' | 'error', the first failing test or the tail, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           f"--timeout={int(timeout)}", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout + 60,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return "timeout", "(the tests did not finish)", time.monotonic() - start
    took = time.monotonic() - start
    out = run_tests.last_output = proc.stdout
    if proc.returncode == 0:
        return "passed", "", took
    # Exit code 1: tests ran and some failed -- an assertion, or a fixture whose horovodrun job
    # crashed under the mutant (reported as ERROR): both are the suite noticing.
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 1 and failed:
        return "failed", failed[0], took
    if "Timeout" in out and proc.returncode == 1:
        return "timeout", "(a test timed out)", took
    return "error", f"pytest exit {proc.returncode}:\n" + "\n".join(out.splitlines()[-15:]), took


def select(names: Sequence[str]) -> List[Mutant]:
    if not names:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(n in m.name for n in names)]
    if not chosen:
        raise SystemExit(f"no mutant matches {list(names)}; --list shows them")
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args(argv)
    mutants = select(args.names)
    names = [m.name for m in MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"duplicate mutant names: {sorted(dupes)}")

    work = Path(tempfile.mkdtemp(prefix="prsgd_mutants."))
    try:
        base = scratch_copy(work / "baseline")
        for m in mutants:  # every mutant applies, before anything slow runs
            probe = base / m.path
            saved = probe.read_text()
            apply(m, base)
            probe.write_text(saved)
        if args.list:
            for m in mutants:
                print(f"{m.name:45s} {m.path}  -> {' '.join(m.tests)}")
            print(f"{len(mutants)} mutants, each applies exactly once")
            return 0
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            status, detail, took = run_tests(base, tests, args.timeout * 2)
            if status != "passed":
                print(f"baseline {status} in {took:.0f} s: {detail}\nfix the suite first: a kill "
                      f"means nothing while the unmutated tests fail")
                print("\n".join(run_tests.last_output.splitlines()[-60:]))
                return 1
            print(f"baseline passed in {took:.0f} s", flush=True)
        rows = []
        for i, m in enumerate(mutants, 1):
            root = scratch_copy(work / m.name)
            apply(m, root)
            failed_build = rebuild(m, root)
            if failed_build is not None:
                status, detail, took = "error", "the mutant does not build:\n" + failed_build, 0.0
            else:
                status, detail, took = run_tests(root, m.tests, args.timeout)
            verdict = {"failed": "killed", "timeout": "killed", "passed": "SURVIVED"}.get(status, "ERROR")
            rows.append((m, verdict, detail, took))
            print(f"[{i}/{len(mutants)}] {m.name}: {verdict} ({took:.0f} s) {detail.splitlines()[0] if detail else ''}",
                  flush=True)
            if verdict == "ERROR":
                print(detail)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        killed = sum(1 for _, v, _, _ in rows if v == "killed")
        print(f"\n{killed} of {len(rows)} mutants killed")
        if args.report:
            write_report(args.report, rows)
        return 0 if killed == len(rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"scratch copies kept in {work}")


def write_report(path: Path, rows) -> None:
    lines = ["| mutant | file | verdict | killed by | seconds |", "|---|---|---|---|---|"]
    for m, verdict, detail, took in rows:
        by = detail.splitlines()[0] if detail else ""
        lines.append(f"| `{m.name}` | `{m.path}` | {verdict} | `{by}` | {took:.0f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
