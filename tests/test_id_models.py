"""The ID-model registry: checkpoints load through the name in their config.json, unknown names
and missing checkpoints are user errors naming the stage to run, and model files stay free of
training code (molar/train.py, molar/evaluate.py belong to the recipes)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from molar.errors import UserError
from molar.item_content import ITEM_CONTENT, MODALITIES, save_item_content
from molar.models import mirm, molar
from molar.models.registry import ID_MODELS, SECTIONS, id_model_section, load_id_model
from molar.models.sasrec import SASRec, SasrecConfig
from stages import app

MIRM_FILE, MOLAR_FILE = Path(mirm.__file__), Path(molar.__file__)


def _sasrec(tmp_path: Path) -> tuple[SASRec, Path]:
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=7, hidden_size=4, num_blocks=1, max_length=5)).eval()
    model.save_pretrained(tmp_path / "sasrec")
    return model, tmp_path / "sasrec"


def test_load_id_model_dispatches_on_the_saved_name(tmp_path):
    model, directory = _sasrec(tmp_path)
    loaded = load_id_model(directory)
    assert type(loaded) is SASRec and not loaded.training
    assert torch.equal(loaded.score([[1, 2], [3]]), model.score([[1, 2], [3]]))


def test_an_unknown_model_name_is_a_user_error_naming_the_registry(tmp_path):
    _, directory = _sasrec(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model": "nope"}))
    with pytest.raises(UserError, match=r"config\.json: 'nope' is not an ID model; registered: sasrec"):
        load_id_model(directory)
    with pytest.raises(UserError, match="a nope checkpoint, not sasrec"):
        SASRec.from_pretrained(directory)


def test_a_missing_checkpoint_names_the_stage_that_writes_it(tmp_path):
    with pytest.raises(UserError, match=r"gru4rec: no ID-model checkpoint .*run `molar train-id --model gru4rec`"):
        load_id_model(tmp_path / "gru4rec")


def test_train_id_rejects_an_unknown_model_before_touching_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = CliRunner().invoke(app, ["train-id", "--model", "nope"])
    assert result.exit_code == 2 and "'nope' is not an ID model" in result.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


MODEL_FILES = sorted({Path(inspect.getfile(cls)) for cls in ID_MODELS.values()} | {MIRM_FILE, MOLAR_FILE})


@pytest.mark.parametrize("source", MODEL_FILES, ids=lambda p: p.name)
def test_model_files_import_no_training_code(source):
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not imported & {"molar.train", "molar.evaluate"}, f"{source}: training code belongs in molar/recipes/"


@pytest.mark.parametrize("name", sorted(ID_MODELS))
def test_every_id_model_round_trips_and_refuses_a_foreign_or_missing_checkpoint(name, tmp_path, monkeypatch):
    from molar.config import Params

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)  # the item-content file the content SASRecs are built from, for 12 items
    save_item_content(ITEM_CONTENT, {m: torch.randn(13, 5) for m in MODALITIES}, {"n_items": "12"})
    cls = ID_MODELS[name]
    torch.manual_seed(0)
    model = cls.from_params(12, id_model_section(Params(), name)).eval()  # built from its default section
    with pytest.raises(FileNotFoundError, match="no ID-model checkpoint"):
        cls.from_pretrained(tmp_path / "missing")
    model.save_pretrained(tmp_path / name)
    loaded = load_id_model(tmp_path / name)
    assert type(loaded) is cls and not loaded.training
    histories = [[1, 2, 3], [4, 5]]
    assert torch.equal(loaded.score(histories), model.score(histories))
    other = next(n for n in sorted(ID_MODELS) if n != name)
    config = tmp_path / name / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model": other}))
    with pytest.raises(UserError, match=f"a {other} checkpoint, not {name}"):
        cls.from_pretrained(tmp_path / name)


def test_every_registered_model_has_its_name_section_and_training_stage():
    """One registry, and the places that must agree with it: IdModelName (eval.models, align.id_model,
    ci.floors), a params section of that name, and a train-id@NAME stage (train/dvc.yaml's id_models)."""
    from typing import get_args

    from ruamel.yaml import YAML

    from molar.config import IdModelName, Params

    assert set(get_args(IdModelName)) == set(ID_MODELS)
    assert {SECTIONS.get(name, name) for name in ID_MODELS} <= set(Params.model_fields)
    train_vars = YAML(typ="safe").load((Path(__file__).resolve().parents[1] / "train" / "dvc.yaml").read_text())["vars"]
    id_models = next(v["id_models"] for v in train_vars if isinstance(v, dict) and "id_models" in v)
    assert sorted(id_models) == sorted(ID_MODELS)


def test_every_id_model_reads_a_section_of_params():
    from molar.config import IdModelParams, Params

    assert set(SECTIONS) <= set(ID_MODELS)
    for name in ID_MODELS:
        assert isinstance(id_model_section(Params(), name), IdModelParams), name
    assert id_model_section(Params(), "sasrec-image") is Params().sasrec_content
    with pytest.raises(UserError, match="'nope' is not an ID model"):
        id_model_section(Params(), "nope")


def test_each_train_id_stage_reads_its_models_section_and_item_inputs():
    """train/dvc.yaml's id_models repeat the registry's names and sections (DVC cannot import them):
    each train-id@NAME stage depends on the section NAME reads and, for a content model, on the item-content file."""
    from dvc_project import dvc_stages  # tests/dvc_project.py

    from molar.models.content_sasrec import ContentSASRec

    stages = {s.name.partition("@")[2]: s for s in dvc_stages() if s.name.startswith("train-id@")}
    assert set(stages) == set(ID_MODELS)
    for name, stage in stages.items():
        params = {key for dep in stage.deps if hasattr(dep, "params") for key in dep.params}
        assert SECTIONS.get(name, name) in params, (name, params)
        reads_content = str(ITEM_CONTENT) in {dep.def_path for dep in stage.deps}
        assert reads_content == issubclass(ID_MODELS[name], ContentSASRec), name
