"""Training RefAny3D: data stream and latent cache, trainer functions, checkpoints, the loop.

Modules: `data` (shards -> micro-batches per rank, dropout, skip reasons), `encode` (latent / text
cache, batches), `trainer` (build_trainer, train_step, save_checkpoint, load_checkpoint),
`checkpoint` (the on-disk format), `preview` (sample images), `run` (`run_training`, the loop).
No Prefect here: `refany3d.flows.train` wraps `run_training`.
"""
