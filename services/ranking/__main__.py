"""``python -m services.ranking``: run the ranking service."""

from mesh.runner import run_service
from services.ranking.server import build_service
from services.ranking.settings import RankingSettings

run_service(build_service, RankingSettings)
