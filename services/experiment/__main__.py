"""``python -m services.experiment``: run the experiment service."""

from mesh.runner import run_service
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

run_service(build_service, ExperimentSettings)
