"""eval.strong_attack on a small budget: the served radii of a demo model hold, and the same attack
finds violations once the served radius is doubled (it can fail)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name", ["breast_cancer_lse", "diabetes_lse"])
@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_the_strong_attack_holds_at_the_served_radius_and_breaks_past_it(demo_repository, monkeypatch, factor, name):
    import eval.strong_attack as strong

    served_outputs = strong.served_outputs

    def moved(version, x32, tau):
        out = dict(served_outputs(version, x32, tau))
        out["certified_radius"] = out["certified_radius"] * factor
        return out

    monkeypatch.setattr(strong, "served_outputs", moved)
    row = dict(zip(strong.HEADER, strong.attack_model(name, demo_repository, pool=12, rows=6, restarts=4, steps=30),
                   strict=True))
    assert row["pooled rows"] > 40 and row["attacked rows"] == 6
    violations = row["violations (screen)"] + row["violations (targeted PGD)"] + row["violations (uniform PGD)"]
    if factor == 1.0:
        assert violations == 0 and 0 <= row["smallest fraction of the margin left (strong)"] < 0.5, row
    else:
        assert row["violations (targeted PGD)"] > 0 and row["violations (uniform PGD)"] > 0, row
