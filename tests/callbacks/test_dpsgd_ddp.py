"""2-process DDP DP-SGD on CPU (gloo): replicas stay identical, ε equals one process's."""

import textwrap

import pytest
import torch
from ddp_launch import run_script
from helpers import BoringModel, digits_datamodule, fit

from lightning_privacy.callbacks.dpsgd import DPSGD

# run through ddp_launch.run_script, which puts tests/ on PYTHONPATH for helpers; the module is
# the shared one without BatchNorm (Opacus has no per-sample gradients for it)
SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning as L
    from helpers import BoringModel, ddp_trainer_kwargs, digits_datamodule, fit
    from lightning.pytorch.callbacks import Callback
    from lightning_privacy.callbacks.dpsgd import DPSGD

    torch.set_num_threads(1)
    out = sys.argv[1]


    class Save(Callback):
        # listed after DPSGD, so its teardown runs after DPSGD's (inside each worker)
        def __init__(self, dp):
            self.dp = dp

        def teardown(self, trainer, pl_module, stage):
            torch.save(
                {
                    "params": [p.detach().clone() for p in pl_module.parameters()],
                    "epsilon": self.dp.epsilon, "steps": self.dp.accountant.steps,
                    "sample_rate": self.dp.sample_rate, "delta": self.dp.delta,
                    "world_size": trainer.world_size,
                    "hooks_left": any(
                        hasattr(m, "autograd_grad_sample_hooks") or len(m._forward_hooks) > 0
                        for m in trainer.strategy.model.modules()
                    ),
                    "optimizer": type(trainer.optimizers[0]).__name__,
                    "dp_optimizer": type(self.dp_opt).__name__,
                    "local_grad": self.local_grad,
                    "stopped_reason": self.dp.stopped_reason,
                },
                f"{out}/rank{trainer.global_rank}.pt",
            )

        def on_train_end(self, trainer, pl_module):
            self.dp_opt = trainer.optimizers[0]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # with DPSGD's no-op comm hook DDP does not all-reduce the unclipped gradient
            if not hasattr(self, "local_grad"):
                self.local_grad = next(pl_module.parameters()).grad.detach().clone()


    if __name__ == "__main__":
        L.seed_everything(0, verbose=False)
        module = BoringModel(batch_norm=False, lr=0.5)
        # max_epsilon: epoch 3 would pass 1.53 (eps after 2 epochs: 1.48, after 3: 1.58)
        dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, max_epsilon=1.53)
        fit(
            ddp_trainer_kwargs(start_method="fork"), [dp, Save(dp)], module, digits_datamodule(),
            use_distributed_sampler=False, max_epochs=3, limit_train_batches=3,
            limit_val_batches=0,
        )
    """
)


@pytest.mark.ddp
def test_ddp_dpsgd_replicas_identical_and_epsilon_as_single_process(tmp_path, fast_trainer_kwargs):
    script = tmp_path / "ddp_dpsgd.py"
    script.write_text(SCRIPT)
    run_script(script, str(tmp_path), cwd=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    init = list(BoringModel(batch_norm=False).parameters())  # seeded as in the script
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], init, strict=True))  # it trained
    assert r0["steps"] == r1["steps"] == 6
    assert r0["epsilon"] == r1["epsilon"]
    # max_epsilon stopped both ranks after epoch 2 of 3, with the reason
    for r in (r0, r1):
        assert r["stopped_reason"] is not None and "max_epsilon=1.53" in r["stopped_reason"]
    assert not r0["hooks_left"] and not r1["hooks_left"]
    assert r0["dp_optimizer"] == "DistributedDPOptimizer"  # noise on rank 0 only
    assert r0["optimizer"] == "SGD"  # restored after fit
    # DDP's own all-reduce is silenced: each rank's unclipped batch gradient stayed local
    assert not torch.allclose(r0["local_grad"], r1["local_grad"])

    # the same global batch (64) in one process gives the same sample rate, steps and ε
    single = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    module = BoringModel(batch_norm=False)
    data = digits_datamodule(batch_size=64)
    kw = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    fit(fast_trainer_kwargs, [single], module, data, **kw)
    assert single.sample_rate == r0["sample_rate"]
    assert single.delta == r0["delta"]
    assert single.accountant.steps == 6
    assert single.epsilon == r0["epsilon"]
