"""The reference runs train to the metrics and run-directory names pinned before the training
machinery was refactored (`tests/scripts/pin_reference_runs.py` recorded them)."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from pin_reference_runs import OUT, configs, record  # noqa: E402


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_reference_labels_are_pinned():
    pinned = json.loads(OUT.read_text())
    assert sorted(c.label() for c in configs()) == sorted(pinned)


def test_reference_runs_give_the_pinned_metrics(tmp_path):
    pinned = json.loads(OUT.read_text())
    got = json.loads(json.dumps(record(str(tmp_path))))
    assert sorted(got) == sorted(pinned)
    for label, run in pinned.items():
        assert got[label]["config"] == run["config"], label
        for epoch, (new, old) in enumerate(zip(got[label]["metrics"], run["metrics"]), 1):
            assert sorted(new) == sorted(old), (label, epoch, set(new) ^ set(old))
            diff = {k: (new[k], old[k]) for k in old if not _same(new[k], old[k])}
            assert not diff, (label, epoch, diff)
        assert len(got[label]["metrics"]) == len(run["metrics"]), label
