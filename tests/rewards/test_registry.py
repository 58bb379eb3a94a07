import pytest
import torch

import rlbooth.rewards as rewards
from rlbooth.errors import RlboothError
from rlbooth.rewards import RewardError, available_rewards, build_reward, register

WEIGHT_FREE = ["brightness", "jpeg_compressibility", "jpeg_incompressibility", "saturation"]


@pytest.fixture
def temporary_reward():
    """Registers `half` (images' brightness halved) and removes it again."""

    @register("test_half")
    def half(scale: float = 0.5):
        return lambda images, prompts, metadata: scale * images.float().mean(dim=(1, 2, 3)).cpu()

    yield "test_half"
    rewards._REGISTRY.pop("test_half")


def test_weight_free_rewards_are_registered_on_import():
    assert set(WEIGHT_FREE) <= set(available_rewards())
    assert available_rewards() == sorted(available_rewards())


def test_register_and_build_round_trip(temporary_reward):
    assert temporary_reward in available_rewards()
    reward = build_reward(temporary_reward, scale=2.0)
    assert reward(torch.ones(2, 3, 4, 4), ["a", "b"], [{}, {}]).tolist() == [2.0, 2.0]


def test_unknown_name_lists_known_rewards():
    with pytest.raises(RewardError, match="unknown reward 'brightnes'") as info:
        build_reward("brightnes")
    for name in WEIGHT_FREE:
        assert name in str(info.value)
    assert isinstance(info.value, RlboothError) and isinstance(info.value, ValueError)


def test_unknown_option_names_reward_and_accepted_options():
    with pytest.raises(RewardError, match=r"'jpeg_compressibility'.*qualty.*accepts: quality"):
        build_reward("jpeg_compressibility", qualty=90)


def test_bad_option_value_is_a_reward_error():
    with pytest.raises(RewardError, match="quality"):
        build_reward("jpeg_incompressibility", quality=0)


def test_name_clash_is_refused(temporary_reward):
    with pytest.raises(RewardError, match="already registered"):
        register(temporary_reward)(lambda: None)
