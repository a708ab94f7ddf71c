"""Prefect flows and deployments. Nothing else in refany3d imports Prefect."""
