"""PPO's arithmetic against hand-worked values (the ppo stage itself is not wired yet)."""
import math

import mlx.core as mx
import numpy as np
import pytest

from localtune.methods import ppo_math as P


def test_gae_and_returns_match_hand_worked_values():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lambda 0.5:
    # delta = [0.1, 0.1, 0.3];  A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3 = 0.25, A_0 = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = P.gae(mx.array([[0.0, 0.0, 1.0]]), mx.array([[0.5, 0.6, 0.7]]), mx.ones((1, 3)), 1.0, 0.5)
    assert np.allclose(adv, [[0.225, 0.25, 0.3]]) and np.allclose(ret, [[0.725, 0.85, 1.0]])
    # a response of 2 tokens in a row of 3 (the pad's value 9 must not leak in), gamma 0.9, lambda 0.95:
    # A_1 = 2 - 1 = 1;  A_0 = (0 + 0.9 * 1 - 1) + 0.9 * 0.95 * 1 = 0.755
    adv, ret = P.gae(mx.array([[0.0, 2.0, 0.0]]), mx.array([[1.0, 1.0, 9.0]]), mx.array([[1.0, 1.0, 0.0]]), 0.9, 0.95)
    assert np.allclose(adv, [[0.755, 1.0, 0.0]]) and np.allclose(ret, [[1.755, 2.0, 0.0]])


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = mx.array([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    r = P.token_rewards(mx.array([2.0, -1.0]), kl, mask, 0.1)
    assert np.allclose(r, [[-0.01, -0.02, 1.97, 0.0], [-0.05, -1.05, 0.0, 0.0]])


@pytest.mark.parametrize("ratio, advantage, loss, clipped", [
    (1.1, 1.0, -1.1, 0.0),    # inside the band: the plain surrogate
    (1.5, 1.0, -1.2, 1.0),    # a good action pushed past 1 + eps: no more credit
    (1.5, -1.0, 1.5, 0.0),    # a bad action made likelier: the pessimistic, unclipped term
    (0.5, 1.0, -0.5, 0.0),    # a good action made less likely: unclipped
    (0.5, -1.0, 0.8, 1.0),    # a bad action pushed below 1 - eps: no more credit
    (1.2, 1.0, -1.2, 0.0),    # exactly at the boundary: both terms equal, not counted as clipped
])
def test_ratio_clipping_at_the_boundaries(ratio, advantage, loss, clipped):
    old = mx.zeros((1, 1))
    value, frac, approx_kl = P.policy_loss(old + math.log(ratio), old, mx.array([[advantage]]), mx.ones((1, 1)))
    assert value.item() == pytest.approx(loss, rel=1e-5) and frac.item() == clipped
    assert approx_kl.item() == pytest.approx((ratio - 1) - math.log(ratio), rel=1e-4)


@pytest.mark.parametrize("v, loss, clipped", [(0.5, 0.32, 1.0), (0.1, 0.405, 0.0), (0.2, 0.32, 0.0)])
def test_value_clipping_at_the_boundaries(v, loss, clipped):
    # V_old = 0, R = 1, eps = 0.2: V = 0.5 is held to 0.2, whose error (0.64) is the larger and wins
    value, frac = P.value_loss(mx.array([[v]]), mx.zeros((1, 1)), mx.ones((1, 1)), mx.ones((1, 1)))
    assert value.item() == pytest.approx(loss, rel=1e-5) and frac.item() == clipped


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_is_zero_when_the_policy_is_the_reference(estimator):
    logp = mx.log(mx.array([[0.2, 0.5, 0.9]]))
    assert np.allclose(P.kl_penalty(logp, logp, estimator), 0.0)
    assert (np.array(P.kl_penalty(logp, logp - 0.3, "k3")) > 0).all()


def test_whitening_and_explained_variance():
    x, mask = mx.array([[1.0, 2.0, 3.0, 100.0]]), mx.array([[1.0, 1.0, 1.0, 0.0]])
    w = np.array(P.whiten(x, mask))[0, :3]
    assert abs(w.mean()) < 1e-6 and w.std() == pytest.approx(1.0, rel=1e-4)
    returns = mx.array([[1.0, 2.0, 3.0, 0.0]])
    assert P.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert P.explained_variance(mx.full((1, 4), 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_moves_beta_towards_the_target():
    kl = P.AdaptiveKL(0.1, target=6.0, horizon=100)
    assert kl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert P.AdaptiveKL(0.1, None).update(50.0, 10) == 0.1  # fixed coefficient
