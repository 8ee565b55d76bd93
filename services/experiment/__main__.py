"""``python -m services.experiment``: run the experiment service."""

from mesh.runner import run_service
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

# Guarded: the report worker is a spawned process, which imports this module again (as
# ``__mp_main__``) and must not start a second service.
if __name__ == "__main__":
    run_service(build_service, ExperimentSettings)
