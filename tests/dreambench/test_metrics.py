"""DreamBench metric functions against hand-computed values, and the ImageReward / PickScore wiring."""

from __future__ import annotations

import math

import pytest
import torch

from rlbooth.dreambench import metrics
from rlbooth.dreambench.metrics import (
    MetricOptions,
    MetricSuite,
    pairwise_mean_cosine,
    strip_identifier,
)


def test_identical_embeddings_score_one():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    assert pairwise_mean_cosine(x[:1], x[:1]) == pytest.approx(1.0)
    assert pairwise_mean_cosine(x[:1], 3 * x[:1]) == pytest.approx(1.0)  # scale does not matter


def test_orthogonal_embeddings_score_zero():
    assert pairwise_mean_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])) == pytest.approx(0.0)
    assert pairwise_mean_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])) == pytest.approx(-1.0)


def test_pairwise_average_over_generated_times_real():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cosines: g0 -> (1, 0, 1/sqrt2), g1 -> (0, 1, 1/sqrt2); mean of the 6 = (2 + 2/sqrt2) / 6
    expected = (2 + 2 / math.sqrt(2)) / 6
    assert pairwise_mean_cosine(generated, real) == pytest.approx(expected)
    # not the cosine of the means (which would be 1 here)
    assert expected < 0.99
    # per-image rows (as scores.csv stores them) average to the same number
    per_image = metrics.cosine_matrix(generated, real).mean(1)
    assert float(per_image.mean()) == pytest.approx(expected)


def test_pairwise_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pairwise_mean_cosine(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        pairwise_mean_cosine(torch.ones(0, 3), torch.ones(2, 3))


@pytest.mark.parametrize("prompt, identifier, expected", [
    ("a sks dog", "sks", "a dog"),
    ("a sks dog in the jungle", "sks", "a dog in the jungle"),
    ("sks dog", "sks", "dog"),
    ("a red sks backpack on top of a purple rug", "sks", "a red backpack on top of a purple rug"),
    ("a sksy dog", "sks", "a sksy dog"),  # only the whole word
    ("a <xyz> toy  wearing a hat", "<xyz>", "a toy wearing a hat"),
    ("a dog", "", "a dog"),
])
def test_strip_identifier(prompt: str, identifier: str, expected: str):
    assert strip_identifier(prompt, identifier) == expected


def test_image_reward_and_pickscore_go_through_build_reward(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_build_reward(name: str, **options):
        calls.append((name, options))
        return lambda images, prompts, metadata: torch.full((len(prompts),), 0.5 if name == "pickscore" else -1.0)

    import rlbooth.rewards

    monkeypatch.setattr(rlbooth.rewards, "build_reward", fake_build_reward)
    options = MetricOptions(image_reward_checkpoint="/ir.pt", pickscore_model="/ps", pickscore_processor="/proc")
    suite = MetricSuite(["image_reward", "pickscore"], options)
    scores = suite.score(torch.rand(2, 3, 8, 8), ["a dog", "a cat"], suite.reference([]))
    assert scores == {"image_reward": [-1.0, -1.0], "pickscore": [0.5, 0.5]}
    assert calls == [("image_reward", {"checkpoint": "/ir.pt", "tokenizer": "bert-base-uncased", "device": "cpu"}),
                     ("pickscore", {"model": "/ps", "processor": "/proc", "device": "cpu"})]
    suite.score(torch.rand(1, 3, 8, 8), ["a dog"], {})
    assert len(calls) == 2  # built once


def test_metric_options_match_the_reward_factories():
    from rlbooth.rewards import reward_parameters

    for metric in ("image_reward", "pickscore"):
        assert set(MetricOptions().reward_options(metric)) <= set(reward_parameters(metric))
