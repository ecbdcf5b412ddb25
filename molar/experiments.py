"""Named experiment sets: the paper's tables as lists of DVC experiments, run and collected.

A set is a YAML file (experiments/<name>.yaml, or any path) naming its rows::

    title: "Table 3 (RQ3): Molar with image, text or image+text items"
    reference: text-image               # the row every other row is tested against
    set: {eval.models: [molar]}         # overrides of params.yaml for every run of the set
    seeds: 1                            # runs per row, seeds params.seed, +1, ... (mean and 95% CI)
    rows:
      - {name: image, label: "Molar (image)", model: molar, set: {mirm.modalities: [image]}}
      - ...

Each row is one model of metrics/eval.json (``model``) in the pipeline run with the set's and the
row's overrides. Rows with the same overrides share one run (table2: one pipeline run, nine
models). A run is ``dvc exp run --temp -n <set>-<row>[-seed<S>] -S key=value ...``: DVC runs it in
a temporary copy of the workspace (uncommitted changes included), so the workspace is never
touched, and keeps it as an experiment (`dvc exp show`, `dvc plots diff`). Its metrics/ folder and
params.yaml are then copied out of the experiment's commit into <out>/runs/<run>/, with run.json
(what made it) written last: a run whose run.json matches the workspace is done and skipped, so
an interrupted set goes on where it stopped when the command is given again. "Matches" means the
same overrides on the same project files: the files of HEAD plus uncommitted changes, outside
reports/, metrics/, the dvc.lock files and what no stage reads (documentation, tests, benchmarks,
the set files), so committing a report or editing the README does not make its runs stale.

With ``workspace=True`` a run is ``dvc exp run -n ... -S ...`` in the workspace itself: the training
stages keep their resumable state (data/state), so a run interrupted mid-training continues where
it stopped, and stages whose params a run leaves alone are not run again (on ML-1M, the SASRec-CE
reference trains once for a whole set instead of once per run). Before each run params.yaml is
put back as it was when the set started (kept in .dvc/tmp/, WORKSPACE_BASE, while the set runs:
after an interruption the next start of any set restores it first), and again at the end; data/
and the dvc.lock files are left as the last run made them. What a killed `dvc exp run` left staged
in git's index is unstaged when the set starts again (unstage_index).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from molar.config import parse_params
from molar.errors import MissingInputError, UserError
from molar.io import atomic_path, write_json

SETS_DIR = Path("experiments")  # the named sets, experiments/<name>.yaml
REPORTS = Path("reports")  # <out> of a set by default: reports/<name>/
RUN_FILE = "run.json"  # written last into <out>/runs/<run>/: the run is complete
# project files that do not change what a run computes (git pathspecs; see the module docstring):
# results and locks, and what no stage reads (documentation, tests, benchmarks, the set files,
# whose overrides each run.json records itself)
NOT_INPUTS = ("reports", "metrics", "dvc.lock", "train/dvc.lock", "tests", "benchmarks", "experiments", "*.md")
# params.yaml as it was when a workspace-mode set started, kept while it runs (.dvc/tmp is
# git-ignored, so it is not a project file of workspace_key)
WORKSPACE_BASE = Path(".dvc") / "tmp" / "molar-experiment-base-params.yaml"
NAME = re.compile(r"[a-z0-9][a-z0-9-]*")  # row and set names: parts of DVC experiment names


class ExperimentError(UserError):
    """A set file that cannot be run, or a run whose results cannot be collected."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Row(_Spec):
    name: str = Field(pattern=NAME.pattern)
    label: str = ""  # as the table shows it; the name where empty
    model: str  # the eval.models entry whose metrics the row reports
    set: dict[str, Any] = {}  # overrides of this row, after the set's

    @property
    def shown(self) -> str:
        return self.label or self.name


