"""Batched LPIPS (Zhang et al. 2018) from cached features, for support-query matching (Zu et al. 2025).

`lpips.LPIPS(a, b)` runs the backbone on both images for every pair. Matching Q query slices against S support
images that way costs 2*Q*S network passes. LPIPS is a weighted squared distance between per-image features,
so each image goes through the network once and all pairs come from matrix products:

    LPIPS(a, b) = sum_l  1/(H_l W_l) sum_{h,w} sum_c w_{l,c} (a_{l,c,h,w} - b_{l,c,h,w})^2
                = sum_l  |A_l - B_l|^2,   A_l = flatten(a_l * sqrt(w_l / (H_l W_l)))

where a_l is layer l's activation unit-normalised over channels (`lpips.normalize_tensor`) and w_l >= 0 the
linear head ("lin") weights shipped with `lpips` (v0.1). `features` returns the A_l; `distance_matrix` expands
|A - B|^2 = |A|^2 + |B|^2 - 2 A.B as matmuls.

Backbone weights: `lpips` normally downloads torchvision's ImageNet weights. Here they come from a file
(`backbone_weights`, or the FEWSHOTSAM2_LPIPS_WEIGHTS environment variable) holding a torchvision-layout state
dict (`features.N.*`, e.g. the shared `alexnet_features.pth`, or a full torchvision checkpoint whose
`classifier.*` keys are ignored); only when neither is given is torchvision's own cache/download tried.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fewshotsam2 import constants
from fewshotsam2.model.device import pick_device
from fewshotsam2.errors import InputError
from fewshotsam2.requirements import require_lpips
from fewshotsam2.settings import LPIPS_WEIGHTS_ENV

# torchvision (seconds to import) is imported where ImageNet weights are looked up: the pipeline imports this
# module, and a run that uses no LPIPS (--slice-range off with propagate/reverse) should not pay for it

QUERY_CHUNK = 32  # query slices whose LPIPS features (1.3 MB each at 224 px) are held at once
NETS = constants.LPIPS_NETS

# torchvision weight enums lpips' backbones come from (lpips calls tv.alexnet / vgg16 / squeezenet1_1)
_TORCHVISION_WEIGHTS = {
    "alex": "AlexNet_Weights.IMAGENET1K_V1",
    "vgg": "VGG16_Weights.IMAGENET1K_V1",
    "squeeze": "SqueezeNet1_1_Weights.IMAGENET1K_V1",
}

ImageBatch = Union[np.ndarray, torch.Tensor]


def _torchvision_state_dict(net: str) -> dict:
    """ImageNet weights from torchvision's cache, downloading them if absent (raises when offline)."""
    import torchvision

    return torchvision.models.get_weight(_TORCHVISION_WEIGHTS[net]).get_state_dict(progress=False)


