"""When stage 0 evaluates: a pure rule, so the curve's steps are the same on every stage-0 peer."""
from __future__ import annotations


def due_eval_step(step: int, done: int | None, every: int, max_steps: int) -> int | None:
    """The step to evaluate now (None: none due). `done`: the run step last looked at (None before the first look:
    a fresh run evaluates step 0, a joiner nothing it downloaded). `every` 0: only the last step. The step is the
    interval crossed, not the clock (a round may have moved it past): every peer's evaluation of it carries the same
    step."""
    if done is None:
        return 0 if step == 0 else None
    if step == done or not ((every and step // every > done // every) or step >= max_steps):
        return None
    return step if step >= max_steps else step // every * every
