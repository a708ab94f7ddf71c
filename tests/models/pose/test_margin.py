"""The estimator's margin: decided by the pixels two answers dispute, not by the whole view."""

import numpy as np

from refany3d.models.pose.refine import MARGIN_PRIOR_PX, answer_margin

STEP, TAU = 4, 0.01


def _view(knob_at: slice):
    """A box face seen on a 100-pixel grid at 1 m, a knob 2 cm proud on 10 of its pixels; the band
    holds 400 outline pixels, the knob's 12 of them inside the rendered outline."""
    grid_hit = np.ones(100, bool)
    depth = np.full(100, 1.0)
    depth[knob_at] = 0.98
    band_hit = np.zeros(400, bool)
    band_hit[:200] = True
    band_hit[200 + knob_at.start : 200 + knob_at.start + 12] = True
    return grid_hit, depth, band_hit


def test_a_small_part_in_the_right_place_decides_between_two_answers():
    right, wrong = _view(slice(10, 20)), _view(slice(60, 70))
    observed_depth, band_obs = right[1], right[2]
    margin = answer_margin(STEP, TAU, observed_depth, band_obs, right, wrong)
    assert margin > 0.75  # the knob's pixels: a few per cent of the view, all of the dispute
    assert answer_margin(STEP, TAU, observed_depth, band_obs, wrong, right) == -margin


def test_answers_that_render_alike_have_no_margin():
    answer = _view(slice(10, 20))
    assert answer_margin(STEP, TAU, answer[1], answer[2], answer, answer) == 0.0


def test_a_dispute_of_a_few_pixels_cannot_decide():
    right, wrong = _view(slice(10, 20)), _view(slice(10, 20))
    wrong[2][0] = False  # one outline pixel apart
    margin = answer_margin(STEP, TAU, right[1], right[2], right, wrong)
    assert margin == 1.0 / (1.0 + MARGIN_PRIOR_PX)
