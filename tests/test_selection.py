"""Selection filters and ranking on hand-made grids (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from cosmic_tl.comparison import compare
from cosmic_tl.config import SelectionSettings
from cosmic_tl.scoring import Scores, evaluation_layers, kl_divergence, refusal_score, refusal_token_gap
from cosmic_tl.selection import (
    NoCandidateError,
    last_position_bounds,
    select_cosmic,
    select_refusal_tokens,
    select_substring,
)

POS = (-3, -2, -1)
N = 10  # layers: ⌊0.8·10⌋ = 8, so layers 8 and 9 are "late"


def make(s_abl, s_add, kl, bypass=None, induce=None) -> Scores:
    grids = {"S_abl": s_abl, "S_add": s_add, "KL": kl}
    if bypass is not None:
        grids |= {"bypass": bypass, "induce": induce, "KL_linear": kl}
    grids = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in grids.items()}
    computed = {k: torch.ones_like(v, dtype=torch.bool) for k, v in grids.items()}
    d = 4
    return Scores(
        grids,
        computed,
        POS,
        ("a", "b", "c"),
        (7,),
        torch.zeros(N),
        torch.ones(d),
        torch.ones(d),
        "ace",
        1.0,
        "m",
    )


def zeros():
    return torch.zeros(len(POS), N, dtype=torch.float64)


def test_picks_max_sum_and_respects_late_layers():
    a, s, kl = zeros(), zeros(), zeros()
    a[0, 9] = s[0, 9] = 5  # late layer: discarded despite the best score
    a[1, 3], s[1, 3] = 1.0, 0.9
    a[0, 2], s[0, 2] = 1.0, 0.8
    sel = select_cosmic(make(a, s, kl))
    assert sel.pick == (-2, 3)
    assert sel.reasons[0][9] == "late_layer" and sel.counts["late_layer"] == 2 * 3
    assert sel.scores["S_abl"] == 1.0


def test_kl_filter_and_nan():
    a, s, kl = zeros(), zeros(), zeros()
    a[1, 3], s[1, 3], kl[1, 3] = 1.0, 1.0, 0.5  # best, but KL too high
    a[0, 4], s[0, 4] = math.nan, 3.0  # NaN never ranked
    a[0, 2], s[0, 2], kl[0, 2] = 0.5, 0.5, 0.1  # KL exactly at the threshold survives
    sel = select_cosmic(make(a, s, kl))
    assert sel.pick == (-3, 2)
    assert sel.reasons[1][3] == "kl" and sel.reasons[0][4] == "nan"


def test_a_pick_below_kl_dropped_candidates_notes_the_best_of_them(tmp_path):
    a, s, kl = zeros(), zeros(), zeros()
    a[1, 3], s[1, 3], kl[1, 3] = 1.0, 1.0, 0.6  # the best: dropped by KL
    a[1, 5], s[1, 5], kl[1, 5] = 0.9, 0.9, 0.2  # the second: dropped too
    a[0, 2], s[0, 2], kl[0, 2] = 0.5, 0.5, 0.05  # the pick
    a[0, 6], s[0, 6], kl[0, 6] = 0.4, 0.4, 0.9  # ranked below the pick: not mentioned
    sel = select_cosmic(make(a, s, kl))
    assert sel.pick == (-3, 2)
    (note,) = sel.notes
    assert note.startswith("2 higher-ranked candidates were dropped by the KL filter")
    assert "position -2, layer 3 (KL 0.6 > 0.1" in note
    assert type(sel).load(sel.save(tmp_path / "sel")).notes == sel.notes
    kl[1, 3] = kl[1, 5] = 0.0  # now the best is picked: nothing to note
    assert select_cosmic(make(a, s, kl)).notes == ()


def test_last_position_rule_lower_median():
    a, s, kl = zeros(), zeros(), zeros()
    a[0, 2] = a[1, 5] = 1  # argmax layers 2 and 5 → lower median 2
    s[0, 4] = s[1, 6] = 1  # argmax layers 4 and 6 → lower median 4
    assert last_position_bounds(a, s, POS) == (2.0, 4.0)
    a[2, 5], s[2, 5] = 9, 9  # (-1, 5): 5 > 2 and 5 > 4 → pruned
    a[2, 4], s[2, 4] = 8, 8  # (-1, 4): 4 <= S → kept
    sel = select_cosmic(make(a, s, kl))
    assert sel.reasons[2][5] == "last_position" and sel.pick == (-1, 4)
    off = select_cosmic(make(a, s, kl), SelectionSettings(last_position_rule=False))
    assert off.pick == (-1, 5)


def test_ties_break_by_position_then_layer():
    a, s, kl = zeros() + 1, zeros() + 1, zeros()
    assert select_cosmic(make(a, s, kl)).pick == (-3, 0)


def test_nothing_survives_is_a_clear_error():
    a, s, kl = zeros(), zeros(), zeros() + 1.0
    with pytest.raises(NoCandidateError, match=r"by kl \(setting: kl_threshold\)") as err:
        select_cosmic(make(a, s, kl))
    assert err.value.selection.counts["kl"] == 3 * 8 - 0 - sum(
        1 for r in err.value.selection.reasons for x in r if x == "last_position"
    )
    assert sum(err.value.selection.counts.values()) == 3 * N


def test_baseline_filters_and_min_bypass():
    a, s, kl = zeros(), zeros(), zeros()
    bypass, induce = zeros() + 5, zeros() - 1
    induce[0, 1], bypass[0, 1] = 0.5, -2.0
    induce[1, 2], bypass[1, 2] = 0.1, -3.0
    kl[1, 2] = 0.2  # best bypass but KL too high
    induce[2, 9], bypass[2, 9] = 1.0, -9.0  # late layer
    sel = select_refusal_tokens(make(a, s, kl, bypass, induce))
    assert sel.pick == (-3, 1)
    assert sel.reasons[1][2] == "kl" and sel.reasons[2][9] == "late_layer"


def test_baseline_empty_is_a_result_not_an_error():
    a, s, kl = zeros(), zeros(), zeros()
    sel = select_refusal_tokens(make(a, s, kl, zeros(), zeros() - 3.4))
    assert not sel.found and sel.counts["induce"] == 3 * 8 and "induce_threshold" in sel.message


def test_compare_ranks_and_cosine():
    a, s, kl = zeros(), zeros(), zeros()
    a[0, 1], s[0, 1] = 1, 1
    bypass, induce = zeros(), zeros() + 1
    bypass[0, 1] = 2.0
    bypass[1, 2] = -1.0
    sc = make(a, s, kl, bypass, induce)
    c = compare(select_cosmic(sc), select_refusal_tokens(sc))
    assert c.cosmic_pick == (-3, 1) and c.baseline_pick == (-2, 2) and not c.same_pick
    assert c.cosmic_rank_under_baseline == 3 * N  # the worst bypass of all
    assert c.baseline_rank_under_cosmic == 2


def test_evaluation_layers_guard_and_order():
    cos = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.99], dtype=torch.float64)
    assert evaluation_layers(cos, 0.1) == (1,)  # ⌊0.5⌋ = 0 → at least one layer
    assert evaluation_layers(cos, 0.4) == (1, 3)  # stable on ties


def test_kl_and_refusal_score_known_values():
    logits = torch.tensor([[0.0, 0.0]])
    assert float(kl_divergence(logits, logits)) == 0.0
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    expected = float((p * (torch.log(p + 1e-6) - torch.log(q + 1e-6))).sum())
    assert float(kl_divergence(p.log()[None], q.log()[None])) == pytest.approx(expected, rel=1e-9)
    # P_R = 0.5 → log-odds 0
    assert float(refusal_score(torch.tensor([[1.0, 1.0]]), [0])) == pytest.approx(0.0, abs=1e-7)


def test_save_load_round_trip(tmp_path):
    a, s, kl = zeros(), zeros(), zeros()
    a[1, 3] = 1
    sc = make(a, s, kl, zeros(), zeros())
    sc.save(tmp_path / "scores")
    back = Scores.load(tmp_path / "scores")
    assert all(torch.equal(back.grids[k], sc.grids[k]) for k in sc.grids)
    sel = select_cosmic(back)
    sel.save(tmp_path / "sel")
    from cosmic_tl.selection import Selection

    again = Selection.load(tmp_path / "sel")
    assert again.pick == sel.pick and again.reasons == sel.reasons and again.counts == sel.counts


def test_refusal_token_gap_finds_the_token_that_rises():
    harmless = torch.tensor([[2.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 1.0]])
    harmful = torch.tensor([[0.0, 3.0, 0.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
    assert refusal_token_gap(harmful, harmless, 1).tolist() == [1]
    assert refusal_token_gap(harmful, harmless, 2).tolist() == [1, 2]


def _substring_scores(bypass, induce, kl):
    sc = make(zeros(), zeros(), kl)
    grids = dict(sc.grids) | {
        "bypass_mode": torch.as_tensor(bypass, dtype=torch.float64),
        "induce_mode": torch.as_tensor(induce, dtype=torch.float64),
    }
    done = {k: torch.ones_like(v, dtype=torch.bool) for k, v in grids.items()}
    return Scores(
        grids,
        done,
        *[
            getattr(sc, f)
            for f in (
                "positions",
                "position_labels",
                "eval_layers",
                "layer_cosines",
                "b_harmful",
                "b_harmless",
                "mode",
                "alpha",
                "model_id",
            )
        ],
    )


def test_substring_cuts_late_layers_at_the_last_position_only():
    # int(0.6 · 10) = 6: (-1, 6..9) are out, late layers at other positions stay in.
    bypass, induce, kl = zeros() + 1, zeros() - 5, zeros()
    bypass[2, 6] = -9.0  # position -1, layer 6: cut
    bypass[0, 9] = -8.0  # position -3, layer 9: kept (no late-layer cut there), and no induce filter
    sel = select_substring(_substring_scores(bypass, induce, kl))
    assert sel.pick == (-3, 9)
    assert sel.reasons[2][6] == "late_last_position" and sel.reasons[2][5] == ""
    assert sel.counts["late_last_position"] == 4 and "induce" not in sel.counts


def test_substring_nan_ties_and_kl():
    bypass, induce, kl = zeros() + 1, zeros(), zeros()
    bypass[0, 1] = bypass[1, 1] = -2.0  # a tie: the lower position index wins...
    kl[0, 1] = 0.5  # ...unless its KL is too high
    induce[0, 2], bypass[0, 2] = math.nan, -7.0  # NaN induce: discarded despite the best bypass
    bypass[1, 3] = math.nan
    sel = select_substring(_substring_scores(bypass, induce, kl))
    assert sel.pick == (-2, 1)
    assert sel.reasons[0][1] == "kl" and sel.reasons[0][2] == "nan" and sel.reasons[1][3] == "nan"
    kl[0, 1] = 0.0
    assert select_substring(_substring_scores(bypass, induce, kl)).pick == (-3, 1)


def test_substring_needs_its_grids():
    with pytest.raises(ValueError, match="bypass_mode"):
        select_substring(make(zeros(), zeros(), zeros()))
