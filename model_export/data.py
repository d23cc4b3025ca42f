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
