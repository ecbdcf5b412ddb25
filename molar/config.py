"""Typed view of ``params.yaml``: one class per section, one place for each fact.

Every key a stage reads is declared here with its type, range and default. Unknown keys,
wrong types and out-of-range values fail fast with the dotted key name, the line in
params.yaml and what is allowed (``ParamsError``). What each key *means* is written as a
comment beside it in params.yaml; this module only says what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.error import MarkedYAMLError

from molar.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(UserError):
    """A params file that cannot be used; the message names file, line, key and fix."""


class Section(BaseModel):
    # strict: "5" is not an int and 1.5 is not an int; extra=forbid: a typo is an error.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ----------------------------------------------------------------------------- data
class SyntheticData(Section):
    n_users: int = Field(400, ge=10)
    n_items: int = Field(240, ge=20)
    min_length: int = Field(8, ge=3)
    max_length: int = Field(30, ge=3)
    transition_prob: float = Field(0.5, ge=0.0, le=1.0)
    successors_per_item: int = Field(2, ge=1)
    popularity_exponent: float = Field(1.5, ge=0.0)
    taste_temperature: float = Field(1.0, gt=0.0)
    image_size: int = Field(56, ge=28)


class DataParams(Section):
    source: Literal["synthetic", "movielens", "sasrec-txt", "user-seq", "recbole", "amazon", "pixelrec"] = "synthetic"
    path: str = "data/raw"
    on_bad_line: Literal["error", "skip"] = "error"
    synthetic: SyntheticData = SyntheticData()


# ---------------------------------------------------------------------------- split
class SplitParams(Section):
    min_user_length: int = Field(3, ge=3)
    k_core: int = Field(0, ge=0)


# ------------------------------------------------------------------------------ sft
class SftParams(Section):
    mix: list[Literal["IT", "SA", "UB"]] = ["IT", "SA", "UB"]
    samples_per_task: int = Field(200, ge=1)
    ub_history: int = Field(5, ge=1)


# ----------------------------------------------------------------------------- mirm
# Item prompt placeholders (molar/models/mirm.py fills them; [Cur_Item] is always appended last).
PROMPT_FIELDS = ("title", "description", "attributes", "image")
PROMPT_SOURCES = ("default", "synthetic", "movielens", "sasrec-txt", "user-seq", "recbole", "amazon", "pixelrec")
DEFAULT_PROMPTS = {
    "default": "{image}\nTitle: {title}\nDescription: {description}\nAttributes: {attributes}\n",
    "movielens": "Movie: {title}\nAttributes: {attributes}\nPoster: {image}\n",
}


class MirmParams(Section):
    backbone: str = "tiny-qwen2-vl"
    modalities: list[Literal["text", "image"]] = ["text", "image"]
    finetune: Literal["full", "lora", "staged", "none"] = "full"
    prompts: dict[str, str] = DEFAULT_PROMPTS
    image_min_pixels: int = Field(28 * 28, ge=28 * 28)
    image_max_pixels: int = Field(56 * 56, ge=28 * 28)
    image_encoder: str = "../shared/models/coral-mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    image_tokens: int = Field(1, ge=1, le=256)
    max_text_tokens: int = Field(96, ge=8)
    sft_max_tokens: int = Field(384, ge=32)
    lr: float = Field(1e-3, gt=0.0)
    projector_lr: float = Field(1e-3, gt=0.0)
    warmup_start_factor: float = Field(0.01, gt=0.0, le=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    checkpoint_every: int = Field(200, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    embed_batch_size: int = Field(32, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @field_validator("modalities")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one of text, image")
        if len(set(v)) != len(v):
            raise ValueError("lists a modality twice")
        return v

    @model_validator(mode="after")
    def _staged_needs_images(self) -> MirmParams:
        if self.finetune == "staged" and "image" not in self.modalities:
            raise ValueError("finetune: staged trains the projector on images first; add image to modalities "
                             "or use full / lora")
        return self

    @field_validator("prompts")
    @classmethod
    def _known_prompts(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        if "default" not in v:
            raise ValueError("needs a 'default' template (used for sources without their own)")
        for source, template in v.items():
            if source not in PROMPT_SOURCES:
                raise ValueError(f"{source!r} is not a data source; allowed keys: {', '.join(PROMPT_SOURCES)}")
            unknown = set(re.findall(r"\{(\w*)\}", template)) - set(PROMPT_FIELDS)
            if unknown:
                raise ValueError(
                    f"template {source!r} uses {{{', '.join(sorted(unknown))}}}; allowed placeholders: "
                    + ", ".join("{" + f + "}" for f in PROMPT_FIELDS)
                )
            if "[Cur_Item]" in template:
                raise ValueError(f"template {source!r} contains [Cur_Item]; it is appended automatically, remove it")
        return v


# ------------------------------------------------------------------------ ID models
class IdModelParams(Section):
    """What every ID model's section holds: its width and history length, and how it is trained
    (one next-item recipe trains every ID model). Each model's section adds its architecture."""

    hidden_size: int = Field(64, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_length: int = Field(50, ge=2)
    loss: Literal["ce", "bce", "sampled_ce"] = "ce"
    num_negatives: int = Field(256, ge=1)
    lr: float = Field(5e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(40, ge=1)
    patience: int = Field(10, ge=1)
    grad_clip: float = Field(1.0, ge=0.0)
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(200, ge=1)


# the models of molar/models/registry.py: each has its section here and in params.yaml (its name,
# or the one registry.SECTIONS names: sasrec_content for the content SASRecs)
IdModelName = Literal["sasrec", "fpmc", "gru4rec", "duorec", "sasrec-text", "sasrec-image", "sasrec-text-image"]


class SasrecParams(IdModelParams):
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)


class SasrecContentParams(SasrecParams):
    """The section every content SASRec (sasrec-text, sasrec-image, sasrec-text-image) reads: SASRec's
    keys (the modalities come from the model name, molar/models/registry.py:SECTIONS)."""

    # the projection of frozen content learns slower than an ID table: twice sasrec's lr and
    # epochs (on the embedded default the best epochs are 45 to 65; with 40 the cosine schedule
    # ends too early: sasrec-text valid NDCG@10 0.36, against 0.42 with 80)
    lr: float = Field(1e-2, gt=0.0)
    epochs: int = Field(80, ge=1)


class FpmcParams(IdModelParams):
    """FPMC adds no architecture key; only two shared defaults differ (RecBole's FPMC.yaml)."""

    # the user and item vectors are two concatenated factors (molar/models/fpmc.py), so the width
    # is even; 128 = 2 x RecBole's embedding_size 64, one factor per half
    hidden_size: int = Field(128, ge=2, multiple_of=2)
    # RecBole's FPMC has no dropout
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class Gru4recParams(IdModelParams):
    """GRU4Rec's architecture, defaults from RecBole's GRU4Rec config (its training keys follow the
    shared next-item recipe, tuned for this project's data, not RecBole's)."""

    embedding_size: int = Field(64, ge=1)  # item embedding = user vector width (RecBole: embedding_size 64)
    hidden_size: int = Field(128, ge=1)  # GRU width (RecBole: hidden_size 128)
    num_layers: int = Field(1, ge=1)  # stacked GRU layers (RecBole: num_layers 1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)  # on the item embeddings (RecBole: dropout_prob 0.3)


class DuorecParams(SasrecParams):
    """DuoRec = SASRec's keys + its contrastive term (molar/models/duorec.py); the contrastive defaults
    and num_heads are RecBole's DuoRec (DuoRec.yaml, duorec.sh), the training keys the shared recipe's."""

    num_heads: int = Field(2, ge=1)  # RecBole: n_heads 2 (its n_layers 2 and hidden_size 64 are SASRec's defaults here too)
    # RecBole: hidden and attention dropout 0.5; here SASRec's one dropout (embeddings, attention, feed-forward)
    # at SASRec's 0.2: on the embedded default (us_x, dot) 0.5 gives valid NDCG@10 0.096, 0.2 gives 0.248
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    contrast: Literal["us_x", "un", "su"] = "us_x"  # RecBole: contrast us_x
    # `lambda` is a Python keyword: the field is lambda_, the YAML key (and every message) `lambda`
    lambda_: float = Field(0.1, ge=0.0, alias="lambda")  # RecBole: lmd_sem 0.1 (us_x, su), lmd 0.1 (un)
    tau: float = Field(1.0, gt=0.0)  # RecBole: tau 1
    similarity: Literal["dot", "cosine"] = "dot"  # RecBole: sim dot


# ---------------------------------------------------------------------------- align
class AlignParams(Section):
    alpha: float = Field(0.1, ge=0.0)
    tau: float = Field(0.1, gt=0.0)
    id_model: IdModelName = "sasrec"
    project: bool = True
    train_id_model: bool = False
    positions: Literal["last", "all"] = "last"


class DuegParams(Section):
    # llm or the sequence encoder of an ID model (molar/models/id_dueg.py): the paper's RQ2 set. Not
    # duorec (SASRec's encoder; its contrastive term is a training recipe, not a user model) nor the
    # content SASRecs (their item inputs are content already: MIRM's here)
    kind: Literal["llm", "sasrec", "gru4rec", "fpmc"] = "llm"
    init: Literal["base", "mirm"] = "base"
    item_adapter: Literal["auto", "linear", "whiten", "mlp"] = "whiten"
    layers: int = Field(0, ge=0)
    item_id_embedding: bool = False  # early ID fusion: a learned ID vector per item added at DUEG's input


# ---------------------------------------------------------------------------- train
class TrainParams(Section):
    """The joint DUEG + alignment stage (train-molar)."""

    loss: Literal["bce", "sampled_ce", "ce"] = "bce"
    num_negatives: int = Field(1, ge=1)
    all_positions: bool = True
    mirm_trainable: bool = False
    gradient_checkpointing: bool = False
    max_length: int = Field(20, ge=2)
    lr: float = Field(1e-4, gt=0.0)
    mirm_lr: float = Field(1e-5, gt=0.0)
    item_id_lr_scale: float = Field(1.0, gt=0.0)
    item_adapter_lr_scale: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(3, ge=1)
    patience: int = Field(2, ge=1)
    grad_clip: float = Field(1.0, ge=0.0)
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    collapse_std: float = Field(1e-4, ge=0.0)
    similarity: Literal["cosine", "dot"] = "cosine"
    logit_scale: float = Field(10.0, gt=0.0)
    checkpoint_every: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _ce_needs_cached_items(self) -> "TrainParams":
        if self.loss == "ce" and self.mirm_trainable:
            raise ValueError(
                "loss: ce scores every catalog item at each step, which end to end (mirm_trainable: true) means running "
                "MIRM over the whole catalog per step: use loss: sampled_ce end to end, or mirm_trainable: false"
            )
        return self


# ---------------------------------------------------------------------- late fusion
# late ID fusion (issue 13): Molar's score + w x SASRec's, w chosen on validation (stage
# train-late-fusion, molar/models/late_fusion.py); an ensemble, not a model of its own
EnsembleName = Literal["molar+sasrec"]


class LateFusionParams(Section):
    weights: list[Annotated[float, Field(ge=0.0)]] = Field([0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0], min_length=1)


# ----------------------------------------------------------------------------- eval
ModelName = Literal["popularity", IdModelName, "molar", EnsembleName]  # what eval.models and ci.floors may name


class EvalParams(Section):
    ks: list[int] = [10, 20, 50]
    mask_history: bool = True
    user_chunk_size: int = Field(1024, ge=1)
    models: list[ModelName] = ["popularity", "fpmc", "gru4rec", "sasrec", "sasrec-text", "sasrec-image", "sasrec-text-image", "molar"]

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("needs a non-empty list of positive integers, e.g. [10, 20, 50]")
        return sorted(set(v))


# ------------------------------------------------------------------------------- ci
class Floor(Section):
    """A model's metric must be above ``factor`` x the ``over`` model's metric and above ``min``."""

    over: ModelName | None = None
    factor: float = Field(1.0, gt=0.0)
    min: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _has_a_bound(self) -> "Floor":
        given = self.model_fields_set
        if not given:
            raise ValueError("needs over (a model; optional factor) or min, e.g. {over: popularity, factor: 2.0}")
        if "factor" in given and self.over is None:
            raise ValueError("factor needs over: the model whose metric it multiplies")
        return self


class CiParams(Section):
    """molar check-metrics (molar/check_metrics.py)."""

    metrics: list[str] = ["ndcg@10"]
    floors: dict[ModelName, Floor] = {
        "fpmc": Floor(over="popularity", factor=2.0),
        "gru4rec": Floor(over="popularity", factor=2.0),
        "duorec": Floor(over="popularity", factor=2.0),
        "sasrec": Floor(over="popularity", factor=2.0),
        "sasrec-text": Floor(over="popularity", factor=2.0),
        "sasrec-image": Floor(over="popularity", factor=2.0),
        "sasrec-text-image": Floor(over="popularity", factor=2.0),
        "molar": Floor(over="popularity", factor=1.5),
    }
    tolerance: float = Field(0.01, ge=0.0, le=1.0)

    @field_validator("metrics")
    @classmethod
    def _ranking_metrics(cls, v: list[str]) -> list[str]:
        import re

        if not v:
            raise ValueError("needs at least one metric, e.g. [ndcg@10]")
        bad = [m for m in v if not re.fullmatch(r"(ndcg|recall)@[1-9][0-9]*", m)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a metric name; use ndcg@K or recall@K, e.g. ndcg@10")
        return v

    @field_validator("floors")
    @classmethod
    def _not_over_itself(cls, v: dict[str, Floor]) -> dict[str, Floor]:
        selfish = [model for model, floor in v.items() if floor.over == model]
        if selfish:
            raise ValueError(f"a floor of {', '.join(selfish)} is over itself; name another model in over")
        return v


class Params(Section):
    # default_rng takes any non-negative int, torch.manual_seed at most 2**64 - 1
    seed: int = Field(42, ge=0, lt=2**64)
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    sft: SftParams = SftParams()
    mirm: MirmParams = MirmParams()
    sasrec: SasrecParams = SasrecParams()
    sasrec_content: SasrecContentParams = SasrecContentParams()
    fpmc: FpmcParams = FpmcParams()
    gru4rec: Gru4recParams = Gru4recParams()
    duorec: DuorecParams = DuorecParams()
    align: AlignParams = AlignParams()
    dueg: DuegParams = DuegParams()
    train: TrainParams = TrainParams()
    late_fusion: LateFusionParams = LateFusionParams()
    eval: EvalParams = EvalParams()
    threads: int = Field(1, ge=0)
    ci: CiParams = CiParams()

    def section_dict(self, name: str) -> dict:
        """One section as plain data (for hashing the params a stage depends on)."""
        return getattr(self, name).model_dump(mode="json")


def _line_of(text: str, dotted: list[str | int]) -> int | None:
    """1-based line of a dotted key in YAML text (the deepest part that exists)."""
    try:
        node = YAML(typ="rt").load(text)  # round-trip mode: every mapping and list knows its lines
    except YAMLError:
        return None
    line = None
    for part in dotted:
        if isinstance(node, dict):
            key = next((k for k in node if str(k) == str(part)), None)
            if key is None:
                return line
            line, node = node.lc.key(key)[0] + 1, node[key]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            line, node = node.lc.item(part)[0] + 1, node[part]
        else:
            return line
    return line


def _yaml_error(err: YAMLError, source: str) -> str:
    """``file:line: not valid YAML: problem`` from a ruamel error (its own text spans many lines)."""
    if not (isinstance(err, MarkedYAMLError) and err.problem_mark and err.problem):
        return f"{source}: not valid YAML: {err}"
    where = f" ({err.context} at line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
    return f"{source}:{err.problem_mark.line + 1}: not valid YAML: {err.problem}{where}"


def parse_params(text: str, source: str = "params.yaml") -> Params:
    # YAML 1.2 with DVC's own reader (dvc/utils/serialize/_yaml.py: parse_yaml), because
    # `dvc exp run -S` rewrites params.yaml in that dialect (it drops the quotes of "no") and
    # `dvc params diff` reads it so. Under YAML 1.1 (PyYAML) `no` would be False, 5e-3 a string.
    try:
        raw = YAML(typ="safe").load(text) or {}
    except YAMLError as err:
        raise ParamsError(_yaml_error(err, source)) from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections (seed, data, split, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            dotted = ".".join(str(p) for p in loc)
            line = _line_of(text, loc)
            where = f"{source}:{line}" if line else source
            if e["type"] == "extra_forbidden":
                parent = Params
                for p in loc[:-1]:
                    field = parent.model_fields.get(str(p)) if isinstance(parent, type) else None
                    parent = field.annotation if field else None
                # the keys as written in YAML: a field's alias where it has one (duorec.lambda)
                keys = parent.model_fields.items() if isinstance(parent, type) and issubclass(parent, BaseModel) else []
                allowed = sorted(f.alias or name for name, f in keys)
                msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
            else:
                msg = e["msg"]
            got = e.get("input")
            if e["type"] == "bool_type" and isinstance(got, str):
                msg += "; write true or false (in YAML 1.2, as DVC reads it, yes/no/on/off are strings)"
            got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {dotted}: {msg}{got_s}")
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the repository root or pass --params PATH)")
    return parse_params(path.read_text(), str(path))
