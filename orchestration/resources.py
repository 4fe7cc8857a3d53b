"""Dagster resources: the database every asset, check and sensor talks to."""

from __future__ import annotations

import os

import dagster as dg
import psycopg

from .database import connect, database_url


class VectorsyncDatabase(dg.ConfigurableResource):
    """The PostgreSQL database with the source tables, the stores and the control schema.
    Without a URL, the embedded server in $VECTORSYNC_HOME is used."""

    url: str | None = None

    def connect(self) -> psycopg.Connection:
        return connect(self.url)

    def resolved_url(self) -> str:
        return self.url or database_url()


def database_resource() -> VectorsyncDatabase:
    # EnvVar keeps a password in DATABASE_URL out of the UI and the run config.
    if os.environ.get("DATABASE_URL"):
        return VectorsyncDatabase(url=dg.EnvVar("DATABASE_URL"))
    return VectorsyncDatabase()
