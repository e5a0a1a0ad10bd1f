#!/bin/sh
# The hparena image's entrypoint (under tini). For a worker (`hparena worker ...`) it first makes sure the
# packed CIFAR-10 is in HPARENA_DATA_DIR (the data volume): packed once, on the first start, and found there
# by every later start and by every worker sharing the volume, so no run pays for packing inside its time
# limit. Where it comes from: HPARENA_DATASET_PATH (a tarball, an image folder or a torchvision root, e.g. an
# offline copy mounted read-only), else a torchvision download into the volume unless
# HPARENA_ALLOW_DOWNLOAD=false. PREPARE_DATA=0 skips this (competitions that all name their own data.path).
# With PROMETHEUS_MULTIPROC_DIR set (the API's processes sharing their metrics, README "Metrics") it empties
# that directory of the previous start's files: a tmpfs is empty anyway, but a Kubernetes emptyDir outlives a
# container restart, and the figures of processes that are gone would be summed with the new ones.
# Then it execs the command, which keeps tini's SIGTERM going to the command itself (a warm shutdown).
set -eu

if [ "${1:-}" = "hparena" ] && [ "${2:-}" = "worker" ] && [ "${PREPARE_DATA:-1}" != "0" ]; then
    data_dir="${HPARENA_DATA_DIR:-/data}"
    mkdir -p "$data_dir"
    # Workers that share the volume start together: one prepares, the others wait and then find it done.
    if ! flock "$data_dir/.prepare.lock" hparena prepare-data; then
        echo "hparena-entrypoint: could not prepare the dataset (see above); set HPARENA_DATASET_PATH," \
             "allow the download, or PREPARE_DATA=0 if every competition names its own data.path" >&2
        exit 1
    fi
fi

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    # Only prometheus-client's own files ({counter,gauge_*,histogram,...}_PID.db): a mistyped directory
    # loses nothing else.
    find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -type f -name '*_[0-9]*.db' -delete
fi

exec "$@"