class ExperimentSet(_Spec):
    title: str
    reference: str  # a row name
    set: dict[str, Any] = {}
    seeds: int = Field(1, ge=1)
    rows: list[Row] = Field(min_length=1)
    notes: str = ""  # printed under the table (what the set shows, what it leaves out)

    @model_validator(mode="after")
    def _rows_named_once(self) -> "ExperimentSet":
        names = [r.name for r in self.rows]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"row names must be unique; twice: {', '.join(twice)}")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a row; rows: {', '.join(names)}")
        return self

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


class Run(BaseModel):
    """One pipeline run of a set: a DVC experiment, and the rows that read their model from it."""

    name: str  # the experiment name, also the folder <out>/runs/<name>/
    overrides: dict[str, Any]  # key -> value, as `dvc exp run -S` sets them
    rows: list[str]
    seed: int | None = None  # None: params.yaml's own seed (one seed per row)

    def set_args(self) -> list[str]:
        """``-S key=value`` arguments: values as JSON, which DVC reads as YAML (strings stay strings)."""
        args = []
        for key, value in self.overrides.items():
            args += ["-S", f"{key}={json.dumps(value)}"]
        return args


def set_path(name_or_path: str) -> Path:
    """experiments/<name>.yaml for a set name, else the path given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return SETS_DIR / f"{name_or_path}.yaml"


def set_name(path: Path) -> str:
    name = path.stem.lower()
    if not NAME.fullmatch(name):
        raise ExperimentError(f"{path}: a set file's name must be lower-case letters, digits and '-' (it names DVC experiments)")
    return name


def load_set(path: Path) -> ExperimentSet:
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SETS_DIR.glob("*.yaml"))) or "none"
        raise MissingInputError(f"{path}: no such experiment set (sets in {SETS_DIR}/: {known})")
    try:
        raw = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {err}") from None
    try:
        return ExperimentSet.model_validate(raw)
    except ValidationError as err:
        problems = "\n  ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in err.errors())
        raise ExperimentError(f"{path}: not a valid experiment set:\n  {problems}") from None


def plan_runs(
    spec: ExperimentSet, name: str, base_seed: int, seeds: int | None = None, extra: dict[str, Any] | None = None,
    only: Sequence[str] = (),
) -> list[Run]:
    """The runs of set ``spec`` (called ``name``): rows grouped by their overrides, times seeds.

    Overrides apply in order: the set's, the row's, then ``extra`` (the command line's --set).
    With more than one seed each run gets ``seed = base_seed + i`` and a ``-seed<S>`` name suffix.
    ``only`` (row names) keeps the runs that hold one of those rows, named as in the whole set, so
    runs made apart (two copies of the workspace, one row each) gather into one <out>/runs/.
    """
    names = [row.name for row in spec.rows]
    unknown = [r for r in only if r not in names]
    if unknown:
        raise ExperimentError(f"set {name}: no row {', '.join(map(repr, unknown))}; its rows: {', '.join(names)}")
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for row in spec.rows:
        overrides = {**spec.set, **row.set, **(extra or {})}
        key = json.dumps(overrides, sort_keys=True)
        groups.setdefault(key, (overrides, []))[1].append(row.name)
    n_seeds = seeds or spec.seeds
    runs = []
    for overrides, rows in groups.values():
        run_name = f"{name}-{rows[0]}" if len(groups) > 1 else name
        for i in range(n_seeds):
            if n_seeds == 1:
                runs.append(Run(name=run_name, overrides=overrides, rows=rows))
            else:
                seed = base_seed + i
                runs.append(Run(name=f"{run_name}-seed{seed}", overrides={**overrides, "seed": seed}, rows=rows, seed=seed))
    return [run for run in runs if not only or set(only) & set(run.rows)]


def apply_overrides(params_text: str, overrides: dict[str, Any]) -> dict:
    """params.yaml's mapping with dotted ``overrides`` set, as `dvc exp run -S` sets them."""
    raw = YAML(typ="safe").load(params_text) or {}
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ExperimentError(f"override {dotted}: {part} is not a section of params.yaml")
        node[leaf] = value
    return raw


def check_runs(runs: Sequence[Run], params_text: str, source: Path) -> None:
    """Each run's params, validated as a stage would read them, before any run starts: a typo in
    a row costs a second, not the hours of the rows before it."""
    for run in runs:
        stream = io.StringIO()
        YAML(typ="safe").dump(apply_overrides(params_text, run.overrides), stream)
        where = f"params.yaml + run {run.name}"
        try:
            parse_params(stream.getvalue(), where)
        except UserError as err:  # its line numbers are of the combined text, not of a file: dropped
            problem = re.sub(rf"{re.escape(where)}:\d+:", f"{where}:", str(err))
            raise ExperimentError(f"{source}: run {run.name} (rows {', '.join(run.rows)}) has params the stages reject:\n{problem}") from None


def _git(args: list[str], cwd: Path, *, binary: bool = False) -> Any:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise ExperimentError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout if binary else proc.stdout.decode()


def workspace_key(repo: Path) -> str:
    """A digest of the project files a run reads: the tracked files (as git's index has them), their
    uncommitted changes and the untracked files git does not ignore, all without NOT_INPUTS."""
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo, capture_output=True).returncode != 0:
        raise ExperimentError(f"{repo.resolve()}: not a git repository with a commit; DVC experiments start from one (git add -A && git commit)")
    outside = [f":!{p}" for p in NOT_INPUTS]
    tree = _git(["ls-files", "--stage", "--", ".", *outside], repo)  # mode, blob hash and path of each tracked file
    digest = hashlib.sha256(tree.encode())
    digest.update(_git(["diff", "HEAD", "--binary", "--", ".", *outside], repo, binary=True))
    untracked = _git(["ls-files", "--others", "--exclude-standard", "-z", "--", ".", *outside], repo).split("\0")
    for rel in sorted(filter(None, untracked)):  # new files a run copies too (dvc exp run --temp takes them)
        digest.update(rel.encode() + b"\0" + (repo / rel).read_bytes())
    return digest.hexdigest()[:16]


