"""`fewshotsam2 extent`: each structure's slice range in the query, estimated from labeled supports.

The range is what `segment --slice-range auto` uses. With --json the output is exactly
{"axis": A, "structures": [{"value": V, "name": N, "first": F, "last": L}, ...]} where A is the array axis of the
query (0-2, numpy z, y, x order of the file as read) along which slices run, and F..L the inclusive indices along
that axis; an empty range has first > last (first = 0, last = -1).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import constants as C

    parser.add_argument("--query", required=True, metavar="Q", help="the volume to find the structures in")
    parser.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labeled support (image and label map); repeat for several (ranges are joined)")
    parser.add_argument("--labels", required=True, metavar="L1,L2", help="structures: label values or names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of one line per structure")
    parser.add_argument("--axis", default="auto", choices=C.AXES, help="slice direction (as for segment)")
    parser.add_argument("--preset", default="auto", choices=C.PRESETS, help="intensity window (as for segment)")
    parser.add_argument("--extent-margin", type=float, default=15.0, metavar="MM",
                        help="widen each end of the range by this many mm (default 15)")
    parser.add_argument("--lpips-weights", metavar="PATH",
                        help="AlexNet weights (torchvision layout) for offline use; also $FEWSHOTSAM2_LPIPS_WEIGHTS")
    parser.add_argument("--device", default="cpu", choices=C.DEVICES,
                        help="where LPIPS runs (default cpu; it is small)")


def run(args: argparse.Namespace) -> int:
    from .cli import parse_label_selection, resolve_structures
    from .engine import pick_device
    from .errors import InputError
    from .extent import ExtentEstimator, stack_info
    from .intensity import choose_preset
    from .pipeline import check_query, warn_if_other_modality
    from .slice_range import to_array_range
    from .volume import read_labels, read_volume

    if not args.extent_margin >= 0:
        raise InputError(f"--extent-margin must be 0 mm or more, got {args.extent_margin}")
    wanted = parse_label_selection(args.labels)
    query = read_volume(args.query)
    check_query(query)  # as segment: a constant query has nothing to find
    qinfo, qplan = stack_info(query, None, args.axis, args.preset)
    query_kind = choose_preset(query)
    supports, structures = [], None
    for image_path, labels_path in args.support:
        image = read_volume(image_path)
        labels, available = read_labels(labels_path, image)
        chosen = resolve_structures(wanted, available, labels_path)
        structures = structures or chosen
        warn_if_other_modality(image, query_kind, image_path)
        info, plan = stack_info(image, labels, args.axis, args.preset)
        if plan.plane != qplan.plane:
            raise InputError(f"{image_path} is sliced {plan.plane} but the query {qplan.plane}: give --axis")
        supports.append(info)
    estimator = ExtentEstimator(weights=args.lpips_weights, device=str(pick_device(args.device)),
                                margin_mm=args.extent_margin)
    ranges = estimator.estimate(qinfo, supports, [(s.value, s.name) for s in structures])
    out = []
    for r in ranges:
        first, last = to_array_range(qplan, r.first, r.last) if not r.empty else (0, -1)
        out.append({"value": int(r.value), "name": r.name, "first": int(first), "last": int(last)})
    if args.json:
        print(json.dumps({"axis": int(qplan.array_axis), "structures": out}))
    else:
        for o in out:
            where = (f"slices {o['first']}-{o['last']} ({o['last'] - o['first'] + 1} of {qplan.n_slices})"
                     if o["first"] <= o["last"] else "empty range (not in the query)")
            print(f"{o['name']} ({o['value']}): {where} along array axis {qplan.array_axis} of {Path(args.query).name}")
    return 0
