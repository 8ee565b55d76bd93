"""``python -m services.quota``: run the quota service."""

from mesh.runner import run_service
from services.quota.server import build_service
from services.quota.settings import QuotaSettings

run_service(build_service, QuotaSettings)
