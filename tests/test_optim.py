"""runtime.optimizer_impl: every AdamW implementation takes the same step, and both stages build the one asked for."""

from __future__ import annotations

import pytest
import torch

from rlbooth.config import PersonalizeConfig, load_config
from rlbooth.optim import IMPL_FLAGS, adamw
from rlbooth.personalize.train import make_optimizer


def trained(impl: str, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((8, 4), (4,), (3, 3, 2))]
    optimizer = adamw(params, impl, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("impl", ["auto", "foreach", "fused"])
def test_every_implementation_takes_the_for_loops_step(impl: str) -> None:
    reference, params = trained("for-loop"), trained(impl)
    start = trained("for-loop", steps=0)
    assert not torch.equal(reference[0], start[0])  # the steps moved the weights
    for got, want in zip(params, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["auto", *sorted(IMPL_FLAGS)])
def test_stage_one_builds_the_implementation_asked_for(impl: str) -> None:
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], PersonalizeConfig(), impl)
    torch_default = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).defaults
    flags = ("foreach", "fused")
    asked = {"fused": True} if impl == "auto" else IMPL_FLAGS[impl]  # `auto` on CPU float parameters: fused
    want = {k: asked.get(k, torch_default[k]) for k in flags}
    assert {k: optimizer.defaults[k] for k in flags} == want


@pytest.mark.parametrize("device, dtype, fused", [("cpu", torch.float32, True), ("cuda", torch.bfloat16, True),
                                                  ("meta", torch.float32, False), ("cpu", torch.int64, False)])
def test_auto_is_fused_only_where_torch_has_the_kernel(device: str, dtype: torch.dtype, fused: bool) -> None:
    from rlbooth.optim import auto_flags

    class Stand:  # a parameter's device and dtype, without needing the device
        def __init__(self) -> None:
            self.device = torch.device(device)

        def is_floating_point(self) -> bool:
            return dtype.is_floating_point

    assert auto_flags([Stand(), Stand()]) == ({"fused": True} if fused else {})
    assert auto_flags([]) == {}


def test_unknown_implementation_is_refused_with_the_field_name() -> None:
    from rlbooth.config import ConfigError

    with pytest.raises(ConfigError, match="runtime.optimizer_impl"):
        load_config("tiny", ["runtime.optimizer_impl=apex"])
