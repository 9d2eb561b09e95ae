"""The served zone: FastAPI routes over the one service, run by the zone's own account."""
