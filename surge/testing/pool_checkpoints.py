"""Configs, tensor layouts and extra files of the encoder and vision presets of make-model.

BERT (sentence-transformers layout, with a WordPiece tokenizer trained locally), ResNet and ViT
image classifiers (with ``preprocessor_config.json`` and readable class names), named and shaped
exactly as the public checkpoints are (all-MiniLM-L6-v2, microsoft/resnet-50,
google/vit-base-patch16-224), so our loaders and transformers both read them.

Tensor layouts are returned as ``(name, shape, init)`` tuples; ``make_model`` turns them into
its ``TensorSpec`` and draws the weights. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "POOL_FAMILIES",
    "bert_config",
    "image_labels",
    "pool_tensor_specs",
    "resnet_config",
    "vit_config",
    "wordpiece_tokenizer_json",
    "write_pool_files",
]

POOL_FAMILIES = ("bert", "resnet", "vit")
Spec = tuple[str, tuple[int, ...], str]
# WordPiece specials in BERT's order of importance; ids 0-4.
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Made-up ImageNet-like class names: adjective x noun gives 1,000 distinct readable labels.
_ADJECTIVES = ("red", "spotted", "striped", "golden", "giant", "little", "wild", "silver",
               "northern", "mountain", "desert", "river", "snowy", "black", "white", "common",
               "royal", "pygmy", "crested", "woolly", "arctic", "tropical", "dwarf", "grey",
               "painted", "horned", "long-tailed", "short-eared", "swift", "marsh", "forest",
               "coastal", "velvet", "copper", "emerald", "amber", "dusky", "ruby", "ivory",
               "banded")
_NOUNS = ("fox", "heron", "tortoise", "kettle", "lantern", "beetle", "salamander", "teapot",
          "canoe", "owl", "bicycle", "mushroom", "otter", "violin", "trout", "parrot",
          "umbrella", "hedgehog", "tractor", "lizard", "lighthouse", "sparrow", "accordion",
          "moth", "wombat")


def image_labels(count: int) -> list[str]:
    names = [f"{a} {n}" for a, n in itertools.product(_ADJECTIVES, _NOUNS)]
    if count > len(names):
        raise ValueError(f"at most {len(names)} made-up labels, asked for {count}")
    return names[:count]


def _labels_fields(count: int) -> dict[str, Any]:
    labels = image_labels(count)
    return {"id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


# -- configs -----------------------------------------------------------------------------------

def bert_config(*, hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
                max_pos: int) -> dict[str, Any]:
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
            "pad_token_id": 0, "position_embedding_type": "absolute",
            "torch_dtype": "float32", "dtype": "float32"}


def resnet_config(*, embedding: int, hidden_sizes: list[int], depths: list[int], labels: int,
                  image_size: int) -> dict[str, Any]:
    return {"architectures": ["ResNetForImageClassification"], "model_type": "resnet",
            "num_channels": 3, "embedding_size": embedding, "hidden_sizes": hidden_sizes,
            "depths": depths, "layer_type": "bottleneck", "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
            "torch_dtype": "float32", "dtype": "float32", **_labels_fields(labels),
            # Not read by the model: the size preprocessor_config.json produces.
            "image_size": image_size}


def vit_config(*, hidden: int, layers: int, heads: int, intermediate: int, image_size: int,
               patch: int, labels: int) -> dict[str, Any]:
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate, "image_size": image_size, "patch_size": patch,
            "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "qkv_bias": True, "encoder_stride": patch,
            "torch_dtype": "float32", "dtype": "float32", **_labels_fields(labels)}


def _preprocessor(family: str, config: dict[str, Any]) -> dict[str, Any]:
    if family == "resnet":  # as microsoft/resnet-50: shorter side to size/0.875, center crop
        return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
                "size": {"shortest_edge": config["image_size"]}, "crop_pct": 0.875,
                "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225]}
    side = config["image_size"]  # as google/vit-base-patch16-224: warp to the square
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": side, "width": side}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}


# -- tensor layouts ----------------------------------------------------------------------------

def pool_tensor_specs(family: str, cfg: dict[str, Any]) -> list[Spec]:
    return {"bert": _bert_specs, "resnet": _resnet_specs, "vit": _vit_specs}[family](cfg)


def _linear(prefix: str, fan_in: int, fan_out: int, init: str = "normal") -> list[Spec]:
    return [(f"{prefix}.weight", (fan_out, fan_in), init), (f"{prefix}.bias", (fan_out,), "bias")]


def _layer_norm(prefix: str, dim: int) -> list[Spec]:
    return [(f"{prefix}.weight", (dim,), "norm"), (f"{prefix}.bias", (dim,), "bias")]


def _bert_specs(cfg: dict[str, Any]) -> list[Spec]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    specs: list[Spec] = [
        ("embeddings.word_embeddings.weight", (cfg["vocab_size"], h), "normal"),
        ("embeddings.position_embeddings.weight", (cfg["max_position_embeddings"], h), "normal"),
        ("embeddings.token_type_embeddings.weight", (cfg["type_vocab_size"], h), "normal"),
        *_layer_norm("embeddings.LayerNorm", h)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            specs += _linear(f"{p}.attention.self.{proj}", h, h)
        specs += _linear(f"{p}.attention.output.dense", h, h)
        specs += _layer_norm(f"{p}.attention.output.LayerNorm", h)
        specs += _linear(f"{p}.intermediate.dense", h, inter)
        specs += _linear(f"{p}.output.dense", inter, h)
        specs += _layer_norm(f"{p}.output.LayerNorm", h)
    return specs + _linear("pooler.dense", h, h)  # BertModel checkpoints carry the pooler


def _conv_layer(prefix: str, cin: int, cout: int, kernel: int) -> list[Spec]:
    norm = f"{prefix}.normalization"
    # Conv weights scaled by fan-in so activations keep their size through 50 layers and the
    # random classifier still tells images apart; BN running variance stays positive (norm).
    return [(f"{prefix}.convolution.weight", (cout, cin, kernel, kernel), "fan_in"),
            (f"{norm}.weight", (cout,), "norm"), (f"{norm}.bias", (cout,), "bias"),
            (f"{norm}.running_mean", (cout,), "bias"), (f"{norm}.running_var", (cout,), "norm")]


def _resnet_specs(cfg: dict[str, Any]) -> list[Spec]:
    specs = _conv_layer("resnet.embedder.embedder", 3, cfg["embedding_size"], 7)
    widths = [cfg["embedding_size"], *cfg["hidden_sizes"]]
    for s, depth in enumerate(cfg["depths"]):
        for i in range(depth):
            cin, cout = (widths[s] if i == 0 else widths[s + 1]), widths[s + 1]
            p = f"resnet.encoder.stages.{s}.layers.{i}"
            if i == 0 and (cin != cout or s > 0):
                specs += _conv_layer(f"{p}.shortcut", cin, cout, 1)
            reduced = cout // 4
            specs += _conv_layer(f"{p}.layer.0", cin, reduced, 1)
            specs += _conv_layer(f"{p}.layer.1", reduced, reduced, 3)
            specs += _conv_layer(f"{p}.layer.2", reduced, cout, 1)
    return specs + _linear("classifier.1", widths[-1], len(cfg["id2label"]), "fan_in")


def _vit_specs(cfg: dict[str, Any]) -> list[Spec]:
    h, inter, patch = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"]
    patches = (cfg["image_size"] // patch) ** 2
    specs: list[Spec] = [
        ("vit.embeddings.cls_token", (1, 1, h), "normal"),
        ("vit.embeddings.position_embeddings", (1, patches + 1, h), "normal"),
        ("vit.embeddings.patch_embeddings.projection.weight", (h, 3, patch, patch), "normal"),
        ("vit.embeddings.patch_embeddings.projection.bias", (h,), "bias")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"vit.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            specs += _linear(f"{p}.attention.attention.{proj}", h, h)
        specs += _linear(f"{p}.attention.output.dense", h, h)
        specs += _linear(f"{p}.intermediate.dense", h, inter)
        specs += _linear(f"{p}.output.dense", inter, h)
        specs += _layer_norm(f"{p}.layernorm_before", h)
        specs += _layer_norm(f"{p}.layernorm_after", h)
    return specs + _layer_norm("vit.layernorm", h) + _linear(
        "classifier", h, len(cfg["id2label"]))


# -- extra files -------------------------------------------------------------------------------

def wordpiece_tokenizer_json(corpus: Iterator[str], vocab_size: int) -> str:
    """tokenizer.json of an uncased BERT WordPiece with exactly ``vocab_size`` tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS),
                                        show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"WordPiece reached {tokenizer.get_vocab_size()} tokens, not "
                           f"{vocab_size}: the synthetic corpus is too small")
    return tokenizer.to_str(pretty=True)


def write_pool_files(family: str, config: dict[str, Any], directory: Path,
                     tokenizer_json: str | None) -> None:
    """Everything but config.json and the weights: tokenizer and pooling, or preprocessing."""
    if family == "bert":
        _write_sentence_transformers_files(config, directory, tokenizer_json or "")
    else:
        _write_json(directory / "preprocessor_config.json", _preprocessor(family, config))


def _write_sentence_transformers_files(config: dict[str, Any], directory: Path,
                                       tokenizer_json: str) -> None:
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "model_max_length": config["max_position_embeddings"]})
    _write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}])
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": config["max_position_embeddings"], "do_lower_case": False})
    (directory / "1_Pooling").mkdir()
    _write_json(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
