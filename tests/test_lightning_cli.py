"""Every privacy callback is configurable from YAML and the command line through LightningCLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import lightning_privacy.callbacks as callbacks

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "defended_digits.yaml"

# minimal command-line arguments for each callback (after `--trainer.callbacks+=<class>`)
CALLBACK_ARGS = {
    "GradientDefense": [
        "--trainer.callbacks.transforms+=lightning_privacy.defenses.MagnitudePruning",
        "--trainer.callbacks.transforms.ratio=0.5",
    ],
    "InversionAudit": [
        "--trainer.callbacks.attack=lightning_privacy.attacks.DeepLeakage",
        "--trainer.callbacks.attack.max_iterations=2",
    ],
    "LeakageMonitor": [
        "--trainer.callbacks.estimator=exact",
        "--trainer.callbacks.num_samples=1",
    ],
    "DPSGD": ["--trainer.callbacks.max_grad_norm=1.0", "--trainer.callbacks.noise_multiplier=1.0"],
}


def _cli_main():
    spec = importlib.util.spec_from_file_location(
        "lightning_cli_example", REPO / "examples" / "lightning_cli.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cli_main


def _fast(tmp_path):
    return [
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.image_size=16",
        "--data.init_args.batch_size=16",
        "--model.init_args.model.init_args.image_size=16",
    ]


def _small_config(tmp_path):
    """The example config with a 2-iteration attack (the rest unchanged)."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("InversionAudit"):
            callback["init_args"]["attack"]["init_args"]["max_iterations"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning_cli.py"])


def test_example_config_fits(tmp_path):
    cli = _cli_main()(["fit", "--config", str(_small_config(tmp_path)), *_fast(tmp_path)])
    defense = next(c for c in cli.trainer.callbacks if type(c).__name__ == "GradientDefense")
    assert [type(t).__name__ for t in defense.transforms] == ["GradientClipping", "GaussianNoise"]
    assert defense.transforms[1].std == 0.01
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"GradientDefense", "InversionAudit", "LeakageMonitor"} <= set(names)
    metrics = cli.trainer.callback_metrics
    assert {"val/acc", "attack/psnr", "leakage/predicted_psnr"} <= set(metrics)


@pytest.mark.parametrize("name", sorted(CALLBACK_ARGS))
def test_callback_from_command_line(tmp_path, name):
    if name not in callbacks.__all__:
        pytest.skip(f"{name} is not in lightning_privacy.callbacks yet")
    args = [
        "fit",
        "--config",
        str(CONFIG),
        *_fast(tmp_path),
        "--trainer.callbacks=[]",
        f"--trainer.callbacks+=lightning_privacy.callbacks.{name}",
        *CALLBACK_ARGS[name],
    ]
    cli = _cli_main()(args)
    found = [c for c in cli.trainer.callbacks if type(c).__name__ == name]
    assert len(found) == 1
    if name == "GradientDefense":
        assert found[0].transforms[0].ratio == 0.5


@pytest.mark.parametrize("name", callbacks.__all__)
def test_every_exported_callback_signature_is_parsable(name):
    """jsonargparse can read the signature of every public callback (so YAML can configure it)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    cls = getattr(callbacks, name)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        pytest.skip(f"{name} is not a callback class")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "callback")
    assert any(a.dest.startswith("callback.") for a in parser._actions)
