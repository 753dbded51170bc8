"""MembershipAudit and CanaryAudit in a Trainer: what they measure, what they must never change,
what they refuse before training, and the canary audit that catches a wrong accountant."""

import math
import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import BoringModel, digits, fit, loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_privacy.callbacks import DPSGD, CanaryAudit, MembershipAudit
from lightning_privacy.data import with_canaries
from lightning_privacy.functional import dpsgd_epsilon
from lightning_privacy.functional.membership import auc, loss_scores
from lightning_privacy.membership import RMIA, LiRAOffline

KEYS = {
    "membership/auc",
    "membership/auc_low",
    "membership/auc_high",
    "membership/advantage",
    "membership/tpr_at_fpr_0.01",
    "membership/tpr_at_fpr_0.001",
    "membership/epsilon_lower_bound",
    "membership/failed",
}


def _split(n_train=300, n_val=300):
    """Disjoint training and validation digits from one shuffled pool (one distribution)."""
    x, y = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[-n_val:], y[-n_val:])
    return train, val


def _loaders(n_train=300, n_val=300, batch_size=32):
    train, val = _split(n_train, n_val)
    g = torch.Generator().manual_seed(0)
    return (
        DataLoader(train, batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size),
    )


def _quiet_fit(kwargs, callbacks, module=None, **overrides):
    train, val = overrides.pop("loaders", None) or _loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fit(kwargs, callbacks, module or BoringModel(), train, val, **overrides)


def test_logs_every_metric_and_draws_its_sample_from_the_train_and_validation_data(
    fast_trainer_kwargs,
):
    audit = MembershipAudit("loss", num_samples=120, log_roc=False)
    trainer, _ = _quiet_fit(fast_trainer_kwargs, [audit], max_epochs=2, limit_val_batches=1)
    assert set(trainer.callback_metrics) >= KEYS
    assert len(audit.history) == 2 and audit.history[0]["num_members"] == 120
    assert audit.history[0]["num_nonmembers"] == 120
    assert math.isnan(trainer.callback_metrics["membership/tpr_at_fpr_0.001"].item())  # 120 < 1000
    assert trainer.callback_metrics["membership/failed"].item() == 0.0
    train, val = _split()
    members = audit._indices["members"]
    assert torch.equal(audit._data["members"][0], train.tensors[0][members])  # from training data
    assert torch.equal(audit._data["nonmembers"][0], val.tensors[0][audit._indices["nonmembers"]])


def test_the_audit_never_changes_the_training_trajectory(fast_trainer_kwargs):
    """BatchNorm + dropout module, measured after every step: weights, buffers and RNG bitwise."""

    def run(callbacks):
        L.seed_everything(3)
        _, module = _quiet_fit(fast_trainer_kwargs, callbacks, max_epochs=2)
        return module, torch.get_rng_state()

    plain, state = run([])
    audit = MembershipAudit(
        "modified_entropy", every_n_train_steps=1, num_samples=50, per_class=True, log_roc=False
    )
    audited, audited_state = run([audit])
    assert len(audit.history) == 20
    for (name, a), b in zip(plain.state_dict().items(), audited.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # running_mean / num_batches_tracked included
    assert torch.equal(state, audited_state)


def test_an_untrained_model_gives_auc_one_half_within_its_interval(fast_trainer_kwargs):
    """Five independent random splits of the digits, 400 members and 400 non-members each, an
    untrained model: each 95 % interval covers one half with probability 0.95, so at least four
    of the five must (a 2.3 % chance to fail for a correct interval)."""
    x, y = digits()
    results = []
    for k in range(5):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + k))
        train, val = order[:800], order[800:1600]
        audit = MembershipAudit("loss", num_samples=400, seed=k, log_roc=False)
        _quiet_fit(
            fast_trainer_kwargs,
            [audit],
            BoringModel(lr=0.0, seed=k),
            max_epochs=1,
            limit_train_batches=1,
            loaders=(loader(x[train], y[train], batch_size=32), loader(x[val], y[val])),
        )
        results.append(audit.history[0])
    covered = [r["membership/auc_low"] < 0.5 < r["membership/auc_high"] for r in results]
    assert sum(covered) >= 4, results
    mean = sum(r["membership/auc"] for r in results) / len(results)
    assert abs(mean - 0.5) < 0.03
    assert sum(r["membership/epsilon_lower_bound"] > 0 for r in results) <= 1


