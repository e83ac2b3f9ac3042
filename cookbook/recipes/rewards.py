"""GRPO reward functions: ``reward_fn(completion_text, row) -> float``, selected by `recipe.reward_fn`."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from cookbook.errors import UserError

RewardFn = Callable[[str, dict], float]
END_OF_TURN = "<|im_end|>"


def exact_match(completion_text: str, row: dict) -> float:
    """1.0 iff the completion (cut at the first `<|im_end|>`, stripped) equals `str(row["ground_truth"])`."""
    if "ground_truth" not in row:
        raise UserError("The reward function cookbook.recipes.rewards:exact_match needs a `ground_truth` field in every "
                        "dataset row. Fix: add \"ground_truth\" to the rows, or set recipe.reward_fn to a function "
                        "that scores your rows.")
    text = completion_text.split(END_OF_TURN, 1)[0].strip()
    return 1.0 if text == str(row["ground_truth"]).strip() else 0.0


def load_reward_fn(spec: str) -> RewardFn:
    """Import `module:function` and check it is a callable taking (completion_text, row). Else UserError."""
    fix = "Fix: set recipe.reward_fn to `module:function`, e.g. cookbook.recipes.rewards:exact_match."
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"Invalid value for `recipe.reward_fn`: '{spec}' is not an import path. {fix}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"Invalid value for `recipe.reward_fn`: cannot import module '{module_name}' ({e}). "
                        f"{fix} The module must be importable (installed or on PYTHONPATH).") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"Invalid value for `recipe.reward_fn`: module '{module_name}' has no attribute "
                            f"'{attr}'. {fix}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"Invalid value for `recipe.reward_fn`: '{spec}' is a {type(obj).__name__}, not a function. "
                        f"{fix}")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins without a signature: trust the user
    try:
        sig.bind("completion", {})
    except TypeError:
        raise UserError(f"Invalid value for `recipe.reward_fn`: '{spec}' has signature {sig}; a reward function "
                        "takes two arguments (completion_text, row) and returns a float. Fix: change the function "
                        "or point recipe.reward_fn at another one.") from None
    return obj
