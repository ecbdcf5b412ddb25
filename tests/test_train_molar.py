"""The train-molar stage on a small embedded default: loss goes down, outputs load, resume returns the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molar.models.molar import MirmItems

PARAMS = """\
seed: 3
data:
  synthetic: {n_users: 60, n_items: 30, min_length: 8, max_length: 12, image_size: 28}
mirm:
  finetune: none
  embed_batch_size: 16
sasrec:
  epochs: 3
  batch_size: 32
  max_length: 12
align:
  alpha: 0.5
train:
  epochs: 6
  patience: 6
  max_length: 10
  batch_size: 16
  lr: 1.0e-3
  warmup_ratio: 0.0
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory):
    """ingest -> split -> train-mirm (no fine-tune) -> train-id --model sasrec -> train-molar in a scratch directory."""
    from stages import ingest, split, train_id, train_mirm, train_molar

    work = tmp_path_factory.mktemp("molar")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    params = work / "params.yaml"
    params.write_text(PARAMS)
    for stage in (ingest, split, train_mirm):
        stage.main(params)
    train_id.main(params, model="sasrec")
    train_molar.main(params)
    yield work, params
    mp.undo()


def test_training_lowers_the_loss_and_logs_both_terms(stage_run) -> None:
    work, _ = stage_run
    epochs = read_csv(work / "metrics/molar_train/epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == list(range(1, 7))
    losses = [float(r["loss"]) for r in epochs]
    assert losses[-1] < losses[0] - 0.05, losses
    steps = read_csv(work / "metrics/molar_train/steps.csv")
    assert len(steps) == int(json.loads((work / "metrics/molar_train/summary.json").read_text())["steps"])
    assert [int(r["step"]) for r in steps] == list(range(len(steps)))
    for row in steps:  # both loss terms and the collapse signals, every step
        assert float(row["loss"]) == pytest.approx(float(row["bce"]) + 0.5 * float(row["align"]), rel=1e-4, abs=1e-5)
        assert 0 < float(row["user_std"]) and 0 < float(row["item_std"]) and 0 <= float(row["live_negatives"]) <= 1


def test_checkpoint_scores_the_catalog_for_the_evaluator(stage_run) -> None:
    from molar.data.split import load_split
    from molar.evaluate import evaluate_scorer
    from molar.recipes.molar import load_scorer

    work, _ = stage_run
    split = load_split(work / "data/processed")
    score = load_scorer(work / "data/models/molar")
    scores = score(split.test.histories[:5])
    assert scores.shape == (5, split.n_items + 1) and bool(torch.isfinite(scores[:, 1:]).all())
    metrics = evaluate_scorer(score, split.test.histories, split.test.targets, split.n_items, ks=(10,), progress=False)
    summary = json.loads((work / "metrics/molar_train/summary.json").read_text())
    assert 0 <= metrics["ndcg@10"] <= 1 and 0 < summary["valid_ndcg@10"] <= 1
    # the saved item table is MIRM's catalog cache (cached mode trains DUEG only)
    table = load_file(str(work / "data/models/molar/model.safetensors"))["items.table"]
    cache = load_file(str(work / "data/models/mirm-items.safetensors"))["items"]
    assert torch.equal(table, cache)


def test_rerun_returns_the_finished_run_without_training(stage_run) -> None:
    from stages import train_molar

    work, params = stage_run
    before = load_file(str(work / "data/models/molar/model.safetensors"))
    train_molar.main(params)
    summary = json.loads((work / "metrics/molar_train/summary.json").read_text())
    after = load_file(str(work / "data/models/molar/model.safetensors"))
    assert summary["resumed"] is True and "sequences_per_second" not in summary
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_id_model_user_model_trains_and_scores_without_the_llm_decoder(stage_run, tmp_path, monkeypatch) -> None:
    """dueg.kind sasrec: the stage loads MIRM (the item table) only, never a backbone for DUEG, and
    saves a checkpoint the evaluator scores with the SASRec encoder over MIRM items."""
    import shutil

    import molar.backbones
    from molar.recipes.molar import load_scorer
    from stages import train_molar

    work, _ = stage_run
    shutil.copytree(work / "data", tmp_path / "data", ignore=shutil.ignore_patterns("state", "molar"))
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS + "dueg:\n  kind: sasrec\n")
    loaded = []
    load_backbone = molar.backbones.load_backbone

    def recording(directory, *args, **kwargs):
        loaded.append(Path(directory))
        return load_backbone(directory, *args, **kwargs)

    monkeypatch.setattr(molar.backbones, "load_backbone", recording)
    monkeypatch.chdir(tmp_path)
    train_molar.main(params)
    assert loaded == [Path("data/models/mirm")]
    model_dir = tmp_path / "data/models/molar"
    meta = json.loads((model_dir / "molar.json").read_text())
    assert meta["dueg_kind"] == "sasrec" and meta["dueg_init"] is None and not (model_dir / "decoder").exists()
    assert json.loads((model_dir / "user_model/config.json").read_text())["model"] == "sasrec"
    epochs = read_csv(tmp_path / "metrics/molar_train/epochs.csv")
    assert float(epochs[-1]["loss"]) < float(epochs[0]["loss"]) - 0.05, epochs
    summary = json.loads((tmp_path / "metrics/molar_train/summary.json").read_text())
    from molar.data.split import load_split
    from molar.evaluate import evaluate_scorer

    split = load_split(tmp_path / "data/processed")
    score = load_scorer(model_dir)
    metrics = evaluate_scorer(score, split.valid.histories, split.valid.targets, split.n_items, ks=(10,), progress=False)
    assert metrics["ndcg@10"] == pytest.approx(summary["valid_ndcg@10"], abs=1e-6)  # the saved model is the selected one


