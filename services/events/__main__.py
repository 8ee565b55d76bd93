"""``python -m services.events``: run the events service."""

from mesh.runner import run_service
from services.events.server import build_service
from services.events.settings import EventsSettings

run_service(build_service, EventsSettings)
