"""Inference: Caffe's INTERP upsampling and multi-scale + flip averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deeplab_v1.engine.inference import ScoreMap, kept_size, predict, upsample_scores


class _Tiny(nn.Module):
    """A stride-8 'network': 8x8 average pooling (ceil) then a 1x1 classifier."""

    output_stride = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AvgPool2d(8, 8, ceil_mode=True)
        self.cls = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.cls(self.pool(x) / 50)


def test_interp_is_corner_aligned_zoom_8():
    scores = torch.randn(3, 65, 65)
    up = upsample_scores(scores, 8, 513, 513)
    assert up.shape == (3, 513, 513)
    assert torch.allclose(up[:, ::8, ::8], scores, atol=1e-6)  # score k sits on pixel 8k
    mid = (scores[:, 0, 0] + scores[:, 0, 1]) / 2
    assert torch.allclose(up[:, 0, 4], mid, atol=1e-6)  # linear in between
    cropped = upsample_scores(scores[:, :kept_size(375, 8), :kept_size(500, 8)], 8, 375, 500)
    assert torch.allclose(cropped, up[:, :375, :500], atol=1e-5)  # keeping only the needed rows changes nothing
    try:
        upsample_scores(scores[:, :10], 8, 375, 500)
    except ValueError as e:
        assert "cover" in str(e)
    else:
        raise AssertionError("scores that do not cover the image must raise")


def test_score_cache_round_trip(tmp_path):
    sm = ScoreMap(np.random.randn(21, 48, 64).astype(np.float32), 8, 375, 500)
    sm.save(tmp_path / "a.npz")
    back = ScoreMap.load(tmp_path / "a.npz")
    assert back.scores.dtype == np.float16 and (back.stride, back.height, back.width) == (8, 375, 500)
    assert np.allclose(back.scores, sm.scores, atol=1e-2)
    assert back.upsampled().shape == (21, 375, 500)
    big = ScoreMap(np.full((2, 3, 3), 1e6, np.float32), 8, 17, 17)
    big.save(tmp_path / "b.npz")
    assert ScoreMap.load(tmp_path / "b.npz").scores.max() == 1e6  # beyond float16: kept as float32, not inf


def test_multiscale_flip_is_mean_of_individual_passes():
    """Properties of the averaging, with ``predict`` itself as the only oracle: the multi-scale + flip
    probabilities are the mean of those of each scale alone; flip averaging makes the result of a mirrored
    image the mirror of the result; one scale without flip is the single pass at stride 1."""
    model = _Tiny().eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    single = predict(model, image, size=65)
    assert single.stride == 8 and single.scores.shape == (4, kept_size(37, 8), kept_size(45, 8))
    ms = predict(model, image, size=65, scales=[0.5, 1.0], flip=True)
    assert ms.stride == 1 and ms.scores.shape == (4, 37, 45)
    per_scale = [np.exp(predict(model, image, size=65, scales=[s], flip=True).scores) for s in (0.5, 1.0)]
    assert np.allclose(np.exp(ms.scores), (per_scale[0] + per_scale[1]) / 2, atol=1e-5)
    mirrored = predict(model, image[:, ::-1].copy(), size=65, scales=[0.5, 1.0], flip=True)
    assert np.allclose(mirrored.scores, ms.scores[:, :, ::-1], atol=1e-5)
    one = predict(model, image, size=65, scales=[1.0, 1.0])  # the same pass twice: its own softmax
    assert np.allclose(np.exp(one.scores), torch.softmax(single.upsampled(), 0).numpy(), atol=1e-5)
    # and the averaging did something: not the single pass
    assert not np.allclose(np.exp(ms.scores), torch.softmax(single.upsampled(), 0).numpy(), atol=1e-3)


def test_offset_is_the_test_nets_padding_crop():
    """DeepLab's test.prototxt: INTERP x8 (67 -> 529) then PADDING pad_beg -7 / pad_end -8 (-> 514)."""
    scores = torch.randn(2, 67, 67)
    full = torch.nn.functional.interpolate(scores[None], size=(529, 529), mode="bilinear", align_corners=True)[0]
    up = upsample_scores(scores, 8, 514, 514, offset=7)
    assert torch.allclose(up, full[:, 7:521, 7:521], atol=1e-5)
    assert torch.allclose(up[:, 1::8, 1::8], scores[:, 1:66, 1:66], atol=1e-5)  # score k on pixel 8k - 7
    h, w = 375, 500
    kept = scores[:, :kept_size(h, 8, 7), :kept_size(w, 8, 7)]
    assert kept.shape[-2:] == (49, 65)  # ceil((size - 1 + 7) / 8) + 1
    assert torch.allclose(upsample_scores(kept, 8, h, w, offset=7), full[:, 7:7 + h, 7:7 + w], atol=1e-5)
    sm = ScoreMap(kept.numpy(), 8, h, w, offset=7)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        sm.save(Path(d) / "s.npz")
        back = ScoreMap.load(Path(d) / "s.npz")
    assert back.offset == 7 and torch.allclose(back.upsampled(), sm.upsampled(), atol=2e-2)


@pytest.mark.slow
def test_predict_runs_the_test_net_with_its_geometry():
    import dataclasses

    from deeplab_v1.models.vgg import SPECS, DeepLabVGG

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 61, 3), dtype=np.uint8)
    for name, stride, offset in (("deeplab", 8, 7), ("deeplab-largefov", 8, 0), ("deeplab-msc-largefov", 1, 0)):
        model = DeepLabVGG(dataclasses.replace(SPECS[name], fc_channels=8), num_classes=3).eval()
        size = 66 if name == "deeplab" else 65
        sm = predict(model, image, size=size)
        assert (sm.stride, sm.offset) == (stride, offset), name
        assert sm.scores.shape == (3, kept_size(50, stride, offset), kept_size(61, stride, offset)), name
        from deeplab_v1.data.transforms import image_to_tensor, pad_to

        with torch.no_grad():
            ref = model.test_net(image_to_tensor(pad_to(image, None, size)[0])[None])[0]
        assert torch.allclose(torch.from_numpy(sm.scores), ref[:, :sm.scores.shape[1], :sm.scores.shape[2]]), name
        assert sm.upsampled().shape == (3, 50, 61)
