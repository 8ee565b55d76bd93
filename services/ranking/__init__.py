"""The ranking cascade: pre-rank, heavy multi-task ranker, re-rank."""
