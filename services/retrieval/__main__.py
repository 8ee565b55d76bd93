"""``python -m services.retrieval``: run the retrieval service."""

from mesh.runner import run_service
from services.retrieval.server import build_service
from services.retrieval.settings import RetrievalSettings

run_service(build_service, RetrievalSettings)
