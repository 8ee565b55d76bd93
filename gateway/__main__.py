"""``python -m gateway``: run the gateway."""

from gateway.server import build_service
from gateway.settings import GatewaySettings
from mesh.runner import run_service

run_service(build_service, GatewaySettings)
