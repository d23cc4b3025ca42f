"""Joint training: deterministic for a seed, and it learns."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from model_export.data import load_digits_splits  # noqa: E402
from model_export.train import TrainConfig, exit_accuracy, random_shift, seed_everything, train  # noqa: E402
from model_export.vit import vit  # noqa: E402

FAST = TrainConfig(epochs=1, batch_size=64, lr=5e-3, max_steps=12, threads=1)


def _trained(seed: int) -> dict[str, torch.Tensor]:
    splits = load_digits_splits()
    seed_everything(seed, 1)
    model = vit("tiny", depth=2)
    train(model, splits.train, TrainConfig(**{**FAST.__dict__, "seed": seed}), progress=False)
    return model.state_dict()


def test_training_is_deterministic_for_a_seed() -> None:
    a, b, c = _trained(3), _trained(3), _trained(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_splits_are_fixed_and_disjoint() -> None:
    s1, s2 = load_digits_splits(seed=0), load_digits_splits(seed=0)
    assert (s1.test.y == s2.test.y).all() and (s1.val.x == s2.val.x).all()
    assert len(s1.train) + len(s1.val) + len(s1.test) == 1797
    assert float(s1.train.x.max()) == 16.0  # raw pixels, as clients send them


def test_training_improves_every_exit() -> None:
    splits = load_digits_splits()
    seed_everything(0, 1)
    mean, std = splits.pixel_stats()
    model = vit("tiny", input_mean=mean, input_std=std)
    before = exit_accuracy(model, splits.val)
    train(model, splits.train, TrainConfig(epochs=5, lr=5e-3, max_steps=60, threads=1), progress=False)
    after = exit_accuracy(model, splits.val)
    assert all(a > 0.25 and a > b + 0.1 for a, b in zip(after, before, strict=True))  # chance is 0.1


def test_random_shift_moves_images_and_keeps_ink() -> None:
    x = torch.zeros(64, 8, 8)
    x[:, 3:5, 3:5] = 16.0
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum(dim=(1, 2)), x.sum(dim=(1, 2)))  # centred blob never leaves the image
    assert not torch.equal(shifted, x)


def test_exit_weights_must_match_the_exits() -> None:
    splits = load_digits_splits()
    with pytest.raises(ValueError, match="exit_weights"):
        train(
            vit("tiny"),
            splits.train,
            TrainConfig(max_steps=1, exit_weights=(1.0,), threads=1),
            progress=False,
        )
