"""`fewshotsam2 extent`: each structure's slice range in the query, estimated from labeled supports.

The range is what `segment --slice-range auto` uses. With --json the output is exactly
{"axis": A, "structures": [{"value": V, "name": N, "first": F, "last": L}, ...]} where A is the array axis of the
query (0-2, numpy z, y, x order of the file as read) along which slices run, and F..L the inclusive indices along
that axis; an empty range has first > last (first = 0, last = -1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewshotsam2 import settings
from fewshotsam2.errors import InputError
from fewshotsam2.options import options_from_args
from fewshotsam2.slicing.slice_range import to_array_range

EMPTY = (0, -1)  # the JSON answer's empty range: first > last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", required=True, metavar="Q", help="the volume to find the structures in")
    parser.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labeled support (image and label map); repeat for several (ranges are joined)")
    parser.add_argument("--labels", required=True, metavar="L1,L2", help="structures: label values or names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of one line per structure")
    # the same settings, names and defaults as `segment` (settings.py)
    settings.add_arguments(parser, only=settings.EXTENT_SETTINGS)
    s = parser.add_argument_group("remote (a `fewshotsam2 serve` server)")
    s.add_argument("--server", metavar="URL", help="estimate on this server (https://host:port) instead of here: the "
                   "same answer; the volumes are uploaded")
    s.add_argument("--token-file", metavar="F", help="with --server: the file holding this client's token "
                   "(else $FEWSHOTSAM2_SERVER_TOKEN)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from fewshotsam2.serve.client import run_remote_extent

        return run_remote_extent(args)
    options = options_from_args(args)  # checks every value (--extent-margin, --device, ...)
    print_extent(estimate(args.query, [tuple(p) for p in args.support], args.labels, options), args.query, args.json)
    return 0


def print_extent(result: dict, query: str, as_json: bool) -> None:
    """`extent`'s answer on stdout: the JSON object (module docstring), or one line per structure."""
    if as_json:
        print(json.dumps({"axis": result["axis"], "structures": result["structures"]}))
        return
    for o in result["structures"]:
        where = (f"slices {o['first']}-{o['last']} ({o['last'] - o['first'] + 1} of {result['n_slices']})"
                 if o["first"] <= o["last"] else "empty range (not in the query)")
        print(f"{o['name']} ({o['value']}): {where} along array axis {result['axis']} of {Path(query).name}")


def estimate(query_path: str, support_paths: list[tuple[str, str]], labels: str, options) -> dict:
    """Each structure's slice range in the query: {"axis", "structures": [{value, name, first, last}], "n_slices"}
    (the JSON answer plus the number of query slices along the axis). Here and on a server (serve/runner.py)."""
    # torch and SimpleITK come in when the command runs, so that `extent --help` answers at once
    from fewshotsam2.model.device import pick_device
    from fewshotsam2.slicing.extent import ExtentEstimator, stack_info
    from fewshotsam2.slicing.intensity import choose_preset
    from fewshotsam2.run.pipeline import check_query, warn_if_other_modality
    from fewshotsam2.supports.support_loader import SupportReader
    from fewshotsam2.io.volume import read_volume

    query = read_volume(query_path)
    check_query(query)
    qinfo, qplan = stack_info(query, None, options.axis, options.preset)
    query_kind = choose_preset(query)
    supports, structures = SupportReader().load(support_paths, labels)
    infos = []
    for (image_path, _), support in zip(support_paths, supports):
        warn_if_other_modality(support.image, query_kind, image_path)  # as segment warns
        info, plan = stack_info(support.image, None, options.axis, options.preset)
        if plan.plane != qplan.plane:
            raise InputError(f"{image_path} is sliced {plan.plane} but the query {qplan.plane}: give --axis")
        # which slices hold each structure (a support may hold only some of them)
        info.present = {st.value: plan.stack(support.mask(st.value)).reshape(plan.n_slices, -1).any(axis=1)
                        for st in structures}
        infos.append(info)
    estimator = ExtentEstimator(weights=options.extent_weights, device=str(pick_device(options.device)),
                                margin_mm=options.extent_margin)
    ranges = estimator.estimate(qinfo, infos, [(s.value, s.name) for s in structures])
    out = []
    for r in ranges:
        first, last = to_array_range(qplan, r.first, r.last) if not r.empty else EMPTY
        out.append({"value": int(r.value), "name": r.name, "first": int(first), "last": int(last)})
    return {"axis": int(qplan.array_axis), "structures": out, "n_slices": int(qplan.n_slices)}
