"""Fixtures for refany3d's tests and benchmarks, not for users: the one place that `tests/` and
`bench/` both import, so that a benchmark measures exactly what a test checks and `bench/` never
imports `tests/`.

- `views`: view samples (drawn images; the synthetic source after read_source + split_pair).
- `checkpoints`: tiny random-weight checkpoints of every real perception backend.
- `hunyuan3d`: random-weight hy3dgen pipelines in the Hunyuan3D-2 layout, tiny and full size.
- `posed`: view samples posed with the synthetic ground truth, as the pose stage hands them on.
- `pose_cases`: pose-estimation cases with exact answers, and their error measures.
- `pose_sets`: the pose accuracy sets (primitive meshes, the synthetic source's views), the pass
  thresholds, and wrong poses for the verify stage.

Supported: the names here change only with the tests and benches that use them. The rest of the
package never imports this one (tests/test_imports.py checks that, and that nothing outside
`tests/` imports `tests`). Heavy optional imports (hy3dgen, groundingdino, transformers) stay
inside the functions that need them.
"""
