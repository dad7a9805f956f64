"""The public API re-exported lazily by ``mechlens/__init__.py``: every name resolves to the object
defined in the module the export table names."""

from __future__ import annotations

import importlib

import pytest

import mechlens


@pytest.mark.parametrize("name", mechlens.__all__)
def test_every_public_name_resolves_to_its_module(name):
    obj = getattr(mechlens, name)
    assert obj is getattr(importlib.import_module(mechlens._EXPORTS[name]), name)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'HookedTransformer'"):
        _ = mechlens.HookedTransformer
