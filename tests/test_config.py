import re
import shutil
from pathlib import Path

import pytest

from molar.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_with_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.eval.ks == [10, 20, 50]
    assert params.eval.mask_history is True


def test_every_params_key_has_a_comment():
    for n, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert "#" in line, f"params.yaml:{n}: key without a comment: {line.strip()}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sasrec:\n  hidden_size: -1\n", r"params.yaml:2: sasrec.hidden_size: .*greater than or equal to 1 \(got -1\)"),
        ("sasrec:\n  hiden_size: 3\n", r"params.yaml:2: sasrec.hiden_size: unknown key; allowed here: .*hidden_size"),
        # `lambda` (a Python keyword) is the YAML key and the name in every message, never the field's lambda_
        ("duorec:\n  lambda: -0.1\n", r"params.yaml:2: duorec.lambda: .*greater than or equal to 0 \(got -0.1\)"),
        ("duorec:\n  lambda_: 0.2\n", r"params.yaml:2: duorec.lambda_: unknown key; allowed here: .*hidden_size, lambda, loss,"),
        ("eval:\n  ks: [10, ten]\n", r"eval.ks.1: .*valid integer"),
        ("eval:\n  ks: []\n", r"eval.ks: .*non-empty list"),
        ("seed: 1\nsasrec:\n  epochs: '5'\n", r"params.yaml:3: sasrec.epochs: .*valid integer"),
        ("data:\n  source: csv\n", r"data.source: .*'synthetic'"),
        ("dat: {}\n", r"params.yaml:1: dat: unknown key"),
        ("- 1\n", r"top level must be a mapping"),
        # block lists, as `dvc exp run -S` writes them: the line of the item itself
        ("eval:\n  ks:\n  - 5\n  - ten\n", r"params.yaml:4: eval.ks.1: .*valid integer \(got 'ten'\)"),
        ("seed: 1\neval:\n  models:\n  - sasrec\n  - mollar\n", r"params.yaml:5: eval.models.1: .*'molar'"),
        ("train:\n  lr: 1e-4\n  mixed_precision: fp8\n", r"params.yaml:3: train.mixed_precision: .*'no', 'bf16', 'fp16' or 'auto'"),
        # a rule across two keys: the section is named, and the message says what to change
        ("train:\n  loss: ce\n  mirm_trainable: true\n", r"train: .*loss: ce .*whole catalog per step: use loss: sampled_ce"),
        # YAML 1.2: yes/on are strings, not booleans; the message says what to write
        ("align:\n  project: yes\n", r"params.yaml:2: align.project: .*write true or false .*\(got 'yes'\)"),
        ("seed: -1\n", r"params.yaml:1: seed: .*greater than or equal to 0 \(got -1\)"),
        ("seed: 18446744073709551616\n", r"params.yaml:1: seed: .*less than 18446744073709551616"),
        ("sasrec:\n  lr: 1\n  lr: 2\n", r"params.yaml:3: not valid YAML: found duplicate key \"lr\""),
        ("eval:\n  ks: [5, 10\nseed: 1\n", r"params.yaml:3: not valid YAML: .*flow sequence at line 2"),
    ],
)
def test_bad_params_name_key_line_and_rule(text, expected):
    with pytest.raises(ParamsError, match=expected):
        parse_params(text)


def test_missing_params_file_says_what_to_do(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_int_is_accepted_for_float():
    assert parse_params("sasrec:\n  lr: 1\n").sasrec.lr == 1.0


def test_values_mean_what_a_person_reads():
    # YAML 1.2, as DVC reads and writes params.yaml: under YAML 1.1 (PyYAML) `no` was False and
    # 5e-3 the string '5e-3'
    params = parse_params("train:\n  mixed_precision: no\nsasrec:\n  lr: 5e-3\neval:\n  ks:\n  - 5\n  - 10\n")
    assert params.train.mixed_precision == "no"
    assert params.sasrec.lr == 0.005
    assert params.eval.ks == [5, 10]
    assert parse_params('train:\n  mixed_precision: "no"\n').train.mixed_precision == "no"


def test_largest_seed_every_seeded_library_takes_is_allowed():
    import numpy as np
    import torch

    seed = parse_params(f"seed: {2**64 - 1}\n").seed
    np.random.default_rng([seed, 0])  # molar.train.epoch_rng
    torch.manual_seed(seed)


@pytest.mark.parametrize("name", ["params.yaml", "params-ml1m.yaml", "params-ml1m-fast.yaml", "params-ml1m-posters.yaml", "params-ml1m-posters-fast.yaml", "params-ml100k.yaml"])
def test_params_survive_dvcs_rewrite(tmp_path, name):
    """`dvc exp run -S align.alpha=0.5` rewrites the whole file in its own style (block lists,
    "no" unquoted): every other value must keep its meaning."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls on params.yaml

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / name, path)
    before = load_params(path)
    apply_overrides(path, ["align.alpha=0.5"])
    text = path.read_text()
    unquoted_no = "mixed_precision: no " in text or before.train.mixed_precision != "no"  # DVC writes "no" bare
    assert unquoted_no and "ks: [" not in text, "DVC's style changed; is the test still a rewrite?"
    after = load_params(path)
    assert after.align.alpha == 0.5
    assert after == before.model_copy(update={"align": before.align.model_copy(update={"alpha": 0.5})})


def _key_paths(tree, prefix=""):
    """Every dotted key of a nested mapping (lists and the free-form maps below are leaves)."""
    keys = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict) and path not in ("mirm.prompts", "ci.floors"):
            keys |= _key_paths(value, path + ".")
    return keys


@pytest.mark.parametrize("name, source, modalities", [
    ("params-ml1m-posters.yaml", "sasrec-txt", ["text", "image"]), ("params-ml1m-posters-fast.yaml", "sasrec-txt", ["text", "image"]),
    ("params-ml100k.yaml", "movielens", ["text"])])
def test_real_data_preset_has_every_key_of_params_yaml(name, source, modalities):
    """The README's real-data commands copy a preset over params.yaml, so it must list what the stages
    name as DVC params (a key missing there stops `dvc repro`): the same keys as params.yaml."""
    import yaml

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    preset = yaml.safe_load((REPO / name).read_text())
    assert _key_paths(preset) == _key_paths(default)
    params = load_params(REPO / name)
    assert params.data.source == source and params.mirm.backbone == "smollm2-135m+mobilenet"
    assert params.mirm.modalities == modalities


def test_duorec_lambda_is_set_as_dvc_exp_run_sets_it(tmp_path):
    """`dvc exp run -S duorec.lambda=0.2`: the keyword-named key parses, rewritten in DVC's style."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    assert load_params(path).duorec.lambda_ == 0.1
    apply_overrides(path, ["duorec.lambda=0.2"])
    assert "  lambda: 0.2" in path.read_text()
    assert load_params(path).duorec.lambda_ == 0.2


def test_errors_in_a_dvc_rewritten_file_name_its_lines(tmp_path):
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    apply_overrides(path, ["train.mixed_precision=fp8", "eval.ks=[5,0]"])
    lines = path.read_text().splitlines()
    precision = next(n for n, line in enumerate(lines, 1) if line.lstrip().startswith("mixed_precision:"))
    ks = next(n for n, line in enumerate(lines, 1) if line.lstrip().startswith("ks:"))
    assert lines[ks : ks + 2] == ["  - 5", "  - 0"]  # a block list now
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"{path}:{precision}: train.mixed_precision:" in str(err.value)
    assert f"{path}:{ks}: eval.ks: " in str(err.value)
