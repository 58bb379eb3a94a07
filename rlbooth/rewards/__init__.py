"""Rewards for stage two, behind one signature and an explicit registry.

A reward module registers factories with `@register(name)`; a config names a reward and its
options, and `build_reward` builds it. Reward modules come in two ways, and rlbooth's own use the
first: a package declares them in the entry-point group `rlbooth.rewards` (setup.cfg lists the
built-in ones), and the registry imports them on first use; or a config names them in
`align.reward_modules` (a module name or a `.py` file), imported by `import_reward_modules`.
Factories of model-based rewards import their heavy dependencies (transformers, insightface)
inside the factory body, so importing a reward module stays cheap.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, Union

import torch

from rlbooth.config import type_name
from rlbooth.errors import RlboothError


class RewardError(RlboothError, ValueError):
    """A reward cannot be built or misbehaved; the message names the reward."""


class RewardFn(Protocol):
    """Scores a batch of decoded samples; higher is better.

    `images` is (B, 3, H, W), float in [0, 1], on any device; `prompts` and `metadata` hold one
    entry per image (metadata carries what a reward may need beyond the prompt, such as whether
    the prompt names the subject's identifier). Returns (B,) float32 on the CPU, without
    gradients: rewards are constants to the policy gradient.

    A reward registered with `differentiable=True` also backpropagates: called inside
    `backpropagating()` with images that require grad (`backpropagates(images)`), it returns (B,)
    float32 on the images' device, connected to them (torch ops only: no PIL, numpy or ONNX on that
    path). Reward feedback learning (`align.algorithm: refl`) needs every weighted reward to be so.
    Any other call, images that require grad included, gets the detached CPU scores above.

    A reward that holds torch models lists them in `torch_modules` (a list of `torch.nn.Module`, an
    attribute of the callable); with `align.offload_rewards` they wait in host memory and come to the
    reward's device for each call (`CompositeReward`), so such a reward sends its inputs to wherever its
    modules are at call time rather than to a device it noted when built.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor: ...


Factory = TypeVar("Factory", bound=Callable[..., RewardFn])

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}
_DIFFERENTIABLE: dict[str, bool | Callable[[dict[str, Any]], bool]] = {}
ENTRY_POINT_GROUP = "rlbooth.rewards"
"""Entry-point group of reward modules: `name = package.module`; importing the module registers its rewards."""
_plugins_loaded = False


def load_reward_plugins() -> None:
    """Imports every module of the `rlbooth.rewards` entry-point group once (rlbooth's own rewards among them)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if not any(ep.value.startswith("rlbooth.") for ep in found):
        raise RewardError(f"no rlbooth rewards in the entry-point group {ENTRY_POINT_GROUP!r}: the installed "
                          "metadata predates them; reinstall rlbooth (`pip install -e .` in a checkout)")
    for ep in found:
        try:
            ep.load()
        except RewardError:
            raise
        except Exception as err:  # a broken plugin: name it, not a bare import traceback
            raise RewardError(f"reward plugin {ep.name!r} ({ep.value}, entry-point group {ENTRY_POINT_GROUP!r}) "
                              f"failed to import: {type(err).__name__}: {err}") from err
    _plugins_loaded = True


def import_reward_modules(modules: list[str]) -> None:
    """Imports the user's reward modules so their `@register` calls run.

    Each is a module name importable from sys.path (`my_rewards`, `mypkg.rewards`) or a path to a `.py`
    file (relative to the current directory), loaded under its file name's stem.
    """
    for module in modules:
        if module.endswith(".py") or "/" in module or "\\" in module:
            path = Path(module).expanduser()
            if not path.is_file():
                raise RewardError(f"align.reward_modules: file {module!r} not found (from {Path.cwd()})")
            name = path.stem
            if getattr(sys.modules.get(name), "__file__", None) == str(path.resolve()):
                continue
            spec = importlib.util.spec_from_file_location(name, path.resolve())
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            try:
                spec.loader.exec_module(loaded)
            except Exception:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module.split(".")[0] and err.name != module:
                    raise
                raise RewardError(f"align.reward_modules: module {module!r} not found on the Python path; "
                                  "give a path to its .py file instead (e.g. ./my_rewards.py)") from None


def register(name: str, *, differentiable: bool | Callable[[dict[str, Any]], bool] = False
             ) -> Callable[[Factory], Factory]:
    """Names a factory `(**options) -> RewardFn` so configs can ask for it.

    `differentiable` says whether the rewards it builds backpropagate to the images (see `RewardFn`);
    a callable decides from the reward's options, for a reward whose backend decides it.
    """

    def decorator(factory: Factory) -> Factory:
        known = _REGISTRY.get(name)
        # A reloaded module registers a new object for the same function; anything else is a clash.
        if known is not None and _origin(known) != _origin(factory):
            raise RewardError(f"reward {name!r} is already registered by {_origin(known)}")
        _REGISTRY[name] = factory
        _DIFFERENTIABLE[name] = differentiable
        return factory

    return decorator


def _origin(factory: Callable[..., RewardFn]) -> str:
    return f"{factory.__module__}.{factory.__qualname__}"


def available_rewards() -> list[str]:
    load_reward_plugins()
    return sorted(_REGISTRY)


def reward_is_differentiable(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether reward `name` with `options` backpropagates to the images; known before anything is built."""
    load_reward_plugins()
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    flag = _DIFFERENTIABLE.get(name, False)
    return bool(flag(dict(options or {}))) if callable(flag) else bool(flag)


