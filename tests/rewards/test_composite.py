import threading

import pytest
import torch

import rlbooth.rewards as rewards
from rlbooth.rewards import CompositeReward, RewardError, build_reward, register

PROMPTS = ["a dog", "a cat", "a dog on the moon", "a cat swimming"]
METADATA = [{"with_identifier": i % 2 == 0} for i in range(4)]


def batch() -> torch.Tensor:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images[1] = 0.5
    return images


@pytest.fixture
def broken_rewards():
    """Test-only rewards that break the output contract, removed from the registry afterwards."""
    names = ["test_nan", "test_inf", "test_wrong_shape"]

    @register("test_nan")
    def nan():
        return lambda images, prompts, metadata: torch.tensor([0.0, float("nan"), 1.0, 2.0])

    @register("test_inf")
    def inf():
        return lambda images, prompts, metadata: torch.tensor([float("inf"), 0.0, 1.0, 2.0])

    @register("test_wrong_shape")
    def wrong_shape():
        return lambda images, prompts, metadata: torch.zeros(4, 1)

    yield names
    for name in names:
        rewards._REGISTRY.pop(name)


def test_weighted_sum_and_components():
    images = batch()
    weights = {"brightness": 2.0, "saturation": -0.5, "jpeg_compressibility": 0.01}
    composite = CompositeReward(weights, options={"jpeg_compressibility": {"quality": 80}})
    total, components = composite(images, PROMPTS, METADATA)

    expected = {
        "brightness": build_reward("brightness")(images, PROMPTS, METADATA),
        "saturation": build_reward("saturation")(images, PROMPTS, METADATA),
        "jpeg_compressibility": build_reward("jpeg_compressibility", quality=80)(images, PROMPTS, METADATA),
    }
    assert list(components) == list(weights)
    for name in weights:
        torch.testing.assert_close(components[name], expected[name], rtol=0, atol=0)
    hand = (2.0 * expected["brightness"] - 0.5 * expected["saturation"]
            + 0.01 * expected["jpeg_compressibility"])
    assert total.shape == (4,) and total.dtype == torch.float32 and total.device.type == "cpu"
    torch.testing.assert_close(total, hand)
    assert not total.requires_grad


def test_no_grad_with_grad_input():
    total, components = CompositeReward({"brightness": 1.0})(batch().requires_grad_(True), PROMPTS, METADATA)
    assert not total.requires_grad and not components["brightness"].requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {}}, "at least one"),
    ({"weights": {"brightnes": 1.0}}, "unknown reward 'brightnes'"),
    ({"weights": {"brightness": float("nan")}}, "weight of reward 'brightness'"),
    ({"weights": {"brightness": 1.0}, "options": {"saturation": {}}}, r"options given .*\['saturation'\]"),
    ({"weights": {"brightness": 1.0}, "executor_workers": -1}, "executor_workers"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(RewardError, match=message):
        CompositeReward(**kwargs)


@pytest.mark.parametrize("name, message", [
    ("test_nan", r"'test_nan' returned non-finite .*'a cat'"),
    ("test_inf", r"'test_inf' returned non-finite .*'a dog'"),
    ("test_wrong_shape", r"'test_wrong_shape' returned \(4, 1\)"),
])
def test_misbehaving_component_is_named(broken_rewards, name, message):
    composite = CompositeReward({"brightness": 1.0, name: 1.0})
    with pytest.raises(RewardError, match=message):
        composite(batch(), PROMPTS, METADATA)
    with pytest.raises(RewardError, match=message):
        composite.submit(batch(), PROMPTS, METADATA).result()


@pytest.mark.parametrize("workers", [0, 1])
def test_submit_equals_direct_call(workers):
    images = batch()
    weights = {"brightness": 1.0, "jpeg_incompressibility": 0.1}
    with CompositeReward(weights, executor_workers=workers) as composite:
        direct_total, direct_components = composite(images, PROMPTS, METADATA)
        future = composite.submit(images, PROMPTS, METADATA)
        images.zero_()  # the caller reuses its buffer while the reward is computed
        total, components = future.result(timeout=30)
    torch.testing.assert_close(total, direct_total, rtol=0, atol=0)
    assert components.keys() == direct_components.keys()
    for name in components:
        torch.testing.assert_close(components[name], direct_components[name], rtol=0, atol=0)
    assert composite._executor is None


def test_submit_runs_in_a_worker_thread():
    seen = []

    @register("test_thread")
    def record_thread():
        def reward(images, prompts, metadata):
            seen.append(threading.current_thread())
            return torch.zeros(len(prompts))
        return reward

    try:
        with CompositeReward({"test_thread": 1.0}, executor_workers=1) as composite:
            composite.submit(batch(), PROMPTS, METADATA).result(timeout=30)
            composite.submit(batch(), PROMPTS, METADATA).result(timeout=30)
    finally:
        rewards._REGISTRY.pop("test_thread")
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0] is not threading.main_thread()


