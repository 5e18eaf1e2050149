"""No method ever picks a zero direction, and a pick that does nothing says so (§4c)."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL, HARMLESS

from cosmic_tl.candidates import compute_candidates
from cosmic_tl.config import SelectionSettings
from cosmic_tl.planner import score_candidates
from cosmic_tl.scoring import Scores
from cosmic_tl.selection import (
    NoCandidateError,
    select_cosmic,
    select_refusal_tokens,
    select_substring,
)

POS, N = (-2, -1), 5


def _scores(clean_cos: float = 0.5) -> Scores:
    """Zero directions at layer 0 score the clean value, every real candidate scores worse."""
    z = torch.zeros(len(POS), N, dtype=torch.float64)
    grids = {
        "S_abl": z + clean_cos - 0.1,
        "S_add": z + clean_cos - 0.2,
        "KL": z + 0.01,
        "bypass": z + 1.0,  # clean harmful refusal score is 0.5: ablation makes it worse
        "induce": z + 0.2,
        "KL_linear": z + 0.01,
        "bypass_mode": z + 1.0,
        "induce_mode": z + 0.2,
        "norm": z + 3.0,
    }
    for name in ("S_abl", "S_add"):
        grids[name][:, 0] = clean_cos
    for name in ("bypass", "bypass_mode"):
        grids[name][:, 0] = 0.5
    grids["induce"][:, 0] = grids["induce_mode"][:, 0] = 0.3
    grids["KL"][:, 0] = grids["KL_linear"][:, 0] = 0.0
    grids["norm"][:, 0] = 0.0
    grids["norm"][0, 1] = 1e-9  # numerically negligible next to 3.0
    done = {k: torch.ones_like(v, dtype=torch.bool) for k, v in grids.items()}
    clean = {
        "cos_harmful_harmless": clean_cos,
        "refusal_score_harmful": 0.5,
        "refusal_score_harmless": 0.3,
    }
    return Scores(
        grids,
        done,
        POS,
        ("a", "b"),
        (1,),
        torch.zeros(N),
        torch.ones(4),
        torch.ones(4),
        "ace",
        1.0,
        "m",
        clean=clean,
    )


@pytest.mark.parametrize("select", [select_cosmic, select_refusal_tokens, select_substring])
def test_zero_directions_never_win_and_a_useless_pick_is_flagged(select):
    s = _scores()
    sel = select(s, SelectionSettings(max_layer_fraction=1.0))
    assert sel.found
    assert sel.pick is not None and sel.pick[1] != 0 and sel.pick != (-2, 1)
    assert sel.counts["zero_direction"] == len(POS) + 1
    assert sel.reasons[0][0] == "zero_direction" and sel.reasons[0][1] == "zero_direction"
    assert sel.warnings and all("does not beat no intervention" in w for w in sel.warnings)


def test_a_pick_that_beats_no_intervention_has_no_warning():
    s = _scores()
    s.grids["S_abl"][0, 3] = s.grids["S_add"][0, 3] = 0.9
    sel = select_cosmic(s, SelectionSettings(max_layer_fraction=1.0))
    assert sel.pick == (-2, 3) and sel.warnings == ()


def test_identical_train_sets_give_no_pick_on_a_real_forward(tiny):
    """Every candidate is zero (same prompts on both sides): a clear result, never a pick."""
    cands = compute_candidates(tiny, HARMFUL, list(HARMFUL), batch_size=3, progress=False)
    assert float(cands.directions.abs().max()) == 0.0
    s = score_candidates(
        tiny,
        cands,
        HARMFUL[:3],
        HARMLESS[:3],
        batch_size=3,
        progress=False,
        baseline=("refusal_tokens", "substring"),
    )
    with pytest.raises(NoCandidateError, match="by zero_direction") as err:
        select_cosmic(s, SelectionSettings(kl_threshold=1e9))
    assert err.value.selection.counts["zero_direction"] > 0
    for select in (select_refusal_tokens, select_substring):
        assert not select(s, SelectionSettings(kl_threshold=1e9)).found


@pytest.mark.parametrize("alpha", [1.0, -4.0])
def test_real_picks_are_real_directions_or_flagged(tiny, alpha):
    cands = compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=3, progress=False)
    s = score_candidates(
        tiny, cands, HARMFUL[:3], HARMLESS[:3], alpha=alpha, batch_size=3, progress=False
    )
    settings = SelectionSettings(kl_threshold=1e9)
    sel = select_cosmic(s, settings)
    assert sel.scores["norm"] > 0
    clean = s.clean["cos_harmful_harmless"]
    beats = sel.scores["S_abl"] > clean and sel.scores["S_add"] > clean
    assert beats == (sel.warnings == ())
