"""The DreamBooth loss: which half is which, and Min-SNR weights on the instance half only."""

import pytest
import torch

from rlbooth.personalize.loss import compute_snr, dreambooth_loss, min_snr_weights


def halves(instance_err: float, prior_err: float, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(2 * b, 4, 2, 2)
    pred = torch.cat([torch.full((b, 4, 2, 2), instance_err), torch.full((b, 4, 2, 2), prior_err)])
    return pred, target


@pytest.mark.parametrize("instance_err, prior_err, weight, expected", [
    (1.0, 0.0, 1.0, {"instance_loss": 1.0, "prior_loss": 0.0, "loss": 1.0}),
    (0.0, 2.0, 1.0, {"instance_loss": 0.0, "prior_loss": 4.0, "loss": 4.0}),
    (1.0, 2.0, 0.5, {"instance_loss": 1.0, "prior_loss": 4.0, "loss": 3.0}),
])
def test_prior_preservation_uses_first_half_for_instance(instance_err, prior_err, weight, expected):
    pred, target = halves(instance_err, prior_err)
    loss, parts = dreambooth_loss(pred, target, torch.zeros(4, dtype=torch.long), with_prior=True,
                                  prior_loss_weight=weight)
    assert loss.item() == pytest.approx(expected["loss"])
    assert parts["instance_loss"].item() == pytest.approx(expected["instance_loss"])
    assert parts["prior_loss"].item() == pytest.approx(expected["prior_loss"])


def test_without_prior_the_whole_batch_is_instance():
    pred, target = halves(1.0, 3.0)
    loss, parts = dreambooth_loss(pred, target, torch.zeros(4, dtype=torch.long), with_prior=False,
                                  prior_loss_weight=1.0)
    assert loss.item() == pytest.approx((1.0 + 9.0) / 2)
    assert set(parts) == {"instance_loss"}


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_only_the_instance_loss(prediction_type):
    """Instance rows weighted with their own timesteps; the prior loss stays plain MSE, as diffusers does it."""
    alphas = sd_alphas_cumprod()
    # instance rows at t=10 and 900; class rows at t=10 (high SNR: a weighted prior loss would be << 1)
    timesteps = torch.tensor([10, 900, 10, 10])
    pred, target = halves(1.0, 1.0)
    gamma = 5.0
    loss, parts = dreambooth_loss(pred, target, timesteps, with_prior=True, prior_loss_weight=0.5,
                                  snr_gamma=gamma, alphas_cumprod=alphas, prediction_type=prediction_type)
    w = min_snr_weights(compute_snr(alphas, timesteps), gamma, prediction_type)
    assert w[2:].max() < 0.5  # so the assertion on the prior loss below tells weighted from unweighted
    assert parts["instance_loss"].item() == pytest.approx(w[:2].mean().item(), rel=1e-5)
    assert parts["prior_loss"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(w[:2].mean().item() + 0.5, rel=1e-5)


def test_min_snr_weight_values():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_min_snr_needs_alphas():
    pred, target = halves(1.0, 1.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dreambooth_loss(pred, target, torch.zeros(4, dtype=torch.long), with_prior=True, prior_loss_weight=1.0,
                        snr_gamma=5.0)
