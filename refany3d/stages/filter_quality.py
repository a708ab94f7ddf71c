"""Quality filter: keep rows whose three Subjects200K quality scores all reach the threshold."""

from __future__ import annotations

from refany3d.config import BuildSettings
from refany3d.records import Sample, StageResult
from refany3d.stages.context import StageContext

STAGE = "quality"
LOW_QUALITY = "low_quality"
MISSING_SCORE = "missing_score"
DESCRIPTION_INVALID = "description_invalid"
EMPTY_ITEM = "empty_item"

SCORES = ("compositeStructure", "objectConsistency", "imageQuality")


def _scores(sample: Sample) -> list[int] | None:
    values = [sample.quality.get(k) for k in SCORES]
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
        return None
    return [int(v) for v in values]


def filter_quality(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    for sample in samples:
        scores = _scores(sample)
        if scores is None:
            result.drop(sample, STAGE, MISSING_SCORE)
        elif min(scores) < settings.quality.min_score:
            result.drop(sample, STAGE, LOW_QUALITY, metric=float(min(scores)))
        elif sample.description.get("description_valid") is False:
            result.drop(sample, STAGE, DESCRIPTION_INVALID)
        elif not sample.item:
            result.drop(sample, STAGE, EMPTY_ITEM)
        else:
            result.kept.append(sample)
    return result
