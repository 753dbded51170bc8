"""InversionAudit's scalars and grids reach each logger; each test reads back what it wrote.

The grids are images of held-out data: they go to the loggers and to ``image_dir`` only, PNG
files written here are 0600 in 0700 folders, and nothing lands in the working directory.
"""

import csv
import io
import json
import os
import stat
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from helpers import digits, digits_loader, fit
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import InversionAudit
from lightning_privacy.callbacks import _images as images

NOWHERE = "nowhere to put"
GRID_SIZE = (10, 19)  # PIL (width, height): 1 column, truth over reconstruction, 8x8, padding 1


@pytest.fixture(autouse=True)
def _permissive_umask():
    """A umask that alone would give 0644 files, so the tests see what the package sets."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _audit(**kwargs):
    return InversionAudit(
        InvertingGradients(max_iterations=2), batch=digits(2), every_n_train_steps=1, **kwargs
    )


def _fit(fast_trainer_kwargs, logger, **audit_kwargs):
    """Two training steps with an audit after each."""
    audit = _audit(**audit_kwargs)
    trainer, _ = fit(
        fast_trainer_kwargs,
        [audit],
        train=digits_loader(32),
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
    )
    assert trainer.global_step == 2 and len(audit.history) == 2
    return trainer, audit


def _mode(path):
    return stat.S_IMODE(Path(path).stat().st_mode)


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))


def _assert_truth_on_top(png):
    """The grid's top cell is the held-out digit, pixel for pixel (as the PNG rounds it)."""
    image = Image.open(png if isinstance(png, Path) else io.BytesIO(png)).convert("L")
    assert image.size == GRID_SIZE
    top = torch.tensor(list(image.getdata()), dtype=torch.uint8).reshape(19, 10)[1:9, 1:9]
    truth = digits(1)[0][0, 0].mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(top, truth)


def _assert_private(folder, names):
    assert sorted(p.name for p in folder.iterdir()) == names
    assert _mode(folder) == 0o700
    for name in names:
        assert _mode(folder / name) == 0o600


STEP_PNGS = ["step_0000001.png", "step_0000002.png"]


