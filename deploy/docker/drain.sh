#!/bin/sh
# Drain this container's worker: the Kubernetes preStop hook (deploy/k8s/workers-*.yaml), or by hand with
# `docker compose exec gpu0 hparena-drain`. SIGTERM to PID 1 (tini, which passes it to the worker's main
# process only) is Celery's warm shutdown: the worker stops consuming at once, the run it is training finishes
# and reports, and then it exits, which ends the container. This waits for that, so the pod's
# terminationGracePeriodSeconds (longer than any run may take) is what bounds a drain.
set -u
kill -TERM 1
echo "hparena-drain: warm shutdown requested; waiting for the current run to finish" > /proc/1/fd/1 2>/dev/null || true
while kill -0 1 2>/dev/null; do
    sleep 5
done
