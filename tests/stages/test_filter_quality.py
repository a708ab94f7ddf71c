import pytest

from refany3d.config import BuildSettings, override
from refany3d.records import Sample
from refany3d.stages.context import StageContext
from refany3d.stages.filter_quality import (
    BAD_SCORE_TYPE,
    DESCRIPTION_INVALID,
    EMPTY_ITEM,
    LOW_QUALITY,
    MISSING_SCORE,
    filter_quality,
)
from refany3d.storage.store import ArtifactStore

GOOD = {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}


def _sample(quality=GOOD, valid=True, item="mug"):
    return Sample(
        "r",
        "r",
        "subjects200k",
        "f#0",
        quality=dict(quality),
        item=item,
        description={"description_valid": valid},
    )


@pytest.mark.parametrize(
    "sample,reason",
    [
        (_sample({**GOOD, "imageQuality": 4}), LOW_QUALITY),
        (_sample({"compositeStructure": 5, "objectConsistency": 5}), MISSING_SCORE),
        (_sample({**GOOD, "objectConsistency": None}), MISSING_SCORE),
        (_sample({**GOOD, "imageQuality": "5"}), BAD_SCORE_TYPE),
        (_sample({**GOOD, "imageQuality": True}), BAD_SCORE_TYPE),
        (_sample({**GOOD, "imageQuality": 4.5}), BAD_SCORE_TYPE),
        (_sample({**GOOD, "imageQuality": float("nan")}), BAD_SCORE_TYPE),
        (_sample({**GOOD, "imageQuality": [5]}), BAD_SCORE_TYPE),
        (_sample(valid=False), DESCRIPTION_INVALID),
        (_sample(item=""), EMPTY_ITEM),
    ],
)
def test_filter_quality_drop_reasons(tmp_path, sample, reason):
    result = filter_quality([sample], BuildSettings(), StageContext(ArtifactStore(str(tmp_path))))
    assert not result.kept and [(r.stage, r.reason) for r in result.dropped] == [("quality", reason)]


def test_filter_quality_reason_strings():
    assert (LOW_QUALITY, MISSING_SCORE, BAD_SCORE_TYPE, DESCRIPTION_INVALID, EMPTY_ITEM) == (
        "low_quality",
        "missing_score",
        "bad_score_type",
        "description_invalid",
        "empty_item",
    )


def test_filter_quality_threshold_from_settings(tmp_path):
    s = _sample({**GOOD, "imageQuality": 4})
    ctx = StageContext(ArtifactStore(str(tmp_path)))
    assert filter_quality([s], override(BuildSettings(), **{"quality.min_score": 4}), ctx).kept == [s]
    assert filter_quality([s], BuildSettings(), ctx).dropped[0].metric == 4.0


def test_filter_quality_bad_score_type_names_the_score(tmp_path):
    result = filter_quality(
        [_sample({**GOOD, "imageQuality": "5"})], BuildSettings(), StageContext(ArtifactStore(str(tmp_path)))
    )
    assert result.dropped[0].detail == "imageQuality: str '5'"


def test_filter_quality_whole_float_scores_pass(tmp_path):
    s = _sample({k: 5.0 for k in GOOD})
    assert filter_quality([s], BuildSettings(), StageContext(ArtifactStore(str(tmp_path)))).kept == [s]