def run_record(run: Run, key: str) -> dict:
    """What run.json must hold for ``run`` to count as done for this workspace."""
    return {"run": run.name, "rows": run.rows, "overrides": run.overrides, "workspace_key": key}


def is_done(run_dir: Path, record: dict) -> bool:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in record.items())


def tool_env() -> dict:
    """The environment with this interpreter's scripts first on PATH: dvc.yaml runs `molar`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_in_own_group(cmd: Sequence[str], cwd: Path, env: dict) -> tuple[int, signal.Signals | None]:
    """Run ``cmd`` in a process group of its own; SIGINT or SIGTERM sent to this process goes to that group.

    `dvc exp run` runs each stage as a child of its own: a signal sent to `molar experiment` alone
    (`kill PID`, a scheduler's stop) would otherwise end this process and leave dvc and the stage
    training on. The group has a session of its own, so Ctrl-C in a terminal reaches this process
    only and is passed on the same way. Returns the exit code and the signal that stopped the run,
    if one did.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, start_new_session=True)
    received: list[signal.Signals] = []

    def pass_on(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum))
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # the group has already exited
            pass

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can be set only there
    previous = {s: signal.signal(s, pass_on) for s in handled} if in_main else {}
    try:
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return returncode, (received[0] if received else None)


def _ref_of(repo: Path, exp_name: str) -> str:
    """Where DVC keeps experiment ``exp_name`` of the current HEAD: refs/exps/<sha[:2]>/<sha[2:]>/<name>."""
    head = _git(["rev-parse", "HEAD"], repo).strip()
    return f"refs/exps/{head[:2]}/{head[2:]}/{exp_name}"


def experiment_ref(repo: Path, exp_name: str) -> str:
    """The git ref of experiment ``exp_name`` of the current HEAD, which `dvc exp run` just made."""
    ref = _ref_of(repo, exp_name)
    if not _git(["for-each-ref", ref], repo).strip():
        raise ExperimentError(f"no DVC experiment {exp_name!r} of HEAD after `dvc exp run`; see its output above")
    return ref


