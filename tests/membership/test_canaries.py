"""with_canaries: the secret inclusion vector, the removed sources, the item format, the seed."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_privacy.data import CanaryDataset, with_canaries
from lightning_privacy.data.canaries import find_canaries


def _base(n=200, classes=10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % classes)


def test_mislabeled_canaries_replace_their_sources_and_carry_a_wrong_label():
    base = _base()
    train = with_canaries(base, num_canaries=60, kind="mislabeled", seed=3)
    c = train.canaries
    assert isinstance(train, CanaryDataset) and c.num_canaries == 60 and c.kind == "mislabeled"
    assert 15 < int(c.included.sum()) < 45  # each in with probability 1/2
    assert torch.equal(c.inputs, base.tensors[0][c.source_indices])
    assert bool((c.targets != base.tensors[1][c.source_indices]).all())
    assert int(c.targets.min()) >= 0 and int(c.targets.max()) < 10
    # the training set: the non-source examples, then the included canaries, nothing else
    assert len(train) == 200 - 60 + int(c.included.sum())
    served = torch.stack([train[i][0] for i in range(len(train))])
    sources = set(c.source_indices.tolist())
    kept = [i for i in range(200) if i not in sources]
    assert torch.equal(served[: len(kept)], base.tensors[0][kept])
    assert torch.equal(served[len(kept) :], c.inputs[c.included])
    labels = torch.stack([train[i][1] for i in range(len(kept), len(train))])
    assert torch.equal(labels, c.targets[c.included]) and labels.dtype == base.tensors[1].dtype


def test_input_canaries_are_noise_in_the_data_range_added_to_the_whole_set():
    base = _base()
    train = with_canaries(base, num_canaries=40, kind="input", seed=0)
    c = train.canaries
    assert c.source_indices is None and len(train) == 200 + int(c.included.sum())
    low, high = base.tensors[0].min(), base.tensors[0].max()
    assert c.inputs.shape == (40, 1, 4, 4) and low <= c.inputs.min() and c.inputs.max() <= high


def test_the_draw_is_the_seeds_and_leaves_the_global_rng_alone():
    base = _base()
    state = torch.get_rng_state()
    a = with_canaries(base, num_canaries=30, seed=5).canaries
    b = with_canaries(base, num_canaries=30, seed=5).canaries
    other = with_canaries(base, num_canaries=30, seed=6).canaries
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.included, b.included) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.included, other.included)


class _Dicts(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"image": x, "label": int(y), "id": i}


def test_dict_items_keep_their_format_and_loaders_collate_them():
    train = with_canaries(_Dicts(_base()), num_canaries=20, seed=0)
    item = train[len(train) - 1]
    assert set(item) == {"image", "label", "id"} and isinstance(item["label"], int)
    batch = next(iter(DataLoader(train, batch_size=len(train))))
    assert batch["image"].shape[0] == len(train)


def test_canaries_are_found_through_wrappers_and_bad_arguments_are_named():
    train = with_canaries(_base(), num_canaries=10)
    assert find_canaries(Subset(Subset(train, range(50)), range(10))) is train.canaries
    assert find_canaries(_base()) is None
    with pytest.raises(
        ValueError, match="`num_canaries` to be an int >= 10 and <= 100, but got 101"
    ):
        with_canaries(_base(), num_canaries=101)
    with pytest.raises(ValueError, match="`kind` to be one of 'mislabeled', 'input', but got 'x'"):
        with_canaries(_base(), num_canaries=10, kind="x")
    with pytest.raises(TypeError, match="map-style data set"):
        with_canaries(iter([1, 2]), num_canaries=10)
