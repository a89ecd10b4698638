"""Providers' listings, one module each, behind the `Source` protocol.

Adding a provider: write its module (a `Source` and a `SourceSpec`) and register the spec below.
"""

from .base import (
    Checkpoint,
    PageRef,
    RemoteFile,
    Source,
    SourceContext,
    SourceRecipe,
    SourceSpec,
    SyncState,
)
from .baseten_loops import LoopsRuns
from .baseten_training import TrainingJobs
from .wandb import WandbTraining

SOURCES: tuple[SourceSpec, ...] = (TrainingJobs(), LoopsRuns(), WandbTraining())

__all__ = [
    "SOURCES",
    "Checkpoint",
    "PageRef",
    "RemoteFile",
    "Source",
    "SourceContext",
    "SourceRecipe",
    "SourceSpec",
    "SyncState",
]