def test_end_to_end_mode_sends_gradients_into_the_item_model() -> None:
    # A stand-in MIRM (an embedding table behind the same embed(module, ids) call the stage uses):
    # gradients must reach it for the batch's items only, and refresh() must rebuild the table.
    mirm = torch.nn.Embedding(6, 4)

    def embed(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return module(ids) * 2.0

    items = MirmItems(mirm, embed, torch.zeros(6, 4), refresh_batch=2)  # the starting catalog's centre: 0
    hist, pos = items.vectors(torch.tensor([[0, 1, 2], [0, 0, 3]]), torch.tensor([2, 4]))
    assert hist.shape == (2, 3, 4) and pos.shape == (2, 4)
    assert torch.equal(hist[0, 0], torch.zeros(4))  # padding is a zero vector, not item 0's row
    batch_mean = mirm.weight[1:5].mean(0) * 2.0  # of the distinct items 1-4, each counted once
    torch.testing.assert_close(pos[1], mirm.weight[4] * 2.0 - batch_mean)
    (hist[..., 0].sum() + pos[..., 0].sum()).backward()  # dimension 0 only: the re-centring spreads its gradient
    touched = (mirm.weight.grad.abs().sum(1) > 0).nonzero().view(-1).tolist()
    assert touched == [1, 2, 3, 4]  # items embedded once each, row 0 and 5 untouched
    items.refresh()
    weights = mirm.weight[1:].detach() * 2.0
    torch.testing.assert_close(items.table[1:], weights - weights.mean(0))
    assert torch.equal(items.table[0], torch.zeros(4))


def test_end_to_end_items_stay_centred_where_the_catalog_started() -> None:
    # MIRM's states all shifted by +5 (as a training step moves them together): the batch and the refreshed
    # table come back to the starting catalog's mean, and what tells the items apart is kept.
    start = torch.tensor([[0.0, 0.0], [1.0, 3.0], [3.0, 1.0], [2.0, 2.0]])  # row 0 padding; centre (2, 2)
    shifted = torch.nn.Embedding.from_pretrained(start + 5.0)
    items = MirmItems(shifted, lambda m, ids: m(ids), start, refresh_batch=2)
    (pos,) = items.vectors(torch.tensor([1, 2]))
    torch.testing.assert_close(pos, torch.tensor([[1.0, 3.0], [3.0, 1.0]]))  # batch mean (9, 9) -> (2, 2)
    items.refresh()
    torch.testing.assert_close(items.table, start)


def test_parts_with_their_own_lr_get_their_own_adamw_group() -> None:
    from molar.config import TrainParams
    from molar.models.molar import ItemIdEmbedding
    from molar.recipes.molar import param_groups

    class Stand(torch.nn.Module):  # what param_groups reads of a MolarModel: .items, .item_ids and the parameters
        def __init__(self, items: torch.nn.Module, item_ids: torch.nn.Module | None = None) -> None:
            super().__init__()
            self.items, self.dueg, self.item_ids = items, torch.nn.Linear(4, 4), item_ids

    t = TrainParams(lr=2e-4, mirm_lr=3e-5, item_id_lr_scale=10.0)
    mirm = torch.nn.Embedding(6, 4)
    end_to_end = Stand(MirmItems(mirm, lambda m, ids: m(ids), torch.zeros(6, 4), refresh_batch=2))
    rest, item_side = param_groups(end_to_end, t)
    assert [id(p) for p in item_side["params"]] == [id(mirm.weight)] and item_side["lr"] == 3e-5
    assert {id(p) for p in rest["params"]} == {id(p) for p in end_to_end.dueg.parameters()} and "lr" not in rest
    assert param_groups(Stand(torch.nn.Identity()), t) is None  # cached items, no ID table: one group at train.lr

    ids = ItemIdEmbedding(5, 4, 3, 1.0, 1.0)
    early = Stand(torch.nn.Identity(), ids)
    rest, id_side = param_groups(early, t)
    assert {id(p) for p in id_side["params"]} == {id(ids.inputs.weight), id(ids.candidates.weight)}
    assert id_side["lr"] == pytest.approx(2e-3)  # train.lr x item_id_lr_scale
    assert {id(p) for p in rest["params"]} == {id(p) for p in early.dueg.parameters()}
    assert param_groups(early, TrainParams(lr=2e-4, item_id_lr_scale=1.0)) is None  # scale 1: the ID table at train.lr
    both = param_groups(Stand(MirmItems(mirm, lambda m, ids: m(ids), torch.zeros(6, 4), refresh_batch=2), ids), t)
    assert [group.get("lr") for group in both] == [None, 3e-5, pytest.approx(2e-3)]


class Interrupted(Exception):
    """Stands in for kill -9: raised mid-epoch, nothing after it runs."""


def test_interrupted_run_resumes_to_the_same_weights_and_log(stage_run, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from molar.models import molar as M
    from stages import train_molar

    work, params = stage_run
    reference = load_file(str(work / "data/models/molar/model.safetensors"))
    reference_steps = read_csv(work / "metrics/molar_train/steps.csv")
    shutil.rmtree(work / "data/state/train-molar")  # forget the finished run

    append = M.StepLog.append
    fired = []

    def dying_append(self, step: int, logs: dict) -> None:
        append(self, step, logs)
        if step == 9 and not fired:  # mid-epoch 3: the last checkpoint is the end of epoch 2
            fired.append(step)
            raise Interrupted

    monkeypatch.setattr(M.StepLog, "append", dying_append)
    with pytest.raises(Interrupted):
        train_molar.main(params)
    train_molar.main(params)  # resumes: replays steps 8-9 from the epoch-2 checkpoint
    resumed = load_file(str(work / "data/models/molar/model.safetensors"))
    assert fired == [9] and resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert read_csv(work / "metrics/molar_train/steps.csv") == reference_steps  # replayed steps not duplicated


@pytest.mark.slow
def test_two_process_training_shards_batches_and_keeps_weights_in_sync(stage_run, tmp_path) -> None:
    """train-id --model sasrec and train-molar under torchrun (2 CPU processes, gloo, DDP): each process takes
    half of an epoch's batches, the gradients are averaged (one set of weights: both processes
    validate to the same metrics), and only the main process writes the outputs."""
    import os
    import shutil
    import subprocess
    import sys

    work, _ = stage_run
    shutil.copytree(work / "data", tmp_path / "data", ignore=shutil.ignore_patterns("state", "molar"))
    params = PARAMS.replace("  epochs: 6\n  patience: 6\n", "  epochs: 2\n  patience: 2\n").replace("align:\n  alpha: 0.5", "align:\n  alpha: 0.0")
    (tmp_path / "params.yaml").write_text(params)
    script = tmp_path / "run_stages.py"
    script.write_text(  # each process also records the history its own fit returned
        "import json, os\nfrom pathlib import Path\nfrom molar.recipes import molar as M\n"
        "from stages import train_id, train_molar\n"
        "fit_molar = M.train_molar\n"
        "def recording(*args, **kwargs):\n"
        "    result, log = fit_molar(*args, **kwargs)\n"
        "    Path(f\"history-{os.environ['RANK']}.json\").write_text(json.dumps(result.history))\n"
        "    return result, log\n"
        "M.train_molar = recording\n"
        "train_id.main(Path('params.yaml'), model='sasrec')\ntrain_molar.main(Path('params.yaml'))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
    done = subprocess.run([*torchrun, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # 60 users (all usable), batch 16: 4 batches per epoch, 2 per process; 2 epochs
    summary = json.loads((tmp_path / "metrics/molar_train/summary.json").read_text())
    assert summary["steps"] == 4 and summary["epochs_run"] == 2
    # both processes validated the same weights after training on different halves of the batches
    h0, h1 = (json.loads((tmp_path / f"history-{rank}.json").read_text()) for rank in (0, 1))
    assert [r["valid_ndcg@10"] for r in h0] == [r["valid_ndcg@10"] for r in h1]
    assert [r["loss"] for r in h0] != [r["loss"] for r in h1]
    steps = read_csv(tmp_path / "metrics/molar_train/steps.csv")
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3]  # the main process's log, one row per step
    assert (tmp_path / "data/models/molar/model.safetensors").exists()
    assert (tmp_path / "data/models/sasrec/model.safetensors").exists()


def test_gradient_checkpointing_recomputes_the_decoder_and_keeps_loss_and_gradients() -> None:
    # train.gradient_checkpointing trades compute for memory only: the same step, the same numbers
    from test_early_fusion import molar_of  # tests/test_early_fusion.py
    from test_id_dueg import N_ITEMS, a_batch  # tests/test_id_dueg.py

    from molar.models.molar import MolarObjective, ObjectiveSettings
    from molar.recipes.molar import checkpoint_activations

    steps = []
    for checkpointed in (False, True):
        model = molar_of("llm", False).train()
        if checkpointed:
            checkpoint_activations(model)
        layers = model.dueg.decoder.layers
        assert all(getattr(layer, "gradient_checkpointing", False) == checkpointed for layer in layers)
        objective = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, alpha=0.0), id_model=None)
        torch.manual_seed(7)  # the same negatives
        loss, _ = objective(model, a_batch())
        loss.backward()
        steps.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = steps
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and any(n.startswith("dueg.decoder.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