def test_an_overfitted_model_is_caught(fast_trainer_kwargs):
    """A wide MLP trained 60 epochs on 60 digits: the interval sits well above one half."""
    audit = MembershipAudit("loss", num_samples=60, every_n_epochs=60, log_roc=False)
    model = BoringModel(conv=False, batch_norm=False, dropout=0.0, width=256, lr=0.5)
    trainer, _ = _quiet_fit(
        fast_trainer_kwargs, [audit], model, max_epochs=60, loaders=_loaders(60, 300, 16)
    )
    m = trainer.callback_metrics
    assert m["membership/auc_low"].item() > 0.6
    assert m["membership/advantage"].item() > 0.2


def test_resume_keeps_the_member_sample(fast_trainer_kwargs, tmp_path):
    kwargs = {**fast_trainer_kwargs, "enable_checkpointing": True}
    first = MembershipAudit("loss", num_samples=40, log_roc=False, seed=0)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _quiet_fit(kwargs, [first, saver], max_epochs=1)
    # another seed would draw another sample ...
    other = MembershipAudit("loss", num_samples=40, log_roc=False, seed=1)
    _quiet_fit(fast_trainer_kwargs, [other], max_epochs=1)
    assert not torch.equal(first._indices["members"], other._indices["members"])
    # ... but resuming restores the checkpointed one, and its history
    resumed = MembershipAudit("loss", num_samples=40, log_roc=False, seed=1)
    _quiet_fit(kwargs, [resumed], max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed._indices["members"], first._indices["members"])
    assert torch.equal(resumed._indices["nonmembers"], first._indices["nonmembers"])
    assert torch.equal(resumed._data["members"][0], first._data["members"][0])
    assert _same(resumed.history[:1], first.history) and len(resumed.history) == 2


def _same(a, b):
    """Equal histories, NaN equal to NaN."""
    clean = lambda h: [{k: ("nan" if v != v else v) for k, v in e.items()} for e in h]  # noqa: E731
    return clean(a) == clean(b)


def test_per_class_metrics(fast_trainer_kwargs):
    audit = MembershipAudit("confidence", num_samples=300, per_class=True, log_roc=False)
    trainer, _ = _quiet_fit(fast_trainer_kwargs, [audit], max_epochs=1)
    classes = {k.split("/")[1] for k in trainer.callback_metrics if "/class_" in k}
    assert classes == {f"class_{c}" for c in range(10)}  # every digit has >= 10 of each
    assert "membership/class_3/auc" in trainer.callback_metrics


def test_bad_input_is_refused_before_training(fast_trainer_kwargs):
    x, y = digits(40)
    with pytest.raises(ValueError, match="members and nonmembers overlap: 5 non-member"):
        MembershipAudit(members=(x[:20], y[:20]), nonmembers=(x[15:35], y[15:35]))
    with pytest.raises(ValueError, match="Expected at least 10 members, but got 9"):
        MembershipAudit(members=(x[:9], y[:9]))
    with pytest.raises(ValueError, match=r"Unknown membership attack 'los'\. Did you mean 'loss'"):
        MembershipAudit("los")
    with pytest.raises(ValueError, match="LiRAOffline needs reference models: pass attack="):
        MembershipAudit("lira_offline")
    with pytest.raises(ValueError, match="RMIA needs population samples"):
        MembershipAudit(RMIA(reference_models=[nn.Linear(64, 10)]))
    with pytest.raises(ValueError, match="`num_samples` to be an int >= 10, but got 5"):
        MembershipAudit(num_samples=5)
    # Trainer-dependent: the same data set on both sides; too small a validation set
    train, val = _split()
    for audit, match in [
        (MembershipAudit(nonmembers=train, log_roc=False), "overlap: 300 non-member"),
        (MembershipAudit(log_roc=False), "Expected at least 10 nonmembers, but got 8"),
    ]:
        small = DataLoader(TensorDataset(*val[:8]), 8)
        trainer = L.Trainer(callbacks=[audit], max_epochs=1, **fast_trainer_kwargs)
        with pytest.raises(ValueError, match=match):
            trainer.fit(BoringModel(), DataLoader(train, 32), small)
        assert trainer.global_step == 0
    trainer = L.Trainer(callbacks=[MembershipAudit()], max_epochs=1, **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="no validation data to draw nonmembers from"):
        trainer.fit(BoringModel(), DataLoader(train, 32))


