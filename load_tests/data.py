"""Request data for load tests and benchmarks: the digits test split, written once, read by clients.

Load generators must not need scikit-learn or torch (locust workers, a client box), so the samples
are written to a plain file first. Three layouts, chosen by the file's suffix:

- `.npy`: the inputs only, float32 [N, 8, 8] (the fastest to read);
- `.npz`: `x` (inputs) and `y` (true labels);
- `.json`: `{"x": [[...]], "y": [...], "shape": [N, 8, 8], "dtype": "FP32"}` (readable by any tool).

The split is model_export's fixed-seed test split: the samples a bundle reports its accuracy on,
never the validation samples its thresholds were calibrated on.

    python -m load_tests.data --out digits_test.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".npy", ".npz", ".json")


@dataclass(frozen=True)
class RequestData:
    """Inputs to send, and their true labels when the file has them."""

    x: np.ndarray  # float32 [N, ...]; for text models, the sentences (object [N] of str)
    y: np.ndarray | None = None  # int64 [N]

    @property
    def is_text(self) -> bool:
        return self.x.dtype == object

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """`size` consecutive samples from `start`, wrapping around; returns (inputs, indices)."""
        idx = (start + np.arange(size)) % len(self)
        return self.x[idx], idx


def digits_test_split(split_seed: int = 0) -> RequestData:
    """The digits test split model_export reports on (needs scikit-learn: the `export` extra)."""
    from model_export.data import load_digits_splits

    test = load_digits_splits(seed=split_seed).test
    return RequestData(np.ascontiguousarray(test.x, np.float32), test.y.astype(np.int64))


def bundle_dataset(manifest: Any) -> str:
    """The built-in data set a bundle was exported for, read from what its export config wrote
    (the input's preprocessing text, or that text with steps of its own after a "; ", as the heavy
    preset's upscaling: the longest config text that matches); ValueError for a bundle of anything else."""
    from model_export.export import DATASET_EXPORT_CONFIGS, EXPORT_CONFIGS

    if manifest.text is not None:
        return "rotten-tomatoes"
    text = manifest.input.preprocessing
    matches = [(len(known), dataset) for dataset, config in DATASET_EXPORT_CONFIGS.items()
               if text == (known := EXPORT_CONFIGS[config].preprocessing) or text.startswith(known + "; ")]
    if matches:
        return max(matches)[1]
    raise ValueError(f"{manifest.name}: not a bundle of a built-in data set (digits, digits-hard, mnist, "
                     "rotten-tomatoes); give the request data yourself")


def test_split_for(manifest: Any) -> RequestData:
    """The test split of the data set the bundle was exported for (`bundle_dataset`)."""
    dataset = bundle_dataset(manifest)
    if dataset == "rotten-tomatoes":
        return sentiment_test_split()
    from model_export.data import load_splits

    test = load_splits(dataset).test
    return RequestData(np.ascontiguousarray(test.x, np.float32), test.y.astype(np.int64))


def sentiment_test_split() -> RequestData:
    """The sentiment preset's test sentences (model_export/sentiment.py's fixed split; needs the
    export extra and `make install-text`)."""
    from model_export.sentiment import sentiment_splits

    test = sentiment_splits().test
    return RequestData(np.array(test.texts, dtype=object), test.y.astype(np.int64))


def _check(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: request data must end in one of {', '.join(SUFFIXES)}")


def write_request_data(path: str | Path, data: RequestData) -> Path:
    """Write `data` in the layout `path`'s suffix names (labels are dropped for `.npy`)."""
    path = Path(path)
    _check(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(data.x, np.float32)
    if path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".npz":
        arrays = {"x": x} if data.y is None else {"x": x, "y": np.asarray(data.y, np.int64)}
        np.savez(path, **arrays)
    else:
        doc = {
            "shape": list(x.shape),
            "dtype": "FP32",
            "x": x.tolist(),
            "y": None if data.y is None else np.asarray(data.y).astype(int).tolist(),
        }
        path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


def read_request_data(path: str | Path) -> RequestData:
    """Read a file written by `write_request_data`; raises ValueError naming what is wrong."""
    path = Path(path)
    _check(path)
    if not path.is_file():
        raise ValueError(f"{path}: request data file does not exist; `python -m load_tests.data` writes one")
    if path.suffix == ".npy":
        x, y = np.load(path, allow_pickle=False), None
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise ValueError(f"{path}: no array 'x' in the file")
            x, y = z["x"], z["y"] if "y" in z else None
    else:
        try:
            doc = json.loads(path.read_text())
            x = np.asarray(doc["x"], np.float32).reshape(doc["shape"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a request data JSON file ({type(err).__name__}: {err})") from err
        y = None if doc.get("y") is None else np.asarray(doc["y"], np.int64)
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{path}: expected a non-empty batch of samples, got shape {list(x.shape)}")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"{path}: {x.shape[0]} samples but labels of shape {list(y.shape)}")
    return RequestData(x, None if y is None else y.astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the digits test split as load-test request data.")
    parser.add_argument("--out", type=Path, required=True, help=f"file to write ({', '.join(SUFFIXES)})")
    parser.add_argument("--split-seed", type=int, default=0, help="model_export's split seed (bundles use 0)")
    args = parser.parse_args(argv)
    data = digits_test_split(args.split_seed)
    write_request_data(args.out, data)
    print(f"wrote {len(data)} samples of shape {list(data.x.shape[1:])} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
