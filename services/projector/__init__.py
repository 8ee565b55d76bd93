"""The projector: reads every tenant's event log through a Redis Streams consumer group and
keeps the projections the serving path reads (users' recent outcomes, items' decayed
counters). See :mod:`services.projector.consumer` and :mod:`services.projector.projections`."""
