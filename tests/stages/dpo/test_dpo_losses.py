"""Each preference loss against numbers worked out by hand (the arithmetic is in the comments).

Shorthand: sp(x) = -log sigma(x) = log(1 + exp(-x)); sp(1) = 0.31326168751822286,
sp(-1) = 1.31326168751822286 (= sp(1) + 1), sp(0) = log 2 = 0.6931471805599453.
"""

from __future__ import annotations

import math

import pytest
import torch

from tulu3.stages.dpo import losses as L

SP1 = 0.31326168751822286  # log(1 + e^-1)
LOG2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_worked_example() -> None:
    # pair 0: policy (-10, -12), reference (-11, -11): h = (-10 + 12) - (-11 + 11) = 2;
    #   beta 0.5 -> beta h = 1 -> loss sp(1);
    #   rewards 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5
    # pair 1: policy (-7, -5), reference (-6, -6): h = -2 -> beta h = -1 -> loss sp(-1) = sp(1) + 1
    out = L.dpo_loss(t(-10, -7), t(-12, -5), t(-11, -6), t(-11, -6), beta=0.5)
    torch.testing.assert_close(out.losses, t(SP1, SP1 + 1.0))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, -0.5))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5, 0.5))


def test_dpo_label_smoothing_worked_example() -> None:
    # cDPO, eps 0.1, beta h = 1: 0.9 sp(1) + 0.1 sp(-1) = 0.9 sp(1) + 0.1 (sp(1) + 1) = sp(1) + 0.1
    out = L.dpo_loss(t(-10), t(-12), t(-11), t(-11), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t(SP1 + 0.1))


def test_dpo_gradient_at_the_reference() -> None:
    # d/dx sp(beta (x - c)) = -beta sigma(-beta (x - c)) = -beta / 2 at x = c
    chosen = t(-3.0).requires_grad_()
    L.dpo_loss(chosen, t(-4.0), t(-3.0), t(-4.0), beta=5.0).losses.sum().backward()
    torch.testing.assert_close(chosen.grad, t(-2.5))


@pytest.mark.parametrize("loss", ["dpo", "dpo_norm"])
def test_policy_equal_to_reference_gives_log2(loss: str) -> None:
    policy = (t(-31.5, -2.25, -70.0), t(-12.0, -9.5, -1.0))
    tokens = (t(7, 3, 20), t(4, 5, 1))
    if loss == "dpo":
        out = L.dpo_loss(*policy, *policy, beta=5.0)
    else:
        out = L.dpo_norm_loss(*policy, *policy, *tokens, beta=5.0)
    torch.testing.assert_close(out.losses, t(LOG2, LOG2, LOG2))
    torch.testing.assert_close(out.chosen_rewards, t(0, 0, 0))


def test_dpo_norm_worked_example() -> None:
    # chosen: policy -6 over 3 tokens = -2, reference -9 / 3 = -3 -> log-ratio +1
    # rejected: policy -12 over 4 tokens = -3, reference -12 / 4 = -3 -> log-ratio 0
    # h = 1, beta 1 -> sp(1); rewards 1 * (+1) and 1 * 0. Unnormalized DPO would see
    # h = (-6 + 12) - (-9 + 12) = 3 instead.
    out = L.dpo_norm_loss(t(-6), t(-12), t(-9), t(-12), t(3), t(4), beta=1.0)
    torch.testing.assert_close(out.losses, t(SP1))
    torch.testing.assert_close(out.chosen_rewards, t(1.0))
    torch.testing.assert_close(out.rejected_rewards, t(0.0))


