"""``python -m services.projector``: run the projector."""

from mesh.runner import run_service
from services.projector.server import build_service
from services.projector.settings import ProjectorSettings

run_service(build_service, ProjectorSettings)
