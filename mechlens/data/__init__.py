"""Study inputs: built-in texts written for mechlens, loaders for the original sources, local files and hub
datasets streamed through Hugging Face ``datasets``, sharded by rank for data-parallel runs."""

from mechlens.data.sources import (
    BUILTIN,
    FILE_TYPES,
    SOURCES,
    batched,
    check_source,
    iter_indexed,
    iter_texts,
    load_texts,
    parse_hf,
    shard,
    split_train_test,
)

__all__ = [
    "BUILTIN",
    "FILE_TYPES",
    "SOURCES",
    "batched",
    "check_source",
    "iter_indexed",
    "iter_texts",
    "load_texts",
    "parse_hf",
    "shard",
    "split_train_test",
]
