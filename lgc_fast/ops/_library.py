"""torch.library registration that works on every supported torch (2.4 on)."""
import inspect
import typing

import torch


def custom_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op`` for a function whose annotations may be strings (``from __future__ import
    annotations``): torch 2.4 infers the schema from the raw annotations and rejects strings, so they are resolved in
    the function's module first. The function itself is unchanged."""
    def register(fn):
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
        fn.__signature__ = signature.replace(
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
            return_annotation=hints.get("return", signature.return_annotation))
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
    return register
