"""Build stages: each module exposes one function `<verb>(samples, settings, ctx) -> StageResult`.

Stages never import Prefect; `refany3d.flows` composes them. `dag.py` lists them in order.
"""
