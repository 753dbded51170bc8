"""The branches a CPU cannot reach: fp16 with a GradScaler, bf16, NCCL comm hooks, CUDA RNG.

Run with ``make test-gpu`` on a machine with CUDA; on a CPU machine every test skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import BoringModel, Recorder, digits, loader

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import DPSGD, GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.defenses import GaussianNoise, GradientClipping, MagnitudePruning

GPU = dict(
    accelerator="gpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def train_loader():
    x, y = digits(64)
    return loader(x, y, batch_size=16)


PIPELINES = {
    "noise": [GaussianNoise(std=0.01)],
    "clipping": [GradientClipping(max_norm=0.05)],
    "pruning": [MagnitudePruning(ratio=0.7)],
}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_defense_on_one_gpu_under_mixed_precision(name, precision):
    post = Recorder()
    defense = GradientDefense(PIPELINES[name], seed=0)
    module = BoringModel(lr=0.1, dropout=0.0)
    trainer = L.Trainer(max_steps=2, precision=precision, callbacks=[defense, post], **GPU)
    trainer.fit(module, train_loader())
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None  # a real GradScaler on CUDA
    for step in range(2):
        defended = post.grads[step]
        for n, d in defended.items():
            assert d.is_cuda
            update = post.after[step][n] - post.before[step][n]
            torch.testing.assert_close(update, -0.1 * d, rtol=0, atol=1e-5)  # SGD on the defence
        if name == "clipping":
            norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in defended.values()]))
            assert norm.item() == pytest.approx(0.05, rel=1e-3)  # unscaled, then clipped
        if name == "pruning":  # per tensor, floor(ratio * n) entries zeroed (ties: more)
            for d in defended.values():
                assert int((d == 0).sum()) >= int(0.7 * d.numel())


def test_ddp_comm_hook_under_nccl_on_every_gpu(tmp_path):
    script = Path(__file__).with_name("ddp_gpu_script.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = tmp_path / "report.txt"
    result = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert lines["hook_registered"] == "True" and lines["replicas_equal"] == "True"


def _dpsgd_epsilon(accelerator: str) -> float:
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.1)
    kwargs = {**GPU, "accelerator": accelerator}
    trainer = L.Trainer(max_steps=3, callbacks=[dp], **kwargs)
    trainer.fit(BoringModel(batch_norm=False, dropout=0.0), train_loader())
    return dp.epsilon


def test_dpsgd_on_cuda_spends_the_cpu_run_s_epsilon():
    assert _dpsgd_epsilon("gpu") == _dpsgd_epsilon("cpu")


def _fit_with(callbacks):
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    module = BoringModel(lr=0.1)  # BatchNorm and dropout: both draw on or change CUDA state
    trainer = L.Trainer(max_steps=3, callbacks=callbacks, **GPU)
    # cuDNN's default backward kernels sum in a varying order (atomics): two identical runs
    # differ in the last bits without its deterministic ones (set here only, then restored)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        trainer.fit(module, train_loader())
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    return module, torch.cuda.get_rng_state(), trainer


def test_observers_on_cuda_leave_training_bitwise_unchanged():
    x, y = digits(8)
    plain, plain_rng, _ = _fit_with([GradientDefense(GaussianNoise(std=1e-3), seed=1)])
    audit = InversionAudit(
        InvertingGradients(max_iterations=3), batch=(x, y), every_n_train_steps=1, log_images=False
    )
    monitor = LeakageMonitor(
        batch=(x, y), every_n_train_steps=1, num_samples=1, estimator="lower_bound"
    )
    watched, watched_rng, trainer = _fit_with(
        [GradientDefense(GaussianNoise(std=1e-3), seed=1), audit, monitor]
    )
    for (n, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(plain_rng, watched_rng)  # the CUDA generator too
    assert audit.generator.device.type == "cuda" and monitor.generator.device.type == "cuda"
    assert audit.last is not None and audit.last.inputs.numel() > 0
    assert trainer.callback_metrics["attack/failed"].item() == 0.0
    assert trainer.callback_metrics["leakage/failed"].item() == 0.0


def test_held_out_batch_is_moved_to_the_model_s_device():
    x, y = digits(4)
    audit = InversionAudit(
        InvertingGradients(max_iterations=1), batch=(x, y), every_n_train_steps=1, log_images=False
    )
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(audit._device_held_out(pl_module)[0].device.type)

    _fit_with([audit, Probe()])
    assert x.device.type == "cpu" and set(seen) == {"cuda"}
    assert F.mse_loss(audit.last.inputs.float(), x[:1]).isfinite()


@pytest.mark.parametrize("estimator", ["exact", "approximate"])
def test_i2f_on_cuda_matches_the_cpu_under_default_tf32(estimator):
    """cuDNN's TF32 default would move ``J Jᵀ``'s small eigenvalues: the estimate turns it off."""
    from lightning_privacy.leakage import estimate_leakage

    torch.manual_seed(0)
    model = torch.nn.Sequential(  # convolutions: what cuDNN runs in TF32
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, 10),
    )
    x, y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3])
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default on CUDA
    values = {}
    for device in ("cpu", "cuda"):
        values[device] = estimate_leakage(
            model.to(device),
            x.to(device),
            y.to(device),
            transforms=[GradientClipping(max_norm=1e-3)],  # deterministic: the same δ on both
            estimator=estimator,
        ).i2f
    assert torch.backends.cudnn.allow_tf32  # the user's setting is back
    assert values["cpu"] > 0
    assert abs(values["cuda"] / values["cpu"] - 1) < 1e-2, values
