"""The weighted sum of rewards that stage two maximizes, optionally computed off the sampling thread."""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType

import torch

from rlbooth.memory import offload, on_device
from rlbooth.rewards import (RewardError, backpropagating, build_reward, check_reward_options,
                             import_reward_modules, reward_is_differentiable, reward_parameters, validate_batch)

Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


class CompositeReward:
    """Sum of `weights[name] * reward(name)`, with each raw component kept for logging.

    `options[name]` are keyword options for that reward's factory. `context` holds what the run
    knows (`device`, `dtype`, `subject`); each entry goes to the factories that take it. A reward
    marked `identifier_only` (identity) scores only the prompts that name the subject: elsewhere
    its component is absent (NaN in `components`) and adds nothing to the total. `executor_workers`
    threads compute `submit`ted batches while the caller samples the next one (GPU kernels, PIL
    and ONNX runtime release the GIL); 0 computes them inline, which keeps runs single-threaded.
    The worker threads run torch's CPU ops on one thread each: see `_start_executor`.

    `offload_models` (align.offload_rewards) keeps each reward's `torch_modules` in host memory once built, and
    brings them to the device the reward was built for (its `device` option, else the context's) for each call,
    one reward at a time.
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict] | None = None,
                 executor_workers: int = 0, context: dict[str, object] | None = None,
                 offload_models: bool = False) -> None:
        options, context = options or {}, context or {}
        check_composite(weights, options)
        if executor_workers < 0:
            raise RewardError(f"executor_workers must be >= 0, got {executor_workers}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        kwargs = {name: _accepted(name, context) | options.get(name, {}) for name in weights}
        self.components = {name: build_reward(name, **kwargs[name]) for name in weights}
        self.executor_workers = executor_workers
        self._executor: ThreadPoolExecutor | None = None
        held = {name: list(getattr(reward, "torch_modules", [])) for name, reward in self.components.items()}
        self._offloaded = {name: modules for name, modules in held.items() if offload_models and modules}
        self._devices = {name: str(kwargs[name].get("device", context.get("device", "cpu")))
                         for name in self._offloaded}
        self._moving = threading.Lock()
        for modules in self._offloaded.values():
            offload(modules)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Result:
        """Returns the (B,) float32 total and the raw (B,) score of each component by name."""
        batch = validate_batch(images, prompts, metadata)
        return self._compute(images, prompts, metadata, batch)

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Future[Result]:
        """Same result as calling, as a future; the inputs are copied, so the caller may reuse them."""
        batch = validate_batch(images, prompts, metadata)
        images, prompts, metadata = images.detach().clone(), list(prompts), [dict(m) for m in metadata]
        if self.executor_workers == 0:
            future: Future[Result] = Future()
            try:
                future.set_result(self._compute(images, prompts, metadata, batch))
            except Exception as err:  # delivered through the future, as a worker thread would
                future.set_exception(err)
            return future
        if self._executor is None:
            self._executor = _start_executor(self.executor_workers)
        return self._executor.submit(self._compute, images, prompts, metadata, batch)

    def close(self) -> None:
        """Waits for submitted batches, then stops the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> CompositeReward:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @torch.no_grad()
    def _compute(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], batch: int) -> Result:
        components = {}
        for name, reward in self.components.items():
            rows = self._rows(reward, metadata, batch)
            component = torch.full((batch,), float("nan"))
            if rows:
                with self._placed(name):
                    score = reward(images[rows], [prompts[i] for i in rows], [metadata[i] for i in rows])
                component[rows] = self._checked(name, score, rows, prompts).detach().to("cpu", torch.float32)
            components[name] = component
        return self.total(components), components

    def differentiable_total(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Result:
        """The (B,) weighted total connected to `images` on their device (reward feedback learning), and the
        detached raw components on the CPU as `__call__` gives them; `identifier_only` and absent rows as there."""
        batch = validate_batch(images, prompts, metadata)
        total = torch.zeros(batch, device=images.device)
        components = {}
        with backpropagating():
            for name, reward in self.components.items():
                rows = self._rows(reward, metadata, batch)
                component = torch.full((batch,), float("nan"))
                if rows:
                    with self._placed(name, until_backward=images):
                        score = self._checked(name, reward(images[rows], [prompts[i] for i in rows],
                                                           [metadata[i] for i in rows]), rows, prompts)
                    if not score.requires_grad:
                        raise RewardError(f"reward {name!r} returned scores without a gradient to the images; "
                                          "it is not differentiable: remove it or use align.algorithm ppo or nft")
                    index = torch.tensor(rows, device=images.device)
                    total = total.index_add(0, index, self.weights[name] * score.to(images.device, torch.float32))
                    component[rows] = score.detach().to("cpu", torch.float32)
                components[name] = component
        return total, components

    @contextmanager
    def _placed(self, name: str, until_backward: torch.Tensor | None = None) -> Iterator[None]:
        """Reward `name`'s offloaded modules on its device for a call, then back in host memory; with
        `until_backward`, once the backward pass has reached those images (a tensor hook): autograd keeps some
        weights by reference, and moving them before would leave the backward pass with host copies."""
        modules = self._offloaded.get(name)
        if not modules:
            yield
            return
        if until_backward is None or not until_backward.requires_grad:
            with self._moving, on_device(modules, self._devices[name]):
                yield
            return
        with self._moving:
            for module in modules:
                module.to(self._devices[name])
        try:
            yield
        except BaseException:
            self._offload(modules)
            raise
        until_backward.register_hook(lambda grad: self._offload(modules))

    def _offload(self, modules: list[torch.nn.Module]) -> None:
        with self._moving:
            offload(modules)

    @staticmethod
    def _rows(reward: object, metadata: list[dict], batch: int) -> list[int]:
        """The rows a reward scores: all, or for `identifier_only` those whose prompt names the subject."""
        if getattr(reward, "identifier_only", False):
            return [i for i, m in enumerate(metadata) if m.get("with_identifier", True)]
        return list(range(batch))

    @staticmethod
    def _checked(name: str, score: object, rows: list[int], prompts: list[str]) -> torch.Tensor:
        """A component's scores, checked for shape and finiteness."""
        if not isinstance(score, torch.Tensor) or score.shape != (len(rows),):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise RewardError(f"reward {name!r} returned {got} for {len(rows)} images; "
                              f"expected shape ({len(rows)},)")
        bad = (~torch.isfinite(score.detach())).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward {name!r} returned non-finite values {score.detach()[bad].tolist()} for "
                              f"{len(bad)} of {len(rows)} images, first prompt: {prompts[rows[bad[0]]]!r}")
        return score

    def total(self, components: dict[str, torch.Tensor],
              standardize: dict[str, tuple[float, float]] | None = None) -> torch.Tensor:
        """Weighted sum of the present components; `standardize[name] = (mean, std)` rescales one first."""
        standardize = standardize or {}
        total = torch.zeros_like(next(iter(components.values())))
        for name, values in components.items():
            if name in standardize:
                mean, std = standardize[name]
                values = (values - mean) / (std + 1e-8)
            total += self.weights[name] * torch.nan_to_num(values, nan=0.0)  # NaN: absent for this prompt
        return total

    def log_stats(self) -> dict[str, float]:
        """Counters the components keep (e.g. images where no face was found), reset on read."""
        stats: dict[str, float] = {}
        for reward in self.components.values():
            stats.update(getattr(reward, "log_stats", dict)())
        return stats


