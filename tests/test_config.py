import re
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
        ("eval:\n  ks: [10, ten]\n", r"eval.ks.1: .*valid integer"),
        ("eval:\n  ks: []\n", r"eval.ks: .*non-empty list"),
        ("seed: 1\nsasrec:\n  epochs: '5'\n", r"params.yaml:3: sasrec.epochs: .*valid integer"),
        ("data:\n  source: csv\n", r"data.source: .*'synthetic'"),
        ("dat: {}\n", r"params.yaml:1: dat: unknown key"),
        ("- 1\n", r"top level must be a mapping"),
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
