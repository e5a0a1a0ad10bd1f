"""The training engine: config + dataset + device -> metrics. No database, no Celery, no HTTP.

Import the pieces you need (`worker.engine.train`, `.data`, ...); this package root stays light so
that `worker.engine.config` can be imported by the API without loading torch.
"""
