"""The pipeline's stages, in order. One module per stage; glue only.
"""

from __future__ import annotations

from pipeline.stage import Stage
from stages.cluster import ClusterStage
from stages.embed import EmbedStage
from stages.extract import ExtractStage
from stages.index import IndexStage
from stages.ingest import IngestStage
from stages.prepare import PrepareStage
from stages.score import ScoreStage
from stages.train import TrainStage


def all_stages() -> tuple[Stage, ...]:
    """Fresh instances of every stage, in pipeline order."""
    return (IngestStage(), PrepareStage(), ExtractStage(), ClusterStage(), TrainStage(),
            EmbedStage(), IndexStage(), ScoreStage())
