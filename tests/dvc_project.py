"""This repository's pipeline as DVC resolves it (foreach stages expanded, train/dvc.yaml included)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dvc_stages(repo_root: Path = REPO) -> list:
    """Every stage of every dvc.yaml in the repository, through DVC's own loader."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        return list(repo.index.stages)
