"""Named training recipes for ``moonlet train --recipe NAME``.

A recipe module provides ``train_config(out_dir, **overrides) -> TrainConfig``, ``prepare(cfg)`` (builds
the tokenizer and datasets the config points at, if missing) and ``finish(cfg, trainer) -> Path`` (exports
the final model)."""

from __future__ import annotations

import importlib

RECIPES = {
    "tiny": "moonlet.train.recipes.tiny",
    "tiny-draft": "moonlet.train.recipes.tiny_draft",
}


def get_recipe(name: str):
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; recipes: {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])
