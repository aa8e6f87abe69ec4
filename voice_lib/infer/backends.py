"""The acoustic backends by name (the registry lineage tag ``backend``), and loading one's resident model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from voice_lib.infer.core import END_TO_END, AcousticBackend
from voice_lib.infer.end_to_end import load_end_to_end
from voice_lib.infer.two_stage import TWO_STAGE, load_two_stage

# Backend name -> loader of its resident model from a base folder (and the weights' sha256, if known).
BACKEND_LOADERS: dict[str, Callable[[Path, str | None], AcousticBackend]] = {
    END_TO_END: load_end_to_end, TWO_STAGE: load_two_stage,
}


def load_backend(name: str, folder: Path, sha256: str | None = None) -> AcousticBackend:
    """The resident model of backend ``name``; a clear error for a backend this code does not have."""
    loader = BACKEND_LOADERS.get(name or END_TO_END)
    if loader is None:
        raise ValueError(f"backend {name!r} (lineage tag 'backend') is not one of {', '.join(sorted(BACKEND_LOADERS))}; "
                         "upgrade VoiceOps or re-register the version with a known backend.")
    return loader(folder, sha256)


def base_weights_file(name: str) -> str:
    """The file whose sha256 identifies a base of backend ``name`` (the lineage tag ``base_sha256``)."""
    from voice_lib.model.checkpoints import CONVERTER_WEIGHTS

    return CONVERTER_WEIGHTS if name == TWO_STAGE else "model.safetensors"
