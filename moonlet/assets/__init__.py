"""Files shipped inside the package: the bundled moonlet-tiny checkpoint (``moonlet-tiny/``) and its
draft model for speculative decoding (``moonlet-tiny-draft/``)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "moonlet-tiny"
DEFAULT_DRAFT = "moonlet-tiny-draft"


def _bundled(name: str, remedy: str) -> Path:
    path = Path(__file__).resolve().parent / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled {name} checkpoint is missing at {path}; reinstall moonlet, {remedy}")
    return path


def default_model_path() -> Path:
    """Directory of the bundled moonlet-tiny checkpoint (hub layout, with tokenizer and chat template).

    moonlet-tiny is a demonstration model of the K2 architecture trained by ``moonlet train --recipe
    tiny``, not a general assistant. Raises FileNotFoundError if the package was installed without it."""
    return _bundled(DEFAULT_MODEL, "pass a checkpoint directory explicitly, or rebuild it with `moonlet train "
                                   f"--recipe tiny --export {Path(__file__).resolve().parent / DEFAULT_MODEL}`")


def default_draft_path() -> Path:
    """Directory of the bundled moonlet-tiny-draft checkpoint: a one-layer dense model with moonlet-tiny's
    tokenizer, trained by ``moonlet train --recipe tiny-draft`` to agree with moonlet-tiny, for
    ``speculative="draft"``. Raises FileNotFoundError if the package was installed without it."""
    return _bundled(DEFAULT_DRAFT, "pass --speculative-model explicitly, or rebuild it with `moonlet train --recipe "
                                   f"tiny-draft --export {Path(__file__).resolve().parent / DEFAULT_DRAFT}`")


def bundled_draft_for(model_path) -> str:
    """The draft model that ``--speculative draft`` without ``--speculative-model`` means: the bundled
    moonlet-tiny-draft when ``model_path`` is the bundled moonlet-tiny. Any other model has no
    default draft (ValueError: pass one)."""
    if model_path is not None:
        try:
            bundled = Path(model_path).resolve() == default_model_path().resolve()
        except FileNotFoundError:
            bundled = False
        if bundled:
            return str(default_draft_path())
    raise ValueError(f"--speculative draft without --speculative-model only has a default for the bundled "
                     f"{DEFAULT_MODEL} (its {DEFAULT_DRAFT}); for {str(model_path) if model_path else 'this model'} "
                     f"pass --speculative-model PATH, a smaller checkpoint with the same tokenizer")
