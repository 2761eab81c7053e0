"""Training: configs, the trainer, optimisers, checkpoints, placement (one process or DMP
shards), runs and their summaries.

Example::

    from ctr.training.run import RunConfig, train_run
    summary = train_run(RunConfig(data="data/synth"), "runs/a")
"""
