"""ResNet and ViT classifiers and their preprocessing: parity with transformers, batch
independence, and the public models' parameter counts for the full-size presets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surge.models.image_processor import ImageProcessor
from surge.models.pooling_models import ImageClassifier
from surge.testing.make_model import PRESETS


def _image(seed: int, size: tuple[int, int] = (97, 71)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", ["tiny-resnet", "tiny-vit"])
def test_logits_match_transformers(preset: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoModelForImageClassification

    directory = tiny_checkpoint(preset)
    reference, info = AutoModelForImageClassification.from_pretrained(
        directory, output_loading_info=True)
    # Only BatchNorm's training step counter may be absent from our checkpoints.
    assert all(k.endswith("num_batches_tracked") for k in info["missing_keys"])
    assert not info["unexpected_keys"]
    ours = ImageClassifier(directory)
    pixels = torch.stack([ours.preprocess(_image(seed)) for seed in range(3)])
    with torch.no_grad():
        expected = reference.eval()(pixel_values=pixels).logits
    assert torch.allclose(ours.model(pixels), expected, atol=1e-4)
    assert ours.labels == [reference.config.id2label[i] for i in range(ours.num_labels)]


@pytest.mark.parametrize("preset", ["tiny-resnet", "tiny-vit"])
def test_batched_probabilities_equal_single_ones(preset: str,
                                                 tiny_checkpoint: Callable[[str], Path]) -> None:
    model = ImageClassifier(tiny_checkpoint(preset))
    pixels = [model.preprocess(_image(seed)) for seed in range(4)]
    batched = np.stack(model.classify_batch(pixels))
    single = np.stack([model.classify_batch([p])[0] for p in pixels])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=1e-5)
    # Random weights still tell images apart (fan-in scaled init): not one constant answer.
    assert len({int(p.argmax()) for p in batched}) > 1 or np.ptp(batched, axis=0).max() > 1e-3


@pytest.mark.parametrize(("preset", "processor"), [
    ("resnet-50", "ConvNextImageProcessorPil"), ("vit-base", "ViTImageProcessorPil")])
def test_preprocessing_matches_transformers(preset: str, processor: str) -> None:
    import transformers

    from surge.testing.pool_checkpoints import _preprocessor

    config = _preprocessor(PRESETS[preset].family, PRESETS[preset].config)
    reference = getattr(transformers, processor)(**{k: v for k, v in config.items()
                                                    if k != "image_processor_type"})
    for image in (_image(0, (451, 300)), _image(1, (120, 500)), _image(2, (224, 224))):
        expected = reference(images=image, return_tensors="pt")["pixel_values"][0]
        got = ImageProcessor.from_dict(config)(image)
        assert got.shape == (3, 224, 224)
        assert torch.allclose(got, expected, atol=1e-5)


def test_grayscale_and_transparent_images_become_rgb() -> None:
    processor = ImageProcessor.from_dict({"size": {"height": 8, "width": 8}})
    assert processor(Image.new("L", (20, 10), 128)).shape == (3, 8, 8)
    assert processor(Image.new("RGBA", (20, 10), (1, 2, 3, 0))).shape == (3, 8, 8)


def test_unknown_preprocessing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="do_pad"):
        ImageProcessor.from_dict({"size": {"height": 8, "width": 8}, "do_pad": True})


@pytest.mark.parametrize(("preset", "params"), [("resnet-50", 25_557_032),
                                                 ("vit-base", 86_567_656)])
def test_full_size_presets_have_the_public_models_parameter_counts(preset: str,
                                                                   params: int) -> None:
    # BatchNorm running statistics are buffers, not parameters, in transformers' count.
    buffers = sum(spec.numel for spec in PRESETS[preset].tensor_specs()
                  if spec.name.endswith(("running_mean", "running_var")))
    assert PRESETS[preset].num_params - buffers == params
    assert len(PRESETS[preset].config["id2label"]) == 1000
