import json

import pytest

from dormant.report import by_round, curves, final_values, load_comparison, paired, run_dirs


def _write(tmp_path, runs):
    """runs: {variant: [metrics rows of one seed, ...]}"""
    listed = []
    for variant, seeds in runs.items():
        for i, rows in enumerate(seeds):
            rd = tmp_path / "runs" / f"{variant}-s{i}"
            rd.mkdir(parents=True)
            (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            listed.append({"variant": variant, "run_dir": str(rd)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "compare.json").write_text(json.dumps({"spec": {}, "rows": [], "runs": listed}))
    return load_comparison(tmp_path / "out")


def test_curves_and_final_values(tmp_path):
    cmp = _write(tmp_path, {"a": [[{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.7}],
                                  [{"epoch": 1, "acc": 0.7}, {"epoch": 2, "acc": 0.9}]],
                            "b": [[{"epoch": 1, "acc": 0.1}]]})
    ep, mean, std = curves(cmp, "acc")["a"]
    assert ep == [1, 2] and mean == pytest.approx([0.6, 0.8])
    assert std == pytest.approx([0.02 ** 0.5] * 2)     # sample std of (0.5, 0.7)
    assert final_values(cmp, "acc") == {"a": [0.7, 0.9], "b": [0.1]}


def test_round_curves_pair_seeds(tmp_path):
    rnd = lambda s, acc: {"epoch": 1, "round_end": True, "sparsity": s, "acc": acc}
    mid = {"epoch": 1, "acc": 0.0, "sparsity": 0.0}
    cmp = _write(tmp_path, {
        "IMP": [[mid, rnd(0.0, 0.9), rnd(0.2, 0.8)], [rnd(0.0, 0.8), rnd(0.2, 0.6)]],
        "AP": [[rnd(0.0, 0.9), rnd(0.2, 0.9)], [rnd(0.0, 0.8), rnd(0.2, 0.9)]]})
    xs, mean, _ = by_round(cmp, "acc")["IMP"]
    assert xs == [0.0, 0.2] and mean == pytest.approx([0.85, 0.7])
    diffs = paired(cmp, "acc", "IMP", "AP")
    assert [d[0] for d in diffs] == [0.0, 0.2]
    assert diffs[1][1] == pytest.approx(0.2) and diffs[1][2] == pytest.approx(0.1 * 2 ** 0.5)


def test_missing_comparison_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dormant compare"):
        load_comparison(tmp_path)


def test_select_and_add_keep_runs_of_the_named_variants(tmp_path):
    cmp = _write(tmp_path, {"a": [[{"epoch": 1, "acc": 0.5}]], "b": [[{"epoch": 1, "acc": 0.1}]],
                            "c": [[{"epoch": 1, "acc": 0.3}]]})
    sub = cmp.select(["a", "c"])
    assert sub.variants == ["a", "c"] and final_values(sub, "acc") == {"a": [0.5], "c": [0.3]}
    assert (sub + cmp.select(["b"])).variants == ["a", "c", "b"]


def test_run_dirs_fall_back_to_root_when_the_runs_moved(tmp_path):
    _write(tmp_path, {"a": [[{"epoch": 1}], [{"epoch": 1}]], "b": [[{"epoch": 1}]]})
    moved = tmp_path / "elsewhere"
    (tmp_path / "runs").rename(moved)
    dirs = run_dirs(tmp_path / "out", moved)
    assert [v for v, _ in dirs] == ["a", "a", "b"]
    assert all(d.parent == moved and d.exists() for _, d in dirs)
    assert final_values(load_comparison(tmp_path / "out", moved), "epoch") == {"a": [1, 1], "b": [1]}
