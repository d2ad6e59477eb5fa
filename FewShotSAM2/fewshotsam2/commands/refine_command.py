"""`fewshotsam2 refine`: re-propagate a result from the slices the user corrected (see refine.py for what changes).

Inputs: the first run's query, supports and options; --previous, the label map it wrote; --corrected, that map
after the user's edits (on the query's grid). Segments are matched by name, then by value. Bad input: one line,
exit 2, nothing written. No changed slice: a message, exit 0, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from fewshotsam2 import settings
from fewshotsam2.errors import InputError, out_of_memory_as_input_error
from fewshotsam2.io.paths import refuse_overwriting_inputs
from fewshotsam2.options import OptionError, options_from_args
from fewshotsam2.run.progress import run_output  # segment's too
from fewshotsam2.settings import DEFAULT_FEATURE_CACHE_GB as DEFAULT_SIZE_GB, FEATURE_CACHE_ENV, FEATURE_CACHE_SIZE_ENV

# The feature cache, the pipeline, refine and volumes (torch, SimpleITK) are imported inside the functions that run:
# the command line imports this module to build `segment --help` and `refine --help`, which answer at once


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--feature-cache and --feature-cache-size (segment fills the cache, refine reads it)."""
    g = parser.add_argument_group("feature cache")
    g.add_argument("--feature-cache", metavar="DIR|off",
                   help="folder of SAM2 image features kept on disk, so that a later refine encodes no slice again "
                        f"(default ${FEATURE_CACHE_ENV} or ~/.cache/fewshotsam2/features; off: none)")
    g.add_argument("--feature-cache-size", type=float, metavar="GB",
                   help=f"bound of the feature cache; least recently used entries go first (default "
                        f"${FEATURE_CACHE_SIZE_ENV} or {DEFAULT_SIZE_GB:g}; about 2 MB per slice at 512 px, 8 MB at "
                        "1024 px)")


def feature_cache_of(args: argparse.Namespace):
    from fewshotsam2.model.feature_cache import FeatureCache

    return FeatureCache.from_settings(getattr(args, "feature_cache", None), getattr(args, "feature_cache_size", None))


class CachedEngineFactory:
    """An engine factory (`factory`, default `pipeline.make_engine`) whose engine uses `cache` until `restore()`
    (a shared engine, as tests and embedding programs hand in, gets its own cache setting back)."""

    def __init__(self, factory, cache) -> None:
        self.factory, self.cache = factory, cache
        self.engine, self.kept = None, None

    def __call__(self, options):
        if self.factory is None:
            from fewshotsam2.run.pipeline import make_engine

            self.factory = make_engine
        self.engine = self.factory(options)
        self.kept = getattr(self.engine, "feature_cache", None)
        self.engine.feature_cache = self.cache
        return self.engine

    def restore(self) -> None:
        if self.engine is not None:
            self.engine.feature_cache = self.kept


def _run_output(args: argparse.Namespace):
    return run_output(args.progress, args.quiet)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Refine a segmentation from the slices the user corrected: each corrected slice becomes a "
                     "SAM2 prompt next to the method's own, and prediction re-runs from it in both directions "
                     "(sam2's add_new_mask with clear_non_cond_mem_around_input). Give the same query, supports "
                     "and options as the first run. Corrected slices are written as drawn; structures without a "
                     "correction and slices outside a structure's range keep their previous value.")
    p.add_argument("--query", required=True, metavar="Q", help="the query volume of the first run")
    p.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a labeled support of the first run (repeat for several)")
    p.add_argument("--previous", required=True, metavar="RESULT",
                   help="the label map the first run wrote (its --out), on the query's grid")
    p.add_argument("--corrected", required=True, metavar="EDITED",
                   help="the same label map after the user's edits (segments matched by name, then value)")
    p.add_argument("--slices", default="auto", metavar="auto|LIST",
                   help="auto (default): every slice where EDITED differs from RESULT, per structure; LIST: only "
                        "these slices (array indices along the query's slice axis, e.g. 12,40); edits elsewhere "
                        "are ignored")
    p.add_argument("--previous-scores", metavar="FILE.csv",
                   help="the first run's --scores CSV: its slice ranges and, for --method reverse (required "
                        "there), its conditional slices; without it ranges are estimated again as the first run did")
    p.add_argument("--out", required=True, metavar="OUT", help="the refined label map (.nii.gz, .nrrd, .seg.nrrd)")
    settings.add_arguments(p, only=("method",))  # the first run's method and settings
    settings.add_arguments(p, groups=("slices", "reverse", "lpips", "model"))
    add_cache_arguments(p)
    g = p.add_argument_group("approximation (off by default)")
    g.add_argument("--stop-after-agreeing", type=int, default=0, metavar="N",
                   help="0 (default): re-predict every slice of the range, as sam2 does. N > 0: an approximation "
                        "that is faster on long volumes: in each direction, stop once the refined mask agrees with "
                        "the previous result on N consecutive slices (the slices beyond keep their previous value; "
                        "a later corrected slice starts prediction again)")
    g.add_argument("--agreement", type=float, default=0.99, metavar="DICE",
                   help="with --stop-after-agreeing: the Dice between the refined and the previous mask of a slice "
                        "from which they agree (default 0.99; two empty masks agree)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", default="bar", choices=("bar", "json"),
                   help="bar (default) or json: one JSON object per line on stdout, as for segment; the done line "
                        "reports encoder_calls and cache_hits")
    p.epilog = """example (after `fewshotsam2 segment ... --out ct-b.seg.nrrd --scores ct-b.csv`, ct-b.seg.nrrd edited
into ct-b-edited.seg.nrrd):
  fewshotsam2 refine --query Q --support IMAGE LABELS --previous ct-b.seg.nrrd --previous-scores ct-b.csv \\
      --corrected ct-b-edited.seg.nrrd --out ct-b-refined.seg.nrrd"""


