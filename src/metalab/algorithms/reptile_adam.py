"""Reptile's inner Adam state carried from task to task (``carry_inner_adam_state``).

openai/supervised-reptile fine-tunes every task with one Adam optimizer whose state it never
resets: between tasks only the weights go back to the meta-weights, so the step count and
the moments run on through meta-training, and each evaluation task fine-tunes from them
(and puts them back afterwards). `CarriedAdamState` holds that state as buffers of the
learner, so checkpoints (resume) and model files keep it; `CarriedAdam` steps named
tensors from a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metalab.algorithms.functional import StackedOptimizer

# The inner Adam's betas: beta1 = 0 as in the reference (the first moment is the last
# gradient), beta2 PyTorch's default.
INNER_BETAS = (0.0, 0.999)


class CarriedAdam:
    """Adam (betas `INNER_BETAS`) on named tensors, starting from a carried state.

    Names the state holds with the same shape continue its step count and moments; any
    other name (a fresh head for another way count) starts at step 0 with zero moments.
    ``step`` updates the tensors in place with the formulas of `StackedOptimizer` (those of
    ``torch.optim.Adam``), so a state at step 0 moves exactly as a fresh torch Adam would.
    """

    def __init__(
        self,
        lr: float,
        step: int,
        moments: Mapping[str, tuple[Tensor, Tensor]],
        tasks: int | None = None,
    ) -> None:
        """``moments[name]`` = (first, second moment), each shaped as the tensor it belongs
        to; copied here (the state given is never changed). ``tasks``: steps stacked
        tensors [tasks, *shape] (`ReptileLearner.fine_tune_many`), every task from the
        same state."""

        def copy(moment: Tensor) -> Tensor:
            if tasks is None:
                return moment.clone()
            return moment.unsqueeze(0).expand(tasks, *moment.shape).clone()

        self.carried = StackedOptimizer("adam", lr, betas=INNER_BETAS)
        self.carried.steps = step
        self.carried.moments = {
            name: (copy(first), copy(second)) for name, (first, second) in moments.items()
        }
        self.fresh = StackedOptimizer("adam", lr, betas=INNER_BETAS)

    @property
    def steps(self) -> int:
        """Steps the carried state has taken."""
        return self.carried.steps

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        """One Adam step of every ``params[name]`` along ``grads[name]`` (same shapes)."""
        carried = self.carried.moments
        ongoing = [name for name in grads if name in carried]
        new = [name for name in grads if name not in carried]
        self.carried.step({n: params[n] for n in ongoing}, {n: grads[n] for n in ongoing})
        if new:  # only then: a step of the fresh optimizer counts even without tensors
            self.fresh.step({n: params[n] for n in new}, {n: grads[n] for n in new})


def _buffer_key(kind: str, name: str) -> str:
    """Buffer name of a parameter's moment (a buffer name may not contain dots)."""
    return f"{kind}-{name.replace('.', '-')}"


class CarriedAdamState(nn.Module):
    """The carried inner Adam state of a network's parameters, as buffers (state_dict keys
    ``step`` and ``exp_avg-<name>``/``exp_avg_sq-<name>``, dots as dashes): the step
    count int64 [] and both moments of each parameter, shaped, typed and placed like it.
    Starts at step 0 with zero moments (a fresh Adam)."""

    def __init__(self, parameters: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(parameters)
        keys = {_buffer_key("exp_avg", name) for name in self.names}
        if len(keys) != len(self.names):
            raise ValueError("parameter names that differ only in '.' versus '-'")
        first = next(iter(parameters.values()))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=first.device))
        for name, parameter in parameters.items():
            for kind in ("exp_avg", "exp_avg_sq"):
                buffer = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                self.register_buffer(_buffer_key(kind, name), buffer.detach())

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(first, second moment) of each parameter, by name (the buffers themselves)."""
        return {
            name: (
                self.get_buffer(_buffer_key("exp_avg", name)),
                self.get_buffer(_buffer_key("exp_avg_sq", name)),
            )
            for name in self.names
        }

    def resume(
        self, params: Mapping[str, Tensor], lr: float, tasks: int | None = None
    ) -> CarriedAdam:
        """An optimizer for ``params`` from a copy of this state: a parameter of another
        shape than the stored one (a fresh head) starts fresh. ``tasks`` as in
        `CarriedAdam`."""
        moments = {
            name: pair
            for name, pair in self.moments().items()
            if name in params and pair[0].shape == params[name].shape[0 if tasks is None else 1 :]
        }
        # One host read per task (the step count decides Adam's bias correction).
        return CarriedAdam(lr, int(self.step), moments, tasks)

    @torch.no_grad()
    def store(self, optimizer: CarriedAdam) -> None:
        """Keep the state ``optimizer`` (unstacked, from `resume`) has reached."""
        self.step.fill_(optimizer.steps)
        for name, (first, second) in self.moments().items():
            reached_first, reached_second = optimizer.carried.moments[name]
            first.copy_(reached_first)
            second.copy_(reached_second)