def test_submit_rejects_bad_batch_at_the_call_site():
    with CompositeReward({"brightness": 1.0}, executor_workers=1) as composite:
        with pytest.raises(RewardError, match="4 images, 3 prompts"):
            composite.submit(batch(), PROMPTS[:3], METADATA)


@pytest.fixture
def context_rewards():
    """An identity-like reward (identifier prompts only, takes the run's context) and a plain one."""
    calls: dict[str, object] = {}

    @register("test_identity")
    def identity(device: str = "cpu", subject: object = None):
        calls["factory"] = {"device": device, "subject": subject}

        def reward(images, prompts, metadata):
            calls["prompts"] = list(prompts)
            return torch.full((len(prompts),), 10.0)

        reward.identifier_only = True
        return reward

    @register("test_plain")
    def plain():
        return lambda images, prompts, metadata: torch.ones(len(prompts))

    yield calls
    for name in ("test_identity", "test_plain"):
        rewards._REGISTRY.pop(name)


def test_identifier_only_component_is_absent_elsewhere_and_context_reaches_who_takes_it(context_rewards):
    composite = CompositeReward({"test_identity": 0.5, "test_plain": 2.0},
                                context={"device": "meta-device", "subject": "the-subject", "dtype": "float16"})
    assert context_rewards["factory"] == {"device": "meta-device", "subject": "the-subject"}
    total, components = composite(batch(), PROMPTS, METADATA)
    assert context_rewards["prompts"] == [PROMPTS[0], PROMPTS[2]]  # only the prompts with the identifier
    identity = components["test_identity"]
    assert identity[[0, 2]].tolist() == [10.0, 10.0] and identity[[1, 3]].isnan().all()
    assert total.tolist() == [0.5 * 10 + 2.0, 2.0, 0.5 * 10 + 2.0, 2.0]


def test_identifier_only_reward_is_not_called_without_identifier_prompts(context_rewards):
    composite = CompositeReward({"test_identity": 1.0, "test_plain": 1.0})
    total, components = composite(batch(), PROMPTS, [{"with_identifier": False}] * 4)
    assert "prompts" not in context_rewards and components["test_identity"].isnan().all()
    assert total.tolist() == [1.0] * 4


def test_total_standardizes_the_chosen_components_and_skips_absent_ones():
    composite = CompositeReward({"brightness": 2.0, "saturation": 0.5})
    components = {"brightness": torch.tensor([1.0, 3.0, float("nan")]), "saturation": torch.tensor([4.0, 0.0, 2.0])}
    total = composite.total(components, {"brightness": (2.0, 1.0)})
    # brightness -> (x - 2) / 1 = [-1, 1, absent]; saturation raw
    assert torch.allclose(total, torch.tensor([2.0 * -1 + 0.5 * 4, 2.0 * 1 + 0.5 * 0, 0.5 * 2]))
    assert torch.allclose(composite.total(components), torch.tensor([2.0 + 2.0, 6.0, 1.0]))


def test_worker_thread_runs_torch_on_one_thread_and_leaves_the_callers_count():
    """A worker with a parallel OpenMP pool of its own made the caller's small ops 2-5x slower (issue 20)."""
    seen = []

    @register("test_threads")
    def record_threads():
        def reward(images, prompts, metadata):
            seen.append(torch.get_num_threads())
            return images.mean(dim=(1, 2, 3))
        return reward

    caller = torch.get_num_threads()
    torch.set_num_threads(2)  # so that a worker left at the default would run two
    late = []
    try:
        with CompositeReward({"test_threads": 1.0}, executor_workers=1) as composite:
            composite.submit(batch(), PROMPTS, METADATA).result(timeout=30)
            assert torch.get_num_threads() == 2
            thread = threading.Thread(target=lambda: late.append(torch.get_num_threads()))
            thread.start()
            thread.join()
    finally:
        rewards._REGISTRY.pop("test_threads")
        torch.set_num_threads(caller)
    assert seen == [1]
    assert late == [2], "threads started later must get the caller's default, not the worker's single thread"
