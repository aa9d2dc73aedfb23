"""dsat's benchmark suite: ``python -m bench all`` (see docs/performance.md).

Parts, one module each:

- :mod:`bench.ceiling`: the pipeline in raw pyzmq, no tracking (the ceiling);
- :mod:`bench.pipeline`: the pipeline through ``dsat run`` (:mod:`bench.satellite`);
- :mod:`bench.peers`: the pipeline as a Celery chain over Redis (:mod:`bench.celery_app`);
- :mod:`bench.tracker`: the tracker alone, fed synthetic event batches;
- :mod:`bench.workload`, :mod:`bench.stages`: what every part runs and checks;
- :mod:`bench.figures`: medians, ratios, the table, the JSON; :mod:`bench.cli`: the command.
"""