def parse_slice_list(text: str) -> Optional[list[int]]:
    """None for auto, else the listed indices."""
    t = text.strip().lower()
    if t == "auto":
        return None
    try:
        out = sorted({int(x) for x in t.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--slices must be auto or a list of slice indices such as 12,40; got {text!r}") from None
    if not out or out[0] < 0:
        raise InputError(f"--slices must be auto or a list of slice indices (0 or more) such as 12,40; got {text!r}")
    return out


def _grid_of(path: str, what: str, query) -> None:
    """Refuse a label map that is not on the query's grid (read_labels would resample it silently)."""
    import SimpleITK as sitk

    from fewshotsam2.io.volume import Volume

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {path}: no such file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{what} {path}: not a readable label map") from None
    size = reader.GetSize()
    if len(size) > 3 and size[3:] != (1,) * (len(size) - 3) and not p.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"{what} {path}: not a 3D label map")
    shape = tuple(reversed(size[:3]))
    direction = np.array(reader.GetDirection()).reshape(len(size), len(size))[:3, :3]
    probe = Volume(np.zeros((1, 1, 1), np.uint8), tuple(reader.GetSpacing()[:3]), tuple(reader.GetOrigin()[:3]),
                   direction)
    probe.array = np.broadcast_to(probe.array, shape)
    if not probe.same_grid(query):
        raise InputError(f"{what} {path} is not on the query's grid ({shape} voxels vs the query's {query.shape}, "
                         "or another spacing, origin or direction): it must be the map segment wrote for this query")


def _match(structure, candidates):
    """The candidate of the same name (exact, then ignoring case), else of the same value, else None."""
    for test in (lambda c: c.name == structure.name, lambda c: c.name.lower() == structure.name.lower(),
                 lambda c: c.value == structure.value):
        found = [c for c in candidates if test(c)]
        if len(found) == 1:
            return found[0]
    return None


def run(args: argparse.Namespace) -> int:
    with _run_output(args) as (events, progress):  # as segment: JSON event lines, a bar, or nothing
        return _run(args, events, progress)


def _run(args: argparse.Namespace, events, bar) -> int:
    from fewshotsam2.run.pipeline import SupportCase, check_query, make_engine
    from fewshotsam2.run.refine import PreviousRun, changed_slices, check_refine_inputs, refine
    from fewshotsam2.slicing.slices import SlicePlan
    from fewshotsam2.io.volume import check_output_path, read_labels, read_volume, structure_mask, write_labels

    options = options_from_args(args)
    if args.stop_after_agreeing < 0:
        raise InputError(f"--stop-after-agreeing must be 0 (off) or more, got {args.stop_after_agreeing}")
    if not 0.0 <= args.agreement <= 1.0:
        raise InputError(f"--agreement is a Dice between 0 and 1, got {args.agreement:g}")
    if options.overlap == "allow":  # refine edits one label map: overlapping layers would be flattened silently
        raise OptionError("overlap", "allow is not available for refine, which corrects one label per voxel; "
                                     "choose --overlap logits or order")
    refuse_overwriting_inputs([("--out", args.out)],
                              [args.query, *(p for pair in args.support for p in pair), args.previous, args.corrected,
                               args.previous_scores, args.checkpoint, args.lpips_weights])
    check_output_path(args.out)
    wanted_slices = parse_slice_list(args.slices)
    cache = feature_cache_of(args)
    json_lines = events is not None
    if bar is not None:
        bar("Reading the volumes", 0, 0)
    query = read_volume(args.query)
    check_query(query)
    _grid_of(args.previous, "the previous result", query)
    _grid_of(args.corrected, "the corrected label map", query)
    prev_labels, structures = read_labels(args.previous, query)
    corr_labels, corr_structures = read_labels(args.corrected, query)
    if not structures:
        raise InputError(f"the previous result {args.previous} holds no segment")
    # both maps as one integer map each, in the previous result's values
    prev_map = np.zeros(query.shape, np.min_scalar_type(max(s.value for s in structures)))
    for s in reversed(structures):  # the first listed wins an overlap, as segment writes them
        prev_map[structure_mask(prev_labels, s)] = s.value
    corr_map = np.zeros_like(prev_map)
    mask = None
    for c in reversed(corr_structures):
        mask = structure_mask(corr_labels, c)
        s = _match(c, structures)
        if s is None:
            if mask.any():
                raise InputError(f"segment '{c.name}' (value {c.value}) of the corrected map is not in the previous "
                                 f"result ({', '.join(f'{x.name}={x.value}' for x in structures)})")
            continue
        corr_map[mask] = s.value
    del prev_labels, corr_labels, mask  # the maps above are all that is used: no copy held through the refine
    previous_volume, corrected_volume = query.with_array(prev_map), query.with_array(corr_map)
    check_refine_inputs(query, structures, previous_volume, corrected_volume)
    plan = SlicePlan.for_volume(query, options.axis)
    changed = changed_slices(prev_map, corr_map, [s.value for s in structures], plan.array_axis)
    if wanted_slices is not None:
        bad = [i for i in wanted_slices if i >= plan.n_slices]
        if bad:
            raise InputError(f"--slices {bad[0]} is outside the query's {plan.n_slices} slices along array axis "
                             f"{plan.array_axis}")
        changed = {v: [i for i in idx if i in wanted_slices] for v, idx in changed.items()}
    if not any(changed.values()):
        message = "no corrected slice: the edited map equals the previous result" + (
            " on --slices" if wanted_slices is not None else "") + "; nothing to refine, nothing written"
        if json_lines:
            events.done(out=None, changed=False, message=message, encoder_calls=0, cache_hits=0, corrected_slices={})
        else:
            print(message)
        return 0
    if options.method == "reverse" and not args.previous_scores:
        raise InputError("--method reverse: give the first run's scores with --previous-scores (refine keeps its "
                         "conditional slices)")
    previous_run = PreviousRun.from_scores_csv(args.previous_scores, structures) if args.previous_scores else None
    supports = []
    for image_path, labels_path in args.support:
        image = read_volume(image_path)
        labels, available = read_labels(labels_path, image)
        masks = {}
        for s in structures:
            a = _match(s, available)
            if a is not None:
                masks[s.value] = structure_mask(labels, a)
        supports.append(SupportCase(image, labels, name=Path(labels_path).name, masks=masks))
    for s in structures:
        if changed.get(s.value) and not any(c.masks.get(s.value) is not None and c.masks[s.value].any()
                                            for c in supports):
            raise InputError(f"structure '{s.name}' (value {s.value}) is in no support (matched by name, then value)")
    if bar is not None:
        bar(f"Loading SAM2 {options.model}", 0, 0)
    with out_of_memory_as_input_error(options):
        factory = CachedEngineFactory(getattr(args, "engine_factory", None) or make_engine, cache)
        engine = factory(options)
        try:
            notify = None if json_lines or args.quiet else (lambda text: print(text, file=sys.stderr))
            result = refine(query, supports, structures, options, previous_volume, corrected_volume,
                            progress=bar, engine=engine, slices=changed, previous=previous_run, notify=notify,
                            stop_after_agreeing=args.stop_after_agreeing, agreement=args.agreement)
        finally:
            factory.restore()
    write_labels(args.out, result.labels, result.structures)
    names = {s.value: s.name for s in structures}
    corrected = {names[v]: idx for v, idx in result.corrected_slices.items()}
    if json_lines:
        events.done(out=str(args.out), changed=True, device=str(getattr(engine, "device", "")),
                       seconds=result.timings["total"], slice_axis=int(result.slice_axis),
                       encoder_calls=int(result.encoder_calls), cache_hits=int(result.cache_hits),
                       corrected_slices=corrected,
                       predicted_slices={names[v]: n for v, n in result.predicted_slices.items()},
                       slice_ranges={s.name: result.slice_ranges.get(s.value) for s in structures})
        return 0
    for name, idx in corrected.items():
        print(f"{name}: corrected slices {', '.join(map(str, idx))}")
    print(f"wrote {args.out} ({result.encoder_calls} slices encoded, {result.cache_hits} read from the feature "
          f"cache, {result.timings['total']:.1f} s)")
    return 0
