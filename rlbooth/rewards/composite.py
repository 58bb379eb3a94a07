"""The weighted sum of rewards that stage two maximizes, optionally computed off the sampling thread."""

from __future__ import annotations

import math
import numbers
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

from rlbooth.rewards import (RewardError, build_reward, check_reward_options, import_reward_modules,
                             reward_parameters, validate_batch)

Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


class CompositeReward:
    """Sum of `weights[name] * reward(name)`, with each raw component kept for logging.

    `options[name]` are keyword options for that reward's factory. `context` holds what the run
    knows (`device`, `dtype`, `subject`); each entry goes to the factories that take it. A reward
    marked `identifier_only` (identity) scores only the prompts that name the subject: elsewhere
    its component is absent (NaN in `components`) and adds nothing to the total. `executor_workers`
    threads compute `submit`ted batches while the caller samples the next one (GPU kernels, PIL
    and ONNX runtime release the GIL); 0 computes them inline, which keeps runs single-threaded.
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict] | None = None,
                 executor_workers: int = 0, context: dict[str, object] | None = None) -> None:
        options = options or {}
        check_composite(weights, options)
        if executor_workers < 0:
            raise RewardError(f"executor_workers must be >= 0, got {executor_workers}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.components = {name: build_reward(name, **(_accepted(name, context or {}) | options.get(name, {})))
                            for name in weights}
        self.executor_workers = executor_workers
        self._executor: ThreadPoolExecutor | None = None

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
            self._executor = ThreadPoolExecutor(self.executor_workers, thread_name_prefix="rlbooth-reward")
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
            rows = list(range(batch))
            if getattr(reward, "identifier_only", False):
                rows = [i for i, m in enumerate(metadata) if m.get("with_identifier", True)]
            component = torch.full((batch,), float("nan"))
            if rows:
                score = reward(images[rows], [prompts[i] for i in rows], [metadata[i] for i in rows])
                if not isinstance(score, torch.Tensor) or score.shape != (len(rows),):
                    got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                    raise RewardError(f"reward {name!r} returned {got} for {len(rows)} images; "
                                      f"expected shape ({len(rows)},)")
                score = score.detach().to("cpu", torch.float32)
                bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
                if bad:
                    raise RewardError(f"reward {name!r} returned non-finite values {score[bad].tolist()} for "
                                      f"{len(bad)} of {len(rows)} images, first prompt: {prompts[rows[bad[0]]]!r}")
                component[rows] = score
            components[name] = component
        return self.total(components), components

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


def check_composite(weights: dict[str, float], options: dict[str, dict], modules: list[str] = ()) -> None:
    """Everything about a composite reward that can be checked without building it: run before any model loads.

    Imports the user's reward `modules` first (their rewards must be registered to be checked), then checks
    the weights, that options go to weighted rewards, and each reward's name, option names and option types.
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


def _accepted(name: str, context: dict[str, object]) -> dict[str, object]:
    """The context entries that reward `name`'s factory takes as keyword options."""
    parameters = reward_parameters(name)
    return {key: value for key, value in context.items() if key in parameters}
