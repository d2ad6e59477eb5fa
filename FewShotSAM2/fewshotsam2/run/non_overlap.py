"""Who keeps a voxel that two structures claim: SAM2's logits (as its video predictor), or the listing order.

sam2's `SAM2VideoPredictor(non_overlap_masks=True)` tracks each object on its own and constrains only its output:
at every pixel of the video-resolution logits the object with the highest logit keeps its score, the others are
clamped to -10 or less (`SAM2Base._apply_non_overlapping_constraints`; `torch.argmax`, so a tie goes to the object
listed first); a pixel is an object's where its logit stays above 0. Memories stay per object. `LabelComposer`
applies the same rule to the pipeline's label map, one structure at a time and in listing order: each structure's
mask is painted on the free voxels, and a voxel already held goes to the newcomer only where its logit is
strictly higher than the holder's (a running argmax with sam2's tie rule). The logits compared are those the masks
come from: SAM2's low-resolution mask logits (after hole filling), upsampled bilinearly to the slice's own size
exactly as the engine upsamples them for the mask.

"order": the structure listed first keeps the voxel (the package's rule before the logits rule).
"allow": every structure keeps its whole mask; `LabelComposer.masks` hands them to `LabelMap.from_masks`, which
puts overlapping ones in separate layers (only a .seg.nrrd output holds them: `options.check_overlap_output`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fewshotsam2.constants import OVERLAP_RULES


def upsample_logits(low_res: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S/4, S/4) low-resolution logits -> (h, w), as `SAM2Engine.predict` upsamples them for the mask."""
    t = torch.from_numpy(np.ascontiguousarray(low_res, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


class LabelComposer:
    """Builds the label stack (n, h, w) from per-structure masks added in listing order.

    `rule`: "logits" (each `add` then needs the structure's low-resolution logits), "order" or "allow". Only the
    logits of structures added so far are kept (low resolution: (S/4)^2 float32 per slice), the masks are not,
    except with "allow": each structure's masks on its range, for `masks` (`labels` then holds them painted in
    listing order, the first listed on top, as "order").
    """

    def __init__(self, shape: tuple[int, int, int], dtype, rule: str = "logits") -> None:
        if rule not in OVERLAP_RULES:
            raise ValueError(f"unknown overlap rule {rule!r}: one of {', '.join(OVERLAP_RULES)}")
        self.labels = np.zeros(shape, dtype=dtype)
        self.rule = rule
        # value -> (first stack index, low-res logits of the range's slices)
        self._logits: dict[int, tuple[int, np.ndarray]] = {}
        self.contested = 0  # voxels claimed by more than one structure
        self.moved = 0  # of those, voxels a later-listed structure took by its higher logit
        self._masks: dict[int, tuple[int, np.ndarray]] = {}  # "allow": value -> (first stack index, masks)

    def add(self, value: int, first: int, masks: np.ndarray, logits: Optional[np.ndarray] = None) -> None:
        """Paint structure `value` whose masks cover stack slices first .. first + len(masks) - 1."""
        if value == 0:
            raise ValueError("label value 0 is the background")
        part = self.labels[first : first + len(masks)]
        if self.rule == "allow":
            self._masks[value] = (first, np.asarray(masks, dtype=bool))
        if self.rule != "logits" or not self._logits:
            if self.rule == "logits":
                self._keep(value, first, masks, logits)
            self.contested += int(np.count_nonzero(masks & (part != 0)))
            part[masks & (part == 0)] = value
            return
        self._keep(value, first, masks, logits)
        for i in range(len(masks)):
            mine = masks[i]
            held = mine & (part[i] != 0)
            if held.any():
                mine_up = None
                take = np.zeros_like(held)
                for holder in np.unique(part[i][held]):
                    where = held & (part[i] == holder)
                    h_first, h_logits = self._logits[int(holder)]
                    if not 0 <= first + i - h_first < len(h_logits):
                        continue  # the holder's slice past its range (`extend`): no logits there, it keeps the voxel
                    if mine_up is None:
                        mine_up = upsample_logits(logits[i], mine.shape)
                    theirs = upsample_logits(h_logits[first + i - h_first], mine.shape)
                    take |= where & (mine_up > theirs)  # strictly higher: a tie stays with the one listed first
                self.contested += int(np.count_nonzero(held))
                self.moved += int(np.count_nonzero(take))
                part[i][take] = value
            part[i][mine & (part[i] == 0)] = value

    def extend(self, value: int, first: int, masks: np.ndarray) -> None:
        """Structure `value` segmented further (past its range ends: range_ends.py): `masks` cover stack slices
        first .. first + len(masks) - 1, its range included. The new slices take free voxels only (no logits
        there), except with "allow", where the structure keeps them all; a structure added later stays off the
        voxels they hold (where either has no logits, the one painted first keeps the voxel)."""
        part = self.labels[first : first + len(masks)]
        if self.rule == "allow":
            self._masks[value] = (first, np.asarray(masks, dtype=bool))
        part[masks & (part == 0)] = value

    def masks(self) -> list[tuple[int, np.ndarray]]:
        """"allow": (value, bool mask of the whole stack) per structure, in the order added."""
        out = []
        for value, (first, masks) in self._masks.items():
            full = np.zeros(self.labels.shape, dtype=bool)
            full[first : first + len(masks)] = masks
            out.append((value, full))
        return out

    def _keep(self, value: int, first: int, masks: np.ndarray, logits: Optional[np.ndarray]) -> None:
        if logits is None or len(logits) != len(masks):
            raise ValueError(f"structure {value}: the logits rule needs the low-resolution logits of every slice")
        self._logits[value] = (first, logits)
