#!/usr/bin/env bash
# Print the digests of the base images the Dockerfiles and docker-compose.yml name by tag, for
# pinning them (`image:tag@sha256:...`). Needs Docker and a reachable registry, which the
# development machine does not have, so the repository pins full version tags only.
#
#   bash scripts/pin-images.sh
# then e.g. ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest> in both Dockerfiles and
# image: redis:7.4.2-bookworm@sha256:<digest> in docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
images=$( { grep -h -o -E '^ARG PYTHON_IMAGE=\S+' docker/*.Dockerfile | cut -d= -f2
            grep -h -o -E '^\s+image: redis:\S+' docker-compose.yml | awk '{print $2}'; } | sort -u)
if ! docker buildx version >/dev/null 2>&1; then
    echo "error: needs Docker's buildx plugin (docker buildx imagetools inspect)" >&2
    exit 2
fi
for image in $images; do
    digest=$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}')
    echo "$image@$(echo "$digest" | tr -d '"')"
done
