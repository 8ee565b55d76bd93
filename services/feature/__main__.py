"""``python -m services.feature``: run the feature service."""

from mesh.runner import run_service
from services.feature.server import build_service
from services.feature.settings import FeatureSettings

run_service(build_service, FeatureSettings)