def _load_failure(exc: BaseException) -> str:
    """torch.load's reason in a few words: its weights_only text is a paragraph of advice (re-run with
    weights_only=False, file an issue) that must not be followed for a file of unknown origin; the cause is the
    line after "WeightsUnpickler error:" (e.g. "Unsupported operand 110"), else the first line."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "WeightsUnpickler error" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        cause = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        return f"{type(exc).__name__}: {cause}"[:160] if cause else type(exc).__name__
    if "Weights only load failed" in text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def _torchvision_url(net: str) -> str:
    try:
        import torchvision

        return torchvision.models.get_weight(_TORCHVISION_WEIGHTS[net]).url
    except Exception:  # only used to word an error message
        return _TORCHVISION_WEIGHTS[net]


def _backbone_state_dict(state: dict, backbone: torch.nn.Module, source: str) -> dict:
    """Map a torchvision-layout (`features.N.*`) or lpips-layout (`sliceK.N.*`) state dict onto `backbone`'s keys.

    lpips splits torchvision's `features` Sequential into slice1..sliceK keeping each layer's original index N,
    so `features.N.rest` -> `sliceK.N.rest` where sliceK is the slice holding layer N. Keys outside `features`
    (a full torchvision checkpoint's `classifier.*`) are ignored; every backbone tensor must be present with the
    right shape, nothing extra inside `features`.
    """
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"LPIPS backbone weights {source} are not a PyTorch state dict of tensors")
    expected = backbone.state_dict()
    tv_to_lpips = {}
    for key in expected:
        slice_name, index, rest = key.split(".", 2)
        tv_to_lpips[f"features.{index}.{rest}"] = key

    if any(k.startswith("slice") or k.startswith("net.slice") for k in state):
        mapped = {}
        for k, v in state.items():
            k = k[4:] if k.startswith("net.") else k
            if k.startswith("slice"):  # lpips' own `net` module layout; other keys (lin heads) are not ours
                mapped[k] = v
        unexpected = sorted(k for k in mapped if k not in expected)
    else:
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise InputError(
                f"LPIPS backbone weights {source} have no 'features.N.*' tensors (torchvision layout expected)"
            )
        unexpected = sorted(k for k in feats if k not in tv_to_lpips)
        mapped = {tv_to_lpips[k]: v for k, v in feats.items() if k in tv_to_lpips}
    missing = sorted(k for k in expected if k not in mapped)
    if missing or unexpected:
        inverse = {v: k for k, v in tv_to_lpips.items()}
        raise InputError(
            f"LPIPS backbone weights {source} do not fit the '{backbone.__class__.__name__}' backbone: "
            f"missing {[inverse.get(k, k) for k in missing][:4]}, unexpected {unexpected[:4]}"
        )
    bad = [
        f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if mapped[k].shape != v.shape
    ]
    if bad:
        raise InputError(f"LPIPS backbone weights {source} have wrong shapes: {'; '.join(bad[:3])}")
    return {k: v.to(dtype=expected[k].dtype) for k, v in mapped.items()}


class LPIPSDistance:
    """LPIPS features once per image, distances for all pairs by matrix products.

    net: "alex" (the paper's choice), "vgg" or "squeeze". backbone_weights: path to a torchvision-layout state
    dict; if None the FEWSHOTSAM2_LPIPS_WEIGHTS environment variable, then torchvision's cache/download.
    device: "cpu", "cuda", "auto" or a torch.device. size: images are resized to size x size before the network.
    """

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        size: int = 224,
        batch_size: int = 16,
    ) -> None:
        lpips = require_lpips()  # one clear error line when it is not installed
        if net not in NETS:
            raise InputError(f"unknown LPIPS network '{net}'; choose one of {', '.join(NETS)}")
        if size < 32:
            raise InputError(f"LPIPS image size {size} is too small (at least 32)")
        self.net = net
        self.size = int(size)
        self.batch_size = max(1, int(batch_size))
        self.device = pick_device(device)

        with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation warning from inside lpips
            warnings.simplefilter("ignore")
            # pnet_rand=True: build the backbone without asking torchvision to download anything
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)

        path = backbone_weights or os.environ.get(LPIPS_WEIGHTS_ENV) or None
        if path is not None:
            source = f"'{path}'"
            if os.path.isdir(path):
                raise InputError(f"LPIPS backbone weights {source} is a folder; give the weights file (.pth)")
            if not os.path.isfile(path):
                raise InputError(f"LPIPS backbone weights file {source} does not exist")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise InputError(f"cannot read LPIPS backbone weights {source}: not a PyTorch state dict of "
                                 f"tensors ({_load_failure(exc)})") from None
        else:
            source = "from torchvision"
            try:
                state = _torchvision_state_dict(net)
            except Exception as exc:
                hub = os.path.join(torch.hub.get_dir(), "checkpoints")
                raise InputError(
                    f"LPIPS '{net}' backbone weights are not available ({type(exc).__name__}): download "
                    f"{_torchvision_url(net)} into {hub}/, or give a torchvision-layout state dict with "
                    f"--lpips-weights PATH or the {LPIPS_WEIGHTS_ENV} environment variable"
                ) from exc
        model.net.load_state_dict(_backbone_state_dict(state, model.net, source), strict=True)
        self.weights_source = source

        model.eval().requires_grad_(False).to(self.device)
        self.model = model
        self._normalize = lpips.normalize_tensor
        # per layer: indices of channels with a positive lin weight, and sqrt of those weights. Zero-weight
        # channels (many in alex and squeeze) add nothing to the distance, so they are not stored.
        self._keep: list[torch.Tensor] = []
        self._sqrt_w: list[torch.Tensor] = []
        for lin in model.lins:  # already on self.device, so these are too
            w = lin.model[-1].weight.detach().reshape(-1).to(torch.float32)
            if (w < 0).any():  # v0.1 heads are clamped >= 0 in training; the sqrt trick relies on it
                raise InputError(f"LPIPS '{net}' linear head has negative weights; cannot factor the distance")
            keep = torch.nonzero(w > 0).reshape(-1)
            self._keep.append(keep)
            self._sqrt_w.append(torch.sqrt(w[keep]))

    @property
    def n_layers(self) -> int:
        return len(self._keep)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(b, h, w) in [0, 1] -> (b, 3, size, size) in lpips' [-1, 1] convention."""
        x = images[:, None].to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            # antialias: slices are usually larger than `size`; plain bilinear would alias fine texture
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x * 2.0 - 1.0).expand(-1, 3, -1, -1)

    def network_input(self, images: ImageBatch) -> torch.Tensor:
        """The (n, 3, size, size) tensor in [-1, 1] that `features` feeds to lpips (for checks against lpips)."""
        return self._prepare(self._as_tensor(images))

    @staticmethod
    def _as_tensor(images: ImageBatch) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise InputError(f"LPIPS expects images shaped (n, h, w), got {tuple(x.shape)}")
        return x

    @torch.no_grad()
    def features_from_network_input(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`features` for an (n, 3, H, W) batch already in [-1, 1] (no resizing)."""
        outs = self.model.net(self.model.scaling_layer(x.to(self.device, torch.float32)))
        result = []
        for layer, out in enumerate(outs):
            feat = self._normalize(out)[:, self._keep[layer]]
            hw = feat.shape[2] * feat.shape[3]
            feat = feat * (self._sqrt_w[layer] / hw**0.5)[None, :, None, None]
            result.append(feat.reshape(feat.shape[0], -1))
        return result

    @torch.no_grad()
    def features(self, images: ImageBatch) -> list[torch.Tensor]:
        """Per-image LPIPS features, one tensor per backbone layer.

        images: (n, h, w) (or one (h, w)) float in [0, 1], numpy or torch. Each is resized bilinearly
        (antialiased) to size x size, replicated to 3 channels, mapped to [-1, 1], passed through lpips'
        scaling layer and backbone in batches of `batch_size`.

        Returns, per layer l, a float32 tensor (n, D_l) on `device`: the activation unit-normalised over
        channels, restricted to channels with a positive lin weight, multiplied by sqrt(w_c / (H_l W_l)) and
        flattened, so that LPIPS(a, b) = sum_l |a_l - b_l|^2 exactly (see `distance_matrix`).
        Size per image for alex at 224: 328,882 floats (1.3 MB).
        """
        x = self._as_tensor(images)
        n = x.shape[0]
        if n == 0:  # no images: empty tensors with the right widths, so distance_matrix still works
            return [f[:0] for f in self.features(torch.zeros((1, self.size, self.size)))]
        out: list[torch.Tensor] = []
        for start in range(0, n, self.batch_size):
            part = self.features_from_network_input(self._prepare(x[start : start + self.batch_size]))
            if not out:  # filled in place: concatenating chunks would hold every feature twice at the end
                out = [torch.empty((n, f.shape[1]), dtype=f.dtype, device=f.device) for f in part]
            for layer, f in enumerate(part):
                out[layer][start : start + f.shape[0]] = f
        return out

    @staticmethod
    @torch.no_grad()
    def distance_matrix(
        feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], chunk: int = 256
    ) -> torch.Tensor:
        """LPIPS distances (na, nb) between every image of a and every image of b, from `features` output.

        Per layer |a|^2 + |b|^2 - 2 a.b^T as one float32 matmul per chunk of `chunk` rows of a (this bounds the
        temporary memory to chunk x nb), summed over layers in float64 and clamped at 0 (round-off can make
        identical images come out at -1e-8). Agrees with lpips.LPIPS to about 3e-7 on CPU (float32 round-off);
        on CUDA to about 1e-5, because cuDNN's default TF32 convolutions round differently per batch size.
        """
        if len(feats_a) != len(feats_b):
            raise ValueError("feature lists come from different networks")
        na, nb = feats_a[0].shape[0], feats_b[0].shape[0]
        device = feats_a[0].device
        out = torch.zeros((na, nb), dtype=torch.float64, device=device)
        for fa, fb in zip(feats_a, feats_b):
            fb = fb.to(device)
            nb2 = (fb * fb).sum(1).to(torch.float64)
            for start in range(0, na, chunk):
                a = fa[start : start + chunk]
                na2 = (a * a).sum(1).to(torch.float64)
                cross = (a @ fb.T).to(torch.float64)
                out[start : start + chunk] += na2[:, None] + nb2[None, :] - 2.0 * cross
        return out.clamp_min_(0.0)

    def match(
        self, query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each query image, the support image with the smallest LPIPS.

        Returns (indices int64 (nq,), distances float64 (nq,)); ties go to the lowest support index.
        """
        if support_feats[0].shape[0] == 0:
            raise InputError("no support images to match against")
        d = self.distance_matrix(query_feats, support_feats)
        dist, idx = d.min(dim=1)
        return idx.cpu().numpy().astype(np.int64), dist.cpu().numpy()


# --- physical field of view -------------------------------------------------------------------------------
# LPIPS compares images pixel grid to pixel grid. Slices of two scans resized straight to size x size show the
# body at different scales when their fields of view differ (a 366 mm crop vs a 500 mm scan with arms and
# table), and then whole-slice LPIPS barely tells slices apart (ct-a vs ct-b: all distances 0.48-0.53, matches
# unrelated to anatomy). Resampling every slice to the same millimetres per pixel, centred on the body, fixes the
# scale; these helpers do that for the images that go into `features` only (SAM2 keeps the original slices).


def body_box(stack: np.ndarray, spacing: tuple[float, float], threshold: float = 0.05) -> tuple[float, float, float]:
    """(centre row, centre column) in pixels and the larger side in mm of the body in a slice stack.

    stack: (n, h, w) in [0, 1]; spacing: (row, column) mm. Per slice, the body is the largest connected
    component above `threshold` after a 4 mm opening (drops table lines and noise); arms often touch the body
    in some slices or in a projection over slices, so the centre is the median over slices of the per-slice
    box centres and the side their 90th percentile (at most 64 slices looked at). One box for the whole stack: every slice of a volume gets the same crop.
    """
    n, h, w = stack.shape  # an array or a lazy SliceStack: read slice by slice
    iterations = max(1, int(round(4.0 / min(spacing))))
    boxes = []
    for k in np.unique(np.linspace(0, n - 1, num=min(n, 64)).round().astype(int)):
        fg = stack[k] > threshold
        opened = ndimage.binary_opening(fg, iterations=iterations)
        fg = opened if opened.any() else fg
        if not fg.any():
            continue
        lab, _ = ndimage.label(fg)
        body = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
        rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
        extent = max((rows[-1] - rows[0] + 1) * spacing[0], (cols[-1] - cols[0] + 1) * spacing[1])
        boxes.append(((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0, extent))
    if not boxes:  # blank volume: the whole image
        return (h - 1) / 2.0, (w - 1) / 2.0, float(max(h * spacing[0], w * spacing[1]))
    boxes_arr = np.array(boxes, dtype=float)
    r, c = np.median(boxes_arr[:, :2], axis=0)
    # 90th percentile, not the median: slices near the ends of an organ or head are small, and the field of
    # view must hold the big ones
    return float(r), float(c), float(np.percentile(boxes_arr[:, 2], 90))


def resample_to_fov(
    stack: np.ndarray,
    spacing: tuple[float, float],
    fov_mm: float,
    size: int = 224,
    center: Optional[tuple[float, float]] = None,
) -> np.ndarray:
    """Resample (n, h, w) slices to (n, size, size) covering fov_mm x fov_mm around `center` (pixels).

    Bilinear, outside the image = 0, float32. center defaults to `body_box`'s. Give support and query the same
    fov_mm, e.g. 1.1 x the larger of their `body_box` extents, so both are shown at the same mm per pixel.
    """
    if center is None:
        r, c, _ = body_box(stack, spacing)
    else:
        r, c = center
    step = fov_mm / size
    offsets = np.arange(size) - (size - 1) / 2.0
    rr = r + offsets * step / spacing[0]
    cc = c + offsets * step / spacing[1]
    # downsampling by more than ~2x aliases: smooth first, with a Gaussian matched to the sampling step
    sigma = [max(0.0, 0.5 * (step / s - 1.0)) for s in spacing]
    grid_r, grid_c = np.meshgrid(rr, cc, indexing="ij")
    out = np.empty((stack.shape[0], size, size), dtype=np.float32)
    for k in range(stack.shape[0]):
        # slice by slice (the same in-plane filter as on the whole stack): no full-size copy of a 300-slice CT
        image = np.asarray(stack[k], dtype=np.float32)
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="constant") if max(sigma) > 0 else image
        out[k] = ndimage.map_coordinates(image, [grid_r, grid_c], order=1, mode="constant", cval=0.0)
    return out


# Building LPIPS costs seconds (import, AlexNet construction, weights): the process keeps the last one built.
_SHARED: dict[tuple, LPIPSDistance] = {}


def shared_lpips(net: str = "alex", weights: Optional[str] = None, device: str = "cpu",
                 size: int = 224) -> LPIPSDistance:
    """The process's LPIPS network for (net, weights, device, size), built on first use: the LPIPS backend and the
    slice-range estimate share it. `weights` None: $FEWSHOTSAM2_LPIPS_WEIGHTS, else torchvision's download."""
    weights = weights or os.environ.get(LPIPS_WEIGHTS_ENV)
    key = (net, weights, str(device), int(size))
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = LPIPSDistance(net=net, backbone_weights=weights, device=str(device), size=int(size))
    return _SHARED[key]
