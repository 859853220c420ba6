"""Models that answer in one forward pass (embeddings, image classification), ready to batch.

Each wraps a network with what turns requests into its inputs and its outputs into answers:
``TextEmbedder`` tokenizes (WordPiece from ``tokenizer.json``), pads a batch and pools;
``ImageClassifier`` turns decoded images into pixel tensors and logits into probabilities.
``*_batch`` methods are what the dynamic batcher calls on its worker thread; everything else is
cheap enough for a request handler (or is run on a thread pool by it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from surge.models.bert import Pooling, read_pooling
from surge.models.checkpoint import read_config
from surge.models.image_processor import ImageProcessor
from surge.models.loader import load_model, resolve_device
from surge.models.tasks import Task, detect_task

__all__ = ["ImageClassifier", "PoolModel", "TextEmbedder", "load_pool_model",
           "warm_up"]

logger = logging.getLogger(__name__)



class _OneForwardModel:
    """A network of ``task`` loaded from ``model_dir`` by the one loader."""

    task: Task

    def __init__(self, model_dir: str | Path, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.model_dir = Path(model_dir)
        loaded = load_model(model_dir, dtype, device, task=self.task)
        self.model: nn.Module = loaded.model
        self.dtype, self.device = loaded.dtype, loaded.device
        assert loaded.architecture is not None
        self.architecture = loaded.architecture.name


class TextEmbedder(_OneForwardModel):
    """A BERT encoder with sentence-transformers pooling: token ids -> unit vectors."""

    task: Task = "embed"

    def __init__(self, model_dir: str | Path, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        from tokenizers import Tokenizer

        super().__init__(model_dir, dtype, device)
        self.pooling: Pooling = read_pooling(model_dir)
        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()  # over-long inputs are refused or truncated by the caller
        self.tokenizer = tokenizer
        self.dim = self.model.config.hidden_size
        self.vocab_size = self.model.config.vocab_size
        self.pad_id = self.model.config.pad_token_id
        self.max_tokens = _max_seq_length(self.model_dir, self.model.config.max_position_embeddings)
        self.sep_id = tokenizer.token_to_id("[SEP]")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], not truncated (the tokenizer's Rust threads)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def truncate(self, ids: list[int], max_tokens: int) -> list[int]:
        """Keep the first tokens and the closing [SEP], as sentence-transformers truncates."""
        if len(ids) <= max_tokens:
            return ids
        if self.sep_id is not None and ids[-1] == self.sep_id and max_tokens >= 2:
            return [*ids[:max_tokens - 1], self.sep_id]
        return ids[:max_tokens]

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One float32 vector per token-id list (runs the network: call off the event loop)."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.bool)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = True
        with torch.inference_mode():
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            pooled = self.pooling(self.model(input_ids, mask), mask)
        vectors = pooled.float().cpu().numpy()
        return list(vectors)


@dataclass(frozen=True)
class _Labels:
    names: list[str]

    @classmethod
    def from_config(cls, hf: dict) -> _Labels:
        id2label = hf.get("id2label") or {}
        count = len(id2label) or int(hf.get("num_labels") or 0)
        return cls([str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                    for i in range(count)])


class ImageClassifier(_OneForwardModel):
    """An image classifier (ResNet, ViT, EfficientNet-Lite) with its preprocessing: images ->
    class probabilities."""

    task: Task = "classify"

    def __init__(self, model_dir: str | Path, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(model_dir, dtype, device)
        self.processor = ImageProcessor.from_pretrained(model_dir)
        self.labels = _Labels.from_config(read_config(model_dir)).names

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Decoded image -> pixel tensor (call on a worker thread: it resizes)."""
        return self.processor(image)

    def classify_batch(self, batch: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """One probability vector (float32, sums to 1) per pixel tensor."""
        with torch.inference_mode():
            pixels = torch.stack(list(batch)).to(self.device, self.dtype)
            logits = self.model(pixels).float()
            probs = torch.softmax(logits, dim=-1)
        return list(probs.cpu().numpy())


PoolModel = TextEmbedder | ImageClassifier


def load_pool_model(model_dir: str | Path, dtype: str = "auto",
                    device: str = "cpu") -> PoolModel:
    """The embedder or classifier ``model_dir`` holds (its task read from the registry)."""
    target = resolve_device(device)
    task = detect_task(model_dir)
    if task == "embed":
        return TextEmbedder(model_dir, dtype, target)
    if task == "classify":
        return ImageClassifier(model_dir, dtype, target)
    raise ValueError(f"{model_dir} is a text-generation model: it is served by the LLM engine, "
                     "not as an embedding or classification model")


def warm_up(model: PoolModel) -> None:
    """One small batch, so the first request does not pay for kernel and allocator set-up."""
    if isinstance(model, TextEmbedder):
        model.embed_batch([model.tokenize(["warm up"])[0]] * 2)
        return
    height, width = model.processor.output_size or (224, 224)
    model.classify_batch([torch.zeros(3, height, width)] * 2)


def _max_seq_length(model_dir: Path, max_positions: int) -> int:
    """sentence-transformers' max_seq_length if declared (inputs were trained up to it)."""
    path = model_dir / "sentence_bert_config.json"
    if path.is_file():
        declared = json.loads(path.read_text()).get("max_seq_length")
        if declared:
            return min(int(declared), max_positions)
    return max_positions
