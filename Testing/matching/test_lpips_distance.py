"""Batched LPIPS must equal lpips.LPIPS pair by pair, and weight loading must fail loudly and clearly."""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision

from fewshotsam2.matching import lpips_distance
from fewshotsam2.errors import InputError
from fewshotsam2.matching.lpips_distance import LPIPS_WEIGHTS_ENV, LPIPSDistance


@pytest.fixture(scope="module")
def alex_weights(shared_dir: Path) -> Path:
    path = shared_dir / "weights" / "lpips" / "alexnet_features.pth"
    assert path.is_file(), path
    return path


def _reference(net: str, tv_state: dict) -> lpips.LPIPS:
    """lpips' own pairwise model with the same backbone tensors, copied by hand (independent of our loader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    copied = 0
    for name, module in ref.net.named_children():  # slice1..N hold torchvision's features.N under index N
        for index, layer in module.named_children():
            for pname, tensor in layer.state_dict().items():
                tensor.copy_(tv_state[f"features.{index}.{pname}"])
                copied += 1
    assert copied == len(tv_state)
    return ref.eval()


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1] (pure noise would make every pair look alike to LPIPS)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    x = x + 0.1 * torch.rand(n, h, w, generator=g)
    return x.clamp(0, 1)


def _pairwise(ref: lpips.LPIPS, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(xa.shape[0], xb.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(xa.shape[0]):
            for j in range(xb.shape[0]):
                out[i, j] = ref(xa[i : i + 1], xb[j : j + 1]).item()
    return out


def test_alex_equals_lpips_on_random_pairs(alex_weights: Path) -> None:
    tv_state = torch.load(alex_weights, map_location="cpu", weights_only=True)
    ref = _reference("alex", tv_state)
    dist = LPIPSDistance("alex", backbone_weights=str(alex_weights), size=96, batch_size=4)
    a = _images(7, 120, 90, seed=1)  # non-square, larger than size: exercises the resize
    b = _images(5, 64, 80, seed=2)  # smaller than size: upsampling
    xa, xb = dist.network_input(a), dist.network_input(b)
    assert xa.shape == (7, 3, 96, 96) and float(xa.min()) >= -1.0 and float(xa.max()) <= 1.0
    expected = _pairwise(ref, xa, xb)
    got = dist.distance_matrix(dist.features(a), dist.features(b.numpy()))  # numpy input too
    assert got.shape == (7, 5)
    assert float(expected.min()) > 0.01  # distinct images: the comparison is not trivially 0 == 0
    assert torch.allclose(got.cpu(), expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_alex_at_default_size_224(alex_weights: Path) -> None:
    tv_state = torch.load(alex_weights, map_location="cpu", weights_only=True)
    ref = _reference("alex", tv_state)
    dist = LPIPSDistance("alex", backbone_weights=str(alex_weights))
    assert dist.size == 224
    a, b = _images(3, 256, 256, seed=3), _images(2, 224, 224, seed=4)
    expected = _pairwise(ref, dist.network_input(a), dist.network_input(b))
    got = dist.distance_matrix(dist.features(a), dist.features(b))
    assert torch.allclose(got.cpu(), expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("net,factory", [
    # VGG16 with its classifier is 138 M parameters: seconds to build and save, so it runs in the slow tier only
    pytest.param("vgg", torchvision.models.vgg16, marks=pytest.mark.slow),
    ("squeeze", torchvision.models.squeezenet1_1),
])
def test_vgg_and_squeeze_equal_lpips_with_random_backbones(net: str, factory, tmp_path: Path) -> None:
    # their ImageNet weights cannot be downloaded here: random backbone weights, written in torchvision's
    # layout and loaded through the same path as real weights, copied into the reference by hand
    torch.manual_seed(0)
    full = factory(weights=None).state_dict()  # includes classifier.*, which the loader must ignore
    path = tmp_path / f"{net}.pth"
    torch.save(full, path)
    tv_state = {k: v for k, v in full.items() if k.startswith("features.")}
    ref = _reference(net, tv_state)
    dist = LPIPSDistance(net, backbone_weights=str(path), size=64, batch_size=3)
    a, b = _images(4, 70, 64, seed=5), _images(3, 64, 64, seed=6)
    expected = _pairwise(ref, dist.network_input(a), dist.network_input(b))
    got = dist.distance_matrix(dist.features(a), dist.features(b))
    assert float(expected.min()) > 0.0
    assert torch.allclose(got.cpu(), expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_features_layout_and_batch_independence(alex_weights: Path) -> None:
    dist = LPIPSDistance("alex", backbone_weights=str(alex_weights), size=64, batch_size=2)
    x = _images(5, 64, 64, seed=7)
    feats = dist.features(x)
    assert len(feats) == 5 and all(f.shape[0] == 5 and f.dtype == torch.float32 for f in feats)
    # zero-weight channels of alex's lin heads are dropped: fewer dims than the full activations
    full_dims = [c * s * s for c, s in zip((64, 192, 384, 256, 256), (15, 7, 3, 3, 3))]
    assert [f.shape[1] for f in feats] != full_dims and all(f.shape[1] < d for f, d in zip(feats, full_dims))
    big = LPIPSDistance("alex", backbone_weights=str(alex_weights), size=64, batch_size=16).features(x)
    for f, g in zip(feats, big):
        assert torch.allclose(f, g, atol=1e-6)
    one = dist.features(x[2].numpy())  # a single (h, w) image
    assert all(f.shape[0] == 1 for f in one)
    # chunked distance = unchunked
    d1 = dist.distance_matrix(feats, feats)
    d2 = dist.distance_matrix(feats, feats, chunk=2)
    assert torch.allclose(d1, d2, atol=1e-6)  # float32 matmuls: round-off only
    assert float(d1.diagonal().abs().max()) < 1e-6 and float(d1.min()) >= 0.0
    assert torch.allclose(d1, d1.T, atol=1e-6)


def test_match_picks_the_argmin(alex_weights: Path) -> None:
    dist = LPIPSDistance("alex", backbone_weights=str(alex_weights), size=64)
    support = _images(6, 64, 64, seed=8)
    # each query is a slightly perturbed support image, in shuffled order
    order = np.array([4, 0, 5, 2])
    query = (support[order] + 0.02 * _images(4, 64, 64, seed=9)).clamp(0, 1)
    s_feats, q_feats = dist.features(support), dist.features(query)
    idx, d = dist.match(q_feats, s_feats)
    assert idx.dtype == np.int64 and idx.tolist() == order.tolist()
    full = dist.distance_matrix(q_feats, s_feats).cpu().numpy()
    assert np.allclose(d, full.min(axis=1)) and np.array_equal(idx, full.argmin(axis=1))


def test_weights_from_environment_variable(alex_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(alex_weights))
    monkeypatch.setattr(lpips_distance, "_torchvision_state_dict", _offline)
    dist = LPIPSDistance("alex", size=64)
    ref = LPIPSDistance("alex", backbone_weights=str(alex_weights), size=64)
    x = _images(2, 64, 64, seed=10)
    assert torch.allclose(dist.distance_matrix(dist.features(x[:1]), dist.features(x[1:])),
                          ref.distance_matrix(ref.features(x[:1]), ref.features(x[1:])), atol=1e-7)


def _offline(net: str) -> dict:
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def test_missing_weights_give_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(lpips_distance, "_torchvision_state_dict", _offline)
    with pytest.raises(InputError) as info:
        LPIPSDistance("alex")
    msg = str(info.value)
    assert "\n" not in msg
    assert "--lpips-weights" in msg and LPIPS_WEIGHTS_ENV in msg
    assert "alexnet-owt-7be5be79.pth" in msg  # which file to download


@pytest.mark.slow  # several seconds: kept out of the fast tier
def test_bad_weight_files_are_input_errors(alex_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        LPIPSDistance("alex", backbone_weights=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        LPIPSDistance("alex", backbone_weights=str(garbage))
    with pytest.raises(InputError, match="do not fit"):  # alex tensors for the vgg backbone: wrong keys
        LPIPSDistance("vgg", backbone_weights=str(alex_weights))
    state = torch.load(alex_weights, map_location="cpu", weights_only=True)
    shapes = dict(state)
    shapes["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(shapes, tmp_path / "shapes.pth")
    with pytest.raises(InputError, match="wrong shapes"):
        LPIPSDistance("alex", backbone_weights=str(tmp_path / "shapes.pth"))
    missing = {k: v for k, v in state.items() if k != "features.10.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(InputError, match="features.10.bias"):
        LPIPSDistance("alex", backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="unknown LPIPS network"):
        LPIPSDistance("resnet", backbone_weights=str(alex_weights))


def test_body_box_and_common_field_of_view() -> None:
    from fewshotsam2.matching.lpips_distance import body_box, resample_to_fov

    def scan(spacing: float, shape: int) -> np.ndarray:
        """A 200 x 120 mm 'body' centred 20 mm right of the image centre, a detached 'arm', a thin 'table' line."""
        mm = (np.arange(shape) - (shape - 1) / 2.0) * spacing
        r, c = np.meshgrid(mm, mm, indexing="ij")
        x = np.zeros((4, shape, shape), np.float32)
        x[:, (np.abs(r) <= 60) & (np.abs(c - 20) <= 100)] = 0.8
        x[:, (np.abs(r) <= 20) & (np.abs(c + 120) <= 10)] = 0.8  # arm, 10 mm gap
        x[:, (np.abs(r - 90) <= spacing / 2)] = 0.8  # one-pixel table line
        return x

    fine, coarse = scan(1.0, 401), scan(2.5, 161)
    r, c, extent = body_box(fine, (1.0, 1.0))
    assert extent == pytest.approx(201, abs=2) and r == pytest.approx(200, abs=1) and c == pytest.approx(220, abs=1)
    a = resample_to_fov(fine, (1.0, 1.0), 250.0, 100)
    b = resample_to_fov(coarse, (2.5, 2.5), 250.0, 100)
    assert a.shape == b.shape == (4, 100, 100) and a.dtype == np.float32
    # same body, same mm per pixel: the two scans now agree pixel for pixel (up to interpolation at the edges)
    assert (a[0] > 0.4).sum() == pytest.approx(80 * 48, rel=0.05)
    assert float(np.mean(np.abs((a > 0.4).astype(float) - (b > 0.4).astype(float)))) < 0.01
