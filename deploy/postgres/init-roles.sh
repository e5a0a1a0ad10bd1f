#!/bin/sh
# Run by the postgres image on its first start (an empty data volume), as the superuser POSTGRES_USER:
# docker-compose.yml mounts deploy/postgres/ on /docker-entrypoint-initdb.d. roles.psql holds the SQL (it is
# not named *.sql, so that the image doesn't also run it without its variables).
set -e  # not -u: the image sources a script that is not executable
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v db="${DB_NAME:-hparena}" \
     -v owner="${DB_OWNER:-hparena}" \
     -v api="${DB_API_USER:-hparena_api}" \
     -v worker="${DB_WORKER_USER:-hparena_worker}" \
     -v owner_password="$DB_OWNER_PASSWORD" \
     -v api_password="$DB_API_PASSWORD" \
     -v worker_password="$DB_WORKER_PASSWORD" \
     -f "${ROLES_PSQL:-/docker-entrypoint-initdb.d/roles.psql}"