def reward_parameters(name: str) -> list[str]:
    """The option names reward `name`'s factory takes (empty for an unknown name)."""
    load_reward_plugins()
    factory = _REGISTRY.get(name)
    return list(inspect.signature(factory).parameters) if factory is not None else []


def check_reward_options(name: str, options: dict[str, object]) -> None:
    """Checks a reward's name, its options' names and their types against the factory's signature.

    Cheap (nothing is built), so it runs before any model loads; a typo is a user error, not a traceback.
    """
    load_reward_plugins()
    factory = _REGISTRY.get(name)
    if factory is None:
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    signature = inspect.signature(factory)
    accepted = ", ".join(signature.parameters) or "none"
    try:
        signature.bind(**options)
    except TypeError as err:
        raise RewardError(f"bad options for reward {name!r}: {err}; it accepts: {accepted}") from None
    for option, value in options.items():
        annotation = _annotation(factory, signature.parameters[option])
        if annotation is not None and not _matches(value, annotation):
            raise RewardError(f"bad option {option!r} for reward {name!r}: expected "
                              f"{type_name(annotation)}, got {type(value).__name__} {value!r}")


def _annotation(factory: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    """A parameter's annotation as a type (string annotations evaluated); None when unknown."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, getattr(factory, "__globals__", {}))  # noqa: S307 (the factory's own source)
        except Exception:  # a name imported only for type checking: the factory checks the value itself
            return None
    return annotation


def _matches(value: object, tp: Any) -> bool:
    """Whether a YAML value fits an annotation; types it cannot judge are let through to the factory."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Path:
        return isinstance(value, (str, Path))
    check = origin or tp
    return isinstance(value, check) if isinstance(check, type) else True


def build_reward(name: str, **options: object) -> RewardFn:
    """Builds a registered reward; a typo in its name or options is a user error, not a traceback."""
    check_reward_options(name, options)
    return _REGISTRY[name](**options)


def validate_batch(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> int:
    """Checks the `RewardFn` input contract and returns the batch size.

    Images in [-1, 1] (a VAE's raw output) would otherwise be scored silently and wrongly.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"reward images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward images must be float in [0, 1], got {images.dtype}")
    batch = images.shape[0]
    if len(prompts) != batch or len(metadata) != batch:
        raise RewardError(f"reward got {batch} images, {len(prompts)} prompts and {len(metadata)} "
                          "metadata entries; give one of each per image")
    with torch.no_grad():
        if batch and not bool(((images >= 0) & (images <= 1)).all()):
            raise RewardError(f"reward images must lie in [0, 1], got values in [{images.min().item():.3g}, "
                              f"{images.max().item():.3g}]; decode with (x / 2 + 0.5).clamp(0, 1)")
    return batch


_BACKPROPAGATING: contextvars.ContextVar[bool] = contextvars.ContextVar("rlbooth_backpropagating", default=False)


@contextmanager
def backpropagating() -> Iterator[None]:
    """Grad mode, and rewards told that this call backpropagates (`CompositeReward.differentiable_total`): outside
    it a reward's scores stay detached on the CPU even for images that require grad, as scoring samples wants."""
    token = _BACKPROPAGATING.set(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        _BACKPROPAGATING.reset(token)


def backpropagates(images: torch.Tensor) -> bool:
    """Whether a reward call is differentiable: inside `backpropagating()`, grad mode on, images that require grad."""
    return _BACKPROPAGATING.get() and torch.is_grad_enabled() and images.requires_grad


def reward_output(scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A torch reward's (B,) scores as `RewardFn` returns them: connected to `images` on their device in a
    differentiable call (`backpropagates`), else detached on the CPU."""
    return scores if backpropagates(images) else scores.detach().cpu()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Images at float32 or wider: half precision computes in float32, float64 stays (finite-difference checks)."""
    return images.to(torch.promote_types(images.dtype, torch.float32))


from rlbooth.rewards.composite import CompositeReward  # noqa: E402

__all__ = [
    "CompositeReward",
    "RewardError",
    "RewardFn",
    "as_float",
    "available_rewards",
    "backpropagates",
    "backpropagating",
    "build_reward",
    "check_reward_options",
    "import_reward_modules",
    "load_reward_plugins",
    "register",
    "reward_output",
    "reward_is_differentiable",
    "validate_batch",
]
