"""Study inputs: built-in texts written for mechlens, loaders for the original sources, local files."""

from mechlens.data.sources import BUILTIN, SOURCES, check_source, load_texts, split_train_test

__all__ = ["BUILTIN", "SOURCES", "check_source", "load_texts", "split_train_test"]
