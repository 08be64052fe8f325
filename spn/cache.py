"""A cache of tensors derived from parameters, keyed by the parameters' in-place version counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

_T = TypeVar("_T")


def derived(module: nn.Module, name: str, params: tuple[Tensor, ...], compute: Callable[[], _T]) -> _T:
    """``compute()``, a pure function of ``params``, reused while none of them changes (no-grad only).

    The key is each parameter's storage and in-place version counter, which every in-place write
    (EM, optimiser steps, ``load_state_dict``, ``.to()``) changes, so a reused value is always the
    one ``compute()`` would give. Writes through ``param.data`` bypass the version counter: write
    parameters in place under ``torch.no_grad()`` instead, as ``load_state_dict`` does. An EM step
    thus normalises its weights once for the statistics and the M-step, and a scoring pass in row
    blocks builds the leaves' quadratic forms once. The cache lives in the module's ``_derived_cache``
    (created here, so a module unpickled from before the cache existed works too).
    """
    if torch.is_grad_enabled():
        return compute()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cache = module.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    cache[name] = (key, value)
    return value
