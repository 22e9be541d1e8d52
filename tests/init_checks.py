"""The check shared by the tests of classes that write their own ``__init__`` instead of the
dataclass's (the compiled build runs such an ``__init__`` natively; the one ``dataclass``
writes stays interpreted): it must take the dataclass's fields, in their order, with their
defaults, by position and by keyword."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


def check_own_init(cls: type[Any], sample: dict[str, Any]) -> None:
    """``sample``: a value for every field, in field order. A field with a default factory
    must show ``None`` as its default (the ``__init__`` makes a new value for ``None``)."""
    fields = dataclasses.fields(cls)
    assert list(sample) == [f.name for f in fields]
    try:
        signature = inspect.signature(cls)
    except ValueError:  # a compiled __init__ may have no signature to show
        signature = None
    if signature is not None:
        assert list(signature.parameters) == [f.name for f in fields]
        for parameter, field in zip(signature.parameters.values(), fields, strict=True):
            if field.default is not dataclasses.MISSING:
                assert parameter.default == field.default, field.name
            elif field.default_factory is not dataclasses.MISSING:
                assert parameter.default is None, field.name
            else:
                assert parameter.default is inspect.Parameter.empty, field.name
    for obj in (cls(*sample.values()), cls(**sample)):
        assert {f.name: getattr(obj, f.name) for f in fields} == sample
