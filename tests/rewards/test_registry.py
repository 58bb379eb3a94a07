import sys

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


def fake_plugin(tmp_path, monkeypatch, module: str, source: str) -> None:
    """A distribution on sys.path whose entry point `rlbooth.rewards` names `module`, written from `source`."""
    (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rlbooth.rewards]\n{module.split('_')[0]} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(rewards, "_plugins_loaded", False)


def test_an_installed_package_registers_rewards_through_the_entry_point_group(tmp_path, monkeypatch):
    """A distribution that declares its module in the group is imported on first use, like rlbooth's own."""
    fake_plugin(tmp_path, monkeypatch, "plugin_rewards_for_test",
                "from rlbooth.rewards import register\n\n"
                "@register('test_plugin_darkness')\n"
                "def darkness():\n"
                "    return lambda images, prompts, metadata: 1 - images.float().mean(dim=(1, 2, 3)).cpu()\n")
    try:
        assert "test_plugin_darkness" in available_rewards()
        assert set(WEIGHT_FREE) <= set(available_rewards())
        reward = build_reward("test_plugin_darkness")
        assert reward(torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}]).tolist() == [1.0, 1.0]
    finally:
        rewards._REGISTRY.pop("test_plugin_darkness", None)
        sys.modules.pop("plugin_rewards_for_test", None)


def test_a_broken_plugin_is_named(tmp_path, monkeypatch):
    fake_plugin(tmp_path, monkeypatch, "broken_rewards_for_test", "raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match=r"reward plugin 'broken' \(broken_rewards_for_test.*RuntimeError: boom"):
        available_rewards()
