"""Small things a careful user of `evaluate` meets: no UNTRAINED banner on a refused run, a missing Dice drawn as
"n/a" rather than a zero-height bar, and the 1-shot LPIPS matching plot (a flat line by construction) explained
instead of drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewshotsam2 import cli
from fewshotsam2.research import plots

pytest.importorskip("matplotlib")


def test_refused_evaluate_prints_no_untrained_banner(sample_data_dir, tmp_path, capsys):
    cases = [str(sample_data_dir / "abdomen-ct" / "ct-a"), str(sample_data_dir / "abdomen-ct" / "ct-b")]
    argv = ["evaluate", *cases, "--structures", "5", "--untrained", "--image-size", "64", "--device", "cpu",
            "--no-progress"]
    # refused while checking the cases: before any folder is made
    rc = cli.main(argv + ["-o", str(tmp_path / "out"), "--support", "no-such-case"])
    out, err = capsys.readouterr()
    assert rc == 2 and "no-such-case" in err
    assert "UNTRAINED" not in out + err
    assert not (tmp_path / "out").exists()
    # refused at the output folder (an earlier run's results), after SAM2 was built
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "cases.csv").write_text("protocol\n")
    rc = cli.main(argv + ["-o", str(tmp_path / "earlier")])
    out, err = capsys.readouterr()
    assert rc == 2 and "--resume" in err
    assert "UNTRAINED" not in out + err


def _summary(structures, methods, missing):
    rows = []
    for s in structures:
        for m in methods:
            value = math.nan if (s, m) in missing else 0.5
            rows.append(dict(structure=s, method=m, dice_mean=value, dice_sd=0.1, dice_extent_mean=value,
                             dice_extent_sd=0.1))
    return rows


def test_missing_dice_is_no_bar(tmp_path, monkeypatch):
    plt = plots._pyplot()
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to look at what was drawn
    rows = _summary(["liver", "spleen"], ["reverse", "lpips"], missing={("spleen", "lpips")})
    path = plots.plot_dice(rows, tmp_path / "dice.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    fig = kept[0]
    for ax in fig.axes:
        heights = [p.get_height() for p in ax.patches]
        assert len(heights) == 3 and all(h == 0.5 for h in heights)  # 4 results, 1 missing: 3 bars, no 0-bar
        assert [t.get_text() for t in ax.texts] == ["n/a"]
    plt.close(fig)


def _matches(support_positions_per_run):
    """slices.csv-like rows: one run (query, support) per entry, matched support position per query slice."""
    rows = []
    for run, positions in enumerate(support_positions_per_run):
        for i, y in enumerate(positions):
            rows.append(dict(structure="liver", query=f"q{run}", support=f"s{run}", query_pos_rel=i / 10,
                             support_pos_rel=y))
    return rows


def test_one_shot_matching_is_recognised_as_flat():
    # 1-shot: each run offers one support slice, at a slightly different relative position per support case
    assert plots.matching_is_flat(_matches([[0.5] * 10, [0.48] * 10]))
    assert not plots.matching_is_flat(_matches([list(np.linspace(0, 1, 10)), [0.5] * 10]))
    assert not plots.matching_is_flat(_matches([[0.2, 0.5, 0.8] * 3]))