def check_composite(weights: dict[str, float], options: dict[str, dict], modules: list[str] = (),
                    differentiable: bool = False) -> None:
    """Everything about a composite reward that can be checked without building it: run before any model loads.

    Imports the user's reward `modules` first (their rewards must be registered to be checked), then checks
    the weights, that options go to weighted rewards, and each reward's name, option names and option types;
    with `differentiable` (align.algorithm refl), that every weighted reward backpropagates.
    """
    import_reward_modules(list(modules))
    if not weights:
        raise RewardError("the composite reward needs at least one weighted reward")
    unused = sorted(set(options) - set(weights))
    if unused:
        raise RewardError(f"options given for rewards {unused} that have no weight; "
                          f"weighted rewards: {sorted(weights)}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardError(f"weight of reward {name!r} must be a finite number, got {weight!r}")
        if not isinstance(options.get(name, {}), dict):
            raise RewardError(f"align.reward_options.{name}: expected a mapping of option: value, "
                              f"got {options[name]!r}")
        check_reward_options(name, options.get(name, {}))
    if differentiable:
        check_differentiable(weights, options)


def check_differentiable(weights: dict[str, float], options: dict[str, dict]) -> None:
    """Reward feedback learning backpropagates through every weighted reward: name those that cannot."""
    blocked = [name for name in weights if not reward_is_differentiable(name, options.get(name, {}))]
    if blocked:
        raise RewardError(f"align.algorithm=refl backpropagates through the rewards, and {', '.join(map(repr, blocked))} "
                          f"{'is' if len(blocked) == 1 else 'are'} not differentiable: remove "
                          f"{'it' if len(blocked) == 1 else 'them'} from align.reward, or use align.algorithm ppo "
                          "or nft, which need only the rewards' values")


def _start_executor(workers: int) -> ThreadPoolExecutor:
    """Worker threads whose torch CPU ops run on one thread, leaving the caller's thread count as it was.

    A thread that runs a parallel torch op gets an OpenMP pool of its own; with more pool threads than
    cores, libgomp stops spinning between parallel regions, and the caller's small ops (a tiny UNet's
    matmuls) got 2-5x slower for as long as the worker lived. One thread per worker makes no pool.
    `torch.set_num_threads` also sets the default that a thread takes at its first torch call, so the
    caller's and the workers' counts are fixed first and the default is put back once all have started.
    """
    caller_threads = torch.get_num_threads()  # pins this thread's count before a worker changes the default
    started = threading.Barrier(workers + 1)

    def single_threaded() -> None:
        torch.get_num_threads()  # torch sets a thread's count up on its first use, from the default: do it now
        torch.set_num_threads(1)
        started.wait()

    executor = ThreadPoolExecutor(workers, thread_name_prefix="rlbooth-reward", initializer=single_threaded)
    for _ in range(workers):  # threads start on demand: one no-op task each, each blocked until all started
        executor.submit(lambda: None)
    started.wait()
    torch.set_num_threads(caller_threads)
    return executor


def _accepted(name: str, context: dict[str, object]) -> dict[str, object]:
    """The context entries that reward `name`'s factory takes as keyword options."""
    parameters = reward_parameters(name)
    return {key: value for key, value in context.items() if key in parameters}