def test_tensorboard_event_file_has_scalars_grid_and_threat_model(fast_trainer_kwargs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    _fit(fast_trainer_kwargs, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("attack/psnr")] == [1, 2]
    grids = events.Images("attack/reconstruction")
    assert [g.step for g in grids] == [1, 2]
    _assert_truth_on_top(grids[-1].encoded_image_string)
    (text,) = events.Tensors("attack/threat_model/text_summary")[-1:]
    threat = json.loads(text.tensor_proto.string_val[0])
    assert threat["attack"] == "InvertingGradients" and threat["labels_known"] is False
    assert not list(tmp_path.rglob("*.png"))  # the grids live in the event file only


def test_csv_metrics_and_private_pngs_under_its_log_dir(fast_trainer_kwargs, tmp_path):
    logger = CSVLogger(tmp_path / "csv")
    _fit(fast_trainer_kwargs, logger)
    log_dir = Path(logger.log_dir)
    with open(log_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("attack/psnr")]
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert all(float(row["attack/psnr"]) > 0 for row in rows)
    _assert_private(log_dir / "inversion_audit", STEP_PNGS)
    _assert_truth_on_top(log_dir / "inversion_audit" / "step_0000002.png")
    assert [p for p in tmp_path.rglob("*.png") if log_dir not in p.parents] == []


def _wandb_records(path):
    """The records of a W&B run file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # the writer is still on this record
            return
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def _wandb_history(run_file, seconds=60.0):
    """The history rows of an offline run file, once wandb's service has written them.

    ``wandb.finish()`` returns before its separate writer process has always flushed the file on
    a loaded machine (an empty history was read in one of three full-suite runs, a half-written
    record in another); poll until the rows parse and stop changing.
    """
    from google.protobuf.message import DecodeError

    deadline, previous = time.monotonic() + seconds, None
    while True:
        try:
            history = [
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                for r in _wandb_records(run_file)
                if r.WhichOneof("record_type") == "history"
            ]
        except DecodeError:  # read while a record was half written: read again
            if time.monotonic() > deadline:
                raise
            history = None
        if (history and history == previous) or time.monotonic() > deadline:
            return history
        previous = history
        time.sleep(0.5)


def test_wandb_offline_run_has_scalars_and_a_media_image(
    fast_trainer_kwargs, tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    logger = WandbLogger(save_dir=tmp_path / "dir", offline=True, project="audit")
    try:
        _fit(fast_trainer_kwargs, logger)
    finally:
        wandb.finish()
    (run_dir,) = (tmp_path / "dir" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    history = _wandb_history(run_file)
    psnr = [row for row in history if "attack/psnr" in row]
    assert [row["trainer/global_step"] for row in psnr] == [1, 2]
    grids = [row for row in history if "attack/reconstruction/filenames" in row]
    assert [row["trainer/global_step"] for row in grids] == [1, 2]
    (media,) = grids[-1]["attack/reconstruction/filenames"]
    _assert_truth_on_top(run_dir / "files" / media)
    assert any("attack/threat_model/_type" in row for row in history)


def test_mlflow_file_store_has_metrics_and_the_image_artifact(
    fast_trainer_kwargs, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opts in to file stores
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # MLflow keeps an id under ~/.config
    uri = f"file:{tmp_path}/mlruns"
    logger = MLFlowLogger(experiment_name="audit", tracking_uri=uri)
    _fit(fast_trainer_kwargs, logger)
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "attack/psnr")
    assert [m.step for m in history] == [1, 2]
    artifacts = Path(unquote(urlparse(client.get_run(logger.run_id).info.artifact_uri).path))
    pngs = sorted(p.name for p in (artifacts / "images").glob("*.png"))
    assert [name.split("+")[:3] for name in pngs] == [
        ["attack~reconstruction", "step", "1"],
        ["attack~reconstruction", "step", "2"],
    ]
    _assert_truth_on_top(artifacts / "images" / pngs[-1])
    text = artifacts / "inversion_audit" / "attack_threat_model_step_0000002.txt"
    assert json.loads(text.read_text())["attack"] == "InvertingGradients"


def test_image_dir_gets_private_pngs_and_nothing_else_is_written(
    fast_trainer_kwargs, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    image_dir = tmp_path / "private" / "grids"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(fast_trainer_kwargs, False, image_dir=image_dir)
    assert not [w for w in caught if NOWHERE in str(w.message)]
    assert _tree(tmp_path) == [
        "private",
        "private/grids",
        *(f"private/grids/{n}" for n in STEP_PNGS),
    ]
    _assert_private(image_dir, STEP_PNGS)
    assert _mode(image_dir.parent) == 0o700
    _assert_truth_on_top(image_dir / "step_0000001.png")


def test_no_logger_no_image_dir_writes_nothing_and_warns_once(
    fast_trainer_kwargs, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the working directory is default_root_dir too
    (tmp_path / "mine.txt").write_text("the test's own file")
    before = _tree(tmp_path)
    with pytest.warns(UserWarning, match=NOWHERE) as caught:
        _fit(fast_trainer_kwargs, False)
    assert _tree(tmp_path) == before
    assert sum(NOWHERE in str(w.message) for w in caught) == 1
    assert "image_dir=" in next(str(w.message) for w in caught if NOWHERE in str(w.message))


# ---------------------------------------------------------------- the pieces, without a fit
def _trainer(tmp_path, logger):
    import lightning as L

    return L.Trainer(
        logger=logger, default_root_dir=str(tmp_path), enable_progress_bar=False, devices=1
    )


def test_lightnings_own_csv_logger_gets_no_pngs(tmp_path, monkeypatch):
    """Without TensorBoard, ``logger=True`` is a CSVLogger in default_root_dir: nobody chose it."""
    monkeypatch.setattr(images, "_tensorboard_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    trainer = _trainer(tmp_path, CSVLogger(save_dir=str(tmp_path)))
    with pytest.warns(UserWarning, match=NOWHERE):
        assert images.send_image(trainer, torch.ones(3, 4, 4), 1) == []
    assert not list(tmp_path.rglob("*.png"))  # (the logger's own csv folder may be there)
    named = _trainer(tmp_path, CSVLogger(save_dir=str(tmp_path / "mine")))
    assert len(images.send_image(named, torch.ones(3, 4, 4), 1)) == 1


class _Broken(Logger):
    name, version = "broken", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        raise OSError("disk full")


def test_a_failing_logger_warns_and_the_others_still_get_the_grid(tmp_path):
    csv_logger = CSVLogger(tmp_path / "csv")
    trainer = _trainer(tmp_path, [_Broken(), csv_logger])
    with pytest.warns(RuntimeWarning, match="to _Broken: OSError: disk full"):
        (where,) = images.send_image(trainer, torch.ones(1, 4, 4), 3)
    assert _mode(where) == 0o600


def test_an_existing_file_is_made_private(tmp_path):
    path = tmp_path / "step.png"
    path.write_bytes(b"old")
    path.chmod(0o644)
    images.write_private_png(torch.zeros(3, 2, 2), path)
    assert _mode(path) == 0o600 and Image.open(path).size == (2, 2)


def test_bad_arguments_name_the_argument_and_the_value(tmp_path):
    with pytest.raises(TypeError, match=r"`image_dir` to be None or a path .* but got 3 \(int\)"):
        _audit(image_dir=3)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`image_dir` to be a directory .*file'"):
        _audit(image_dir=tmp_path / "file")
    with pytest.raises(ValueError, match=r"`grid` to be a \(C, H, W\) tensor .* got \(2, 2\)"):
        images.write_private_png(torch.zeros(2, 2), tmp_path / "x.png")