def remove_experiment(repo: Path, exp_name: str) -> None:
    """Drop an earlier experiment ``exp_name`` of HEAD (a rerun takes its name), if there is one."""
    if _git(["for-each-ref", _ref_of(repo, exp_name)], repo).strip():
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", exp_name], cwd=repo, env=tool_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExperimentError(f"`dvc exp remove {exp_name}` failed (needed to rerun it): {proc.stderr.strip()}")


def collect(repo: Path, ref: str, run_dir: Path, record: dict) -> None:
    """Copy metrics/ and params.yaml of the experiment commit ``ref`` into ``run_dir``, then run.json."""
    archive = _git(["archive", "--format=tar", ref, "metrics", "params.yaml"], repo, binary=True)
    with atomic_path(run_dir) as tmp:
        tmp.mkdir()
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        drop_unevaluated(tmp)
        commit = _git(["rev-parse", ref], repo).strip()
        write_json({**record, "experiment": ref.rsplit("/", 1)[-1], "commit": commit, "collected": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, tmp / RUN_FILE)


def drop_unevaluated(run_dir: Path) -> None:
    """Remove what the experiment commit only carried over from its baseline, not results of this run:
    metrics/by_model/<model>/ of models outside the run's eval.models, the training curves
    (<model>_train.csv / .json) of ID models it neither evaluated nor aligned Molar to, and
    item-content.json when no content SASRec trained."""
    params = YAML(typ="safe").load((run_dir / "params.yaml").read_text())
    evaluated = set(params["eval"]["models"])
    metrics = run_dir / "metrics"
    for model_dir in sorted((metrics / "by_model").glob("*")):
        if model_dir.name not in evaluated:
            shutil.rmtree(model_dir)
    trained = set(evaluated)
    if evaluated & {"molar", "molar+sasrec"}:
        trained.add((params.get("align") or {}).get("id_model", "sasrec"))
    if "molar+sasrec" in evaluated:
        trained.add("sasrec")
    for curve in sorted([*metrics.glob("*_train.csv"), *metrics.glob("*_train.json")]):
        if curve.name.rsplit("_train.", 1)[0] not in trained | {"molar"}:  # molar_train/ is a folder, not these
            curve.unlink()
    if not any(m.startswith("sasrec-") for m in trained):
        (metrics / "item-content.json").unlink(missing_ok=True)


def _put_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def restore_interrupted_base(repo: Path, echo=print) -> None:
    """Put back params.yaml as it was before a workspace-mode set that was stopped mid-run."""
    base = repo / WORKSPACE_BASE
    if base.is_file():
        _put_text(repo / "params.yaml", base.read_text())
        base.unlink()
        echo(f"params.yaml: restored from {WORKSPACE_BASE} (a workspace-mode set was stopped before it could put it back)")


def unstage_index(repo: Path, echo=print) -> None:
    """Unstage what the git index holds, keeping every file as it is in the workspace.

    `dvc exp run` in the workspace stages params.yaml, the dvc.lock files and metric files while it
    runs and unstages them when it ends; one that is killed leaves them staged, the next one then
    fails ("Stash apply resulted in merge conflicts") and the staged params.yaml would change
    workspace_key. `dvc exp run` unstages whatever it finds anyway, so nothing is lost here.
    """
    proc = subprocess.run(["git", "diff", "--cached", "--name-only", "-z"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:  # not a git repository (yet): workspace_key says so, with the fix
        return
    staged = [p for p in proc.stdout.split("\0") if p]
    if staged:
        _git(["reset", "-q", "--", "."], repo)
        shown = ", ".join(staged[:4]) + (f" and {len(staged) - 4} more" if len(staged) > 4 else "")
        echo(f"git index: unstaged {shown} (left staged by a stopped `dvc exp run`, or by you; the files keep their contents)")


def run_set(
    path: Path, out: Path, repo: Path = Path("."), *, seeds: int | None = None, extra: dict[str, Any] | None = None,
    fresh: bool = False, dry_run: bool = False, workspace: bool = False, command: str = "", only: Sequence[str] = (), echo=print,
) -> list[Run]:
    """Run every run of the set at ``path`` not already done in ``out``/runs/, collect each; return the runs.

    ``only`` (row names) runs just the runs holding those rows (plan_runs); ``fresh`` reruns runs
    that are done; ``dry_run`` only prints the `dvc exp run` commands;
    ``workspace`` runs them in the workspace instead of temporary copies (module docstring);
    ``command`` (the command line that ran the set) is kept in run.json for the report.
    """
    spec = load_set(path)
    name = set_name(path)
    if not dry_run:  # either mode: a stopped workspace-mode set left a run's overrides in params.yaml
        restore_interrupted_base(repo, echo)
    if workspace and not dry_run:
        unstage_index(repo, echo)
    params_text = (repo / "params.yaml").read_text()
    base_seed = YAML(typ="safe").load(params_text).get("seed", 0)
    runs = plan_runs(spec, name, base_seed, seeds, extra, only)
    check_runs(runs, params_text, path)
    key = workspace_key(repo)
    where = [] if workspace else ["--temp"]
    try:
        for i, run in enumerate(runs, 1):
            run_dir = out / "runs" / run.name
            record = run_record(run, key)
            # no -f: for `dvc exp run` it also means "rerun every stage"; an earlier experiment of this
            # name is removed instead (remove_experiment), so stages the overrides leave alone are skipped
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *where, "-n", run.name, *run.set_args()]
            shown = shlex.join(["dvc", *cmd[3:]])
            if not fresh and is_done(run_dir, record):
                echo(f"[{i}/{len(runs)}] {run.name}: done ({run_dir}/{RUN_FILE}), skipped")
                continue
            stale = " (its earlier results are from other project files or overrides)" if (run_dir / RUN_FILE).is_file() and not fresh else ""
            echo(f"[{i}/{len(runs)}] {run.name}{stale}: {shown}")
            if dry_run:
                continue
            started = time.perf_counter()
            remove_experiment(repo, run.name)
            if workspace:  # each run's -S applies to the set's params, not to the previous run's
                _put_text(repo / WORKSPACE_BASE, params_text)
                _put_text(repo / "params.yaml", params_text)
            returncode, stopped_by = run_in_own_group(cmd, cwd=repo, env=tool_env())
            if stopped_by is not None:
                resumes = "this one resumes from its stages' saved state" if workspace else "this one starts over (a --temp copy keeps no state)"
                raise ExperimentError(f"run {run.name}: stopped by {stopped_by.name} (passed on to `dvc exp run` and its stage); give the set again to go on: done runs are kept, {resumes}")
            if returncode != 0:
                raise ExperimentError(f"run {run.name}: `{shown}` exited {returncode}; fix what its output says, then run the set again (done runs are kept)")
            collect(repo, experiment_ref(repo, run.name), run_dir, {**record, "seconds": round(time.perf_counter() - started, 1), "command": command})
            echo(f"[{i}/{len(runs)}] {run.name}: collected into {run_dir}/ ({time.perf_counter() - started:.0f} s)")
    finally:
        if workspace and (repo / WORKSPACE_BASE).is_file():
            _put_text(repo / "params.yaml", params_text)
            (repo / WORKSPACE_BASE).unlink()
            echo("params.yaml: put back as it was before the set (data/ and the dvc.lock files hold the last run; `dvc repro` rebuilds them for it)")
    return runs


def parse_set_option(values: Sequence[str]) -> dict[str, Any]:
    """--set KEY=VALUE options -> overrides, each VALUE read as YAML (as `dvc exp run -S` does)."""
    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"--set {text!r}: write KEY=VALUE, e.g. --set train.epochs=3")
        out[key.strip()] = YAML(typ="safe").load(value) if value.strip() else ""
    return out