def test_a_failing_measurement_warns_and_logs_nan(fast_trainer_kwargs):
    class Breaks(BoringModel):
        def __init__(self):
            super().__init__()
            self.broken = False
            self.loss_fn = self._observed

        def on_train_start(self):
            self.broken = True

        def _observed(self, logits, targets):
            if self.broken:
                raise RuntimeError("broken loss")
            return F.cross_entropy(logits, targets)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    audit = MembershipAudit("loss", every_n_train_steps=1, num_samples=20, log_roc=False)
    with pytest.warns(RuntimeWarning, match="broken loss"):
        trainer, _ = fit(fast_trainer_kwargs, [audit], Breaks(), *_loaders(), max_steps=2)
    assert trainer.global_step == 2
    assert trainer.callback_metrics["membership/failed"].item() == 1.0
    assert [h["failed"] for h in audit.history] == ["raised RuntimeError: broken loss"] * 2


def test_the_roc_curve_goes_to_the_logger_and_never_the_working_directory(
    fast_trainer_kwargs, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    audit = MembershipAudit("loss", num_samples=30)
    logger = CSVLogger(tmp_path / "logs")
    _quiet_fit({**fast_trainer_kwargs, "logger": logger}, [audit], max_epochs=1)
    (png,) = (tmp_path / "logs").rglob("membership_audit/step_*.png")
    assert oct(png.stat().st_mode & 0o777) == "0o600"
    assert os.listdir(work) == []


class _Wrapped(L.LightningModule):
    """A user's module around a network the library did not write; dict or tuple batches."""

    def __init__(self, net, dict_batch=False):
        super().__init__()
        self.net, self.dict_batch = net, dict_batch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if self.dict_batch else batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _DictDigits(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_on_torchvision_resnet18_and_a_dict_batch_module(fast_trainer_kwargs):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    x = torch.rand(40, 3, 16, 16)
    y = torch.arange(40) % 10
    audit = MembershipAudit("modified_entropy", num_samples=20, log_roc=False)
    trainer, _ = fit(
        fast_trainer_kwargs,
        [audit],
        _Wrapped(resnet18(num_classes=10)),
        loader(x[:20], y[:20], batch_size=10),
        loader(x[20:], y[20:], batch_size=10),
        max_steps=2,
    )
    assert audit.history[0]["num_members"] == 20 and set(trainer.callback_metrics) >= KEYS

    xd, yd = digits(60)
    audit = MembershipAudit("loss", num_samples=20, per_class=False, log_roc=False)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer, _ = fit(
        fast_trainer_kwargs,
        [audit],
        _Wrapped(net, dict_batch=True),
        DataLoader(_DictDigits(xd[:30], yd[:30]), 10),
        DataLoader(_DictDigits(xd[30:], yd[30:]), 10),
        max_steps=2,
    )
    assert audit.history[0]["num_nonmembers"] == 20


def test_reference_model_attacks_inside_the_callback(fast_trainer_kwargs):
    """LiRA and RMIA with reference models trained on other digits (disjoint from the sample)."""
    x, y = digits()

    def trained(seed, lo, hi):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(net(x[lo:hi]), y[lo:hi]).backward()
            opt.step()
        return net.eval()

    refs = [trained(k, 600 + 100 * k, 700 + 100 * k) for k in range(4)]
    members, nonmembers = (x[:100], y[:100]), (x[300:400], y[300:400])
    population = (x[1600:1700], y[1600:1700])
    for attack in (
        LiRAOffline(reference_models=refs),
        RMIA(reference_models=refs, population=population),
    ):
        audit = MembershipAudit(attack, members=members, nonmembers=nonmembers, log_roc=False)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        trainer, _ = fit(
            fast_trainer_kwargs,
            [audit],
            _Wrapped(net),
            loader(*members, batch_size=20),
            max_epochs=2,
        )
        assert audit.history[-1]["num_reference_models"] == 4
        assert 0.0 <= trainer.callback_metrics["membership/auc"].item() <= 1.0


# ------------------------------------------------------------------------------ CanaryAudit
class _MLP(L.LightningModule):
    def __init__(self, lr=3.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MeanNoiseAccountantDPSGD(DPSGD):
    """A wrong accountant: it takes the noise on the *mean* gradient (z C / B) for the noise
    multiplier, i.e. accounts as if the multiplier were z times the expected batch size."""

    @property
    def epsilon(self):
        steps = self.accountant.steps
        if not steps or self.delta is None:
            return 0.0
        batch = self.sample_rate * self._n
        return dpsgd_epsilon(
            noise_multiplier=self.noise_multiplier * batch,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
        )


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["correct", "wrong"])
def test_canary_audit_never_exceeds_a_correct_accountant_and_catches_a_wrong_one(
    fast_trainer_kwargs, accountant
):
    """DP-SGD at a tiny noise multiplier (the accountant's ε is huge, the model memorises noise
    canaries): the audited bound is far below the correct ε and above the wrong accountant's."""
    x, y = digits(1000)
    train = with_canaries(TensorDataset(x, y), num_canaries=500, kind="input", seed=0)
    cls = DPSGD if accountant == "correct" else MeanNoiseAccountantDPSGD
    dp = cls(max_grad_norm=1.0, noise_multiplier=0.1)
    dp._n = len(train)
    audit = CanaryAudit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = fit(
            fast_trainer_kwargs,
            [dp, audit],
            _MLP(),
            DataLoader(train, 64, shuffle=True),
            max_epochs=25,
        )
    m = trainer.callback_metrics
    bound, eps = m["audit/epsilon_lower_bound"].item(), m["audit/accountant_epsilon"].item()
    assert bound > 1.0  # the audit finds something: the test has teeth
    assert m["audit/delta"].item() == pytest.approx(dp.delta)
    flagged = [w for w in caught if "exceeds the accountant" in str(w.message)]
    if accountant == "correct":
        assert bound <= eps and m["audit/consistent"].item() == 1.0 and not flagged
    else:
        assert eps < bound and m["audit/consistent"].item() == 0.0 and len(flagged) == 1
    # the audit scored the canaries of the trained model (the loss attack, recomputed)
    with torch.no_grad():
        scores = loss_scores(model.eval()(train.canaries.inputs), train.canaries.targets)
    inc = train.canaries.included
    assert auc(scores[inc], scores[~inc]) > 0.7


def test_canary_audit_finds_the_canaries_of_the_train_loader_and_refuses_plain_data(
    fast_trainer_kwargs,
):
    x, y = digits(300)
    train = with_canaries(TensorDataset(x, y), num_canaries=50, kind="mislabeled", seed=1)
    audit = CanaryAudit()
    trainer, _ = fit(
        fast_trainer_kwargs, [audit], BoringModel(), DataLoader(train, 32), max_epochs=1
    )
    assert audit.history[0]["canaries"] == 50
    assert "audit/accountant_epsilon" not in trainer.callback_metrics  # nothing accounts
    assert trainer.callback_metrics["audit/delta"].item() == pytest.approx(1e-5)
    trainer = L.Trainer(callbacks=[CanaryAudit()], max_epochs=1, **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="the training data holds no canaries"):
        trainer.fit(BoringModel(), DataLoader(TensorDataset(x, y), 32))
    with pytest.raises(ValueError, match="threshold attack"):
        CanaryAudit(attack="lira_offline")
    with pytest.raises(TypeError, match=r"made by lightning_privacy\.data\.with_canaries"):
        CanaryAudit(canaries=TensorDataset(x, y))
