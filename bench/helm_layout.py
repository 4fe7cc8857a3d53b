"""The processes of Dagster's Helm chart, on this machine: a code server (`dagster api grpc`, what
the user-code deployment's container runs), `dagster-daemon run` and `dagster-webserver`, both
reading a workspace that points at the code server. `dagster dev` puts a proxy of its own between
them (`dagster code-server start`, which restarts the code server on reload); a deployment has no
such proxy. Used by `python -m bench idle -o layout=helm` to say what the proxy costs and what a
deployment idles at."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from bench.common import free_port
from orchestration.local_dagster import LocalDagster

LOCATION = "vectorsync"


class HelmLayout(LocalDagster):
    """LocalDagster, with the Helm chart's three processes instead of `dagster dev`: one shell
    starts the code server, waits until it answers, then starts the daemon and the webserver, so
    that all of them are one process group (measured, and stopped, together)."""

    def command(self, bin_dir: Path) -> list[str]:
        if self.port is None:
            raise ValueError("the Helm layout serves the UI: give it a port")
        grpc_port = free_port()
        workspace = self.home / "workspace_grpc.yaml"
        workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": grpc_port, "location_name": LOCATION}}]}))
        dagster = shlex.quote(str(bin_dir / "dagster"))
        ws = shlex.quote(str(workspace))
        script = (
            f"{dagster} api grpc -m orchestration.definitions -h 127.0.0.1 -p {grpc_port} & "
            f"until {dagster} api grpc-health-check -p {grpc_port} >/dev/null 2>&1; do sleep 1; done; "
            f"{shlex.quote(str(bin_dir / 'dagster-daemon'))} run -w {ws} & "
            f"{shlex.quote(str(bin_dir / 'dagster-webserver'))} -w {ws} -h 127.0.0.1 -p {self.port} & "
            "wait"
        )
        return ["sh", "-c", script]
