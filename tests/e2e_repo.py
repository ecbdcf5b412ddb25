"""Helpers of the end-to-end tests: a throwaway copy of this repository and the tools run in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from molar.experiments import tool_env  # noqa: F401 (the e2e tests' environment: this interpreter's scripts first on PATH)

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def copy_repo(dst: Path) -> None:
    """The files git would see in this checkout (tracked and untracked, not ignored), copied to dst."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def git_copy(dst: Path, env: dict) -> None:
    """A fresh git repository in dst holding a copy of this checkout, without its dvc.lock files
    (so `dvc repro` runs every stage), with a committer identity for `git commit` and `dvc exp run`."""
    copy_repo(dst)
    for lock in ("dvc.lock", "train/dvc.lock"):
        (dst / lock).unlink(missing_ok=True)
    run(["git", "init", "-q"], dst, env)
    run(["git", "config", "user.name", "molar tests"], dst, env)
    run(["git", "config", "user.email", "tests@molar.invalid"], dst, env)



def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout
