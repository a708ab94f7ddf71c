"""Quality filter: keep rows whose three Subjects200K quality scores all reach the threshold."""

from __future__ import annotations

from refany3d.config import BuildSettings
from refany3d.records import Sample, StageResult
from refany3d.stages.context import StageContext

STAGE = "quality"
LOW_QUALITY = "low_quality"
MISSING_SCORE = "missing_score"
BAD_SCORE_TYPE = "bad_score_type"
DESCRIPTION_INVALID = "description_invalid"
EMPTY_ITEM = "empty_item"

SCORES = ("compositeStructure", "objectConsistency", "imageQuality")


def _scores(sample: Sample) -> list[int] | tuple[str, str]:
    """The three scores as ints, or (reason, detail): `missing_score` when one is absent (or
    null), `bad_score_type` when one is stored as something other than a whole number (a string,
    a bool, a fraction, NaN)."""
    values = [sample.quality.get(k) for k in SCORES]
    for key, value in zip(SCORES, values, strict=True):
        if value is None:
            return MISSING_SCORE, key
    for key, value in zip(SCORES, values, strict=True):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            return BAD_SCORE_TYPE, f"{key}: {type(value).__name__} {value!r}"[:200]
    return [int(v) for v in values]


def filter_quality(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    for sample in samples:
        scores = _scores(sample)
        if isinstance(scores, tuple):
            reason, detail = scores
            result.drop(sample, STAGE, reason, detail=detail)
        elif min(scores) < settings.quality.min_score:
            result.drop(sample, STAGE, LOW_QUALITY, metric=float(min(scores)))
        elif sample.description.get("description_valid") is False:
            result.drop(sample, STAGE, DESCRIPTION_INVALID)
        elif not sample.item:
            result.drop(sample, STAGE, EMPTY_ITEM)
        else:
            result.kept.append(sample)
    return result