def test_simpo_worked_example() -> None:
    # means: chosen -4 / 2 = -2, rejected -9 / 3 = -3; beta 2, gamma/beta 0.5 (gamma = 1):
    # beta (mean_w - mean_l) - gamma = 2 * 1 - 1 = 1 -> sp(1); rewards 2 * -2 = -4, 2 * -3 = -6
    out = L.simpo_loss(t(-4), t(-9), t(2), t(3), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(out.losses, t(SP1))
    torch.testing.assert_close(out.chosen_rewards, t(-4.0))
    torch.testing.assert_close(out.rejected_rewards, t(-6.0))
    # the margin makes equal responses cost sp(-gamma) = sp(-1) = sp(1) + 1, not log 2
    same = L.simpo_loss(t(-4), t(-4), t(2), t(2), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(same.losses, t(SP1 + 1.0))


def test_wpo_worked_example() -> None:
    # weight exponents (per-token means of log p - log sum p^2): -0.5 and -1.0 -> exp(-1.5)
    # = 0.22313016014842982; the DPO part is sp(1) as in test_dpo_worked_example:
    # 0.31326168751822286 * 0.22313016014842982 = 0.06989813050430844
    weights = L.wpo_weights(t(-0.5), t(-1.0))
    torch.testing.assert_close(weights, t(math.exp(-1.5)))
    out = L.wpo_loss(t(-10), t(-12), t(-11), t(-11), weights, beta=0.5)
    torch.testing.assert_close(out.losses, t(0.06989813050430844))
    # exponents summing above 0 are clamped to weight 1 (then it is DPO)
    torch.testing.assert_close(L.wpo_weights(t(0.3), t(0.2)), t(1.0))


def test_wpo_weights_are_not_differentiated() -> None:
    chosen = t(-10.0).requires_grad_()
    exponent = t(-0.5).requires_grad_()
    weights = L.wpo_weights(exponent, t(-1.0))
    L.wpo_loss(chosen, t(-12), t(-11), t(-11), weights, beta=0.5).losses.sum().backward()
    assert exponent.grad is None
    # d/dx [w sp(beta h)] = -w beta sigma(-beta h) = -exp(-1.5) * 0.5 * sigma(-1)
    sigma_m1 = 1.0 / (1.0 + math.e)
    torch.testing.assert_close(chosen.grad, t(-math.exp(-1.5) * 0.5 * sigma_m1))


def test_ipo_worked_example() -> None:
    # h = 2 (as in the DPO example); tau = beta = 0.5 -> target 1 / (2 tau) = 1: (2 - 1)^2 = 1
    # h = 3 (chosen -9): (3 - 1)^2 = 4; h = 0 (policy = reference): (0 - 1)^2 = 1
    out = L.ipo_loss(t(-10, -9, -5), t(-12, -12, -5), t(-11, -11, -5), t(-11, -11, -5), beta=0.5)
    torch.testing.assert_close(out.losses, t(1.0, 4.0, 1.0))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 1.0, 0.0))


# --- the registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_every_registered_loss_has_a_worked_example(name: str) -> None:
    """A new loss is one function, one registry entry and one hand-worked test here."""
    assert callable(globals().get(f"test_{name}_worked_example")), \
        f"dpo.loss={name} has no test_{name}_worked_example in {__name__}"


def test_registry_dispatches_to_each_function() -> None:
    """Each entry calls its function with the pair inputs and settings it names (the numbers of
    the worked examples above), and its flags say what the stage must provide."""
    inputs = L.PairInputs(t(-6), t(-12), t(3), t(4), t(-9), t(-12), t(0.25))
    settings = L.LossSettings(beta=1.0, gamma_beta_ratio=0.5, label_smoothing=0.0)
    want = {
        "dpo": L.dpo_loss(t(-6), t(-12), t(-9), t(-12), 1.0),
        "dpo_norm": L.dpo_norm_loss(t(-6), t(-12), t(-9), t(-12), t(3), t(4), 1.0),
        "simpo": L.simpo_loss(t(-6), t(-12), t(3), t(4), 1.0, 0.5),
        "wpo": L.wpo_loss(t(-6), t(-12), t(-9), t(-12), t(0.25), 1.0),
        "ipo": L.ipo_loss(t(-6), t(-12), t(-9), t(-12), 1.0),
    }
    for name, expected in want.items():
        got = L.get_loss(name).compute(inputs, settings)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)
    flags = {name: (s.needs_reference, s.length_normalized, s.weighted, s.label_smoothing)
             for name, s in L.LOSSES.items()}
    assert flags["dpo"] == (True, False, False, True)
    assert flags["dpo_norm"] == (True, True, False, True)
    assert flags["simpo"] == (False, True, False, True)
    assert flags["wpo"] == (True, False, True, True)
    assert flags["ipo"] == (True, False, False, False)


def test_unknown_loss_is_refused_with_the_valid_names() -> None:
    from tulu3.config import ConfigError, load_config

    with pytest.raises(ValueError, match=r"'kto' is not one of \('dpo', 'dpo_norm'"):
        L.get_loss("kto")
    with pytest.raises(ConfigError, match=r"dpo.loss: 'kto' is not one of \('dpo', 'dpo_norm'"):
        load_config(None, ["dpo.loss=kto"])
    for name in L.loss_names():  # every registered name passes config validation
        assert load_config(None, [f"dpo.loss={name}"]).dpo.loss == name
