#!/usr/bin/env bash
# Services the test suite runs against, on a fresh Debian machine as root (CI): a PostgreSQL server on
# loopback (tests marked `postgres`), the packages of the single-node Slurm dev cluster (tests marked
# `slurm`; the tests start and stop the daemons themselves with slurm/dev-cluster/*.sh) and Debian's
# chromium (the report's browser test). Idempotent. Without root it changes nothing and says so.
set -euo pipefail
PG_USER=cxr PG_PASS=cxr PG_DB=cxr_test
if [ "$(id -u)" != 0 ]; then
  echo "services.sh: not root; skipping package installs and PostgreSQL start (postgres/slurm tests will skip)" >&2
  exit 0
fi
need=()
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# PostgreSQL: Debian's cluster (created by the package), started by hand (no systemd), loopback only
VER=$(ls /etc/postgresql | sort -V | tail -1)
if [ -z "$(pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main"')" ]; then
  pg_createcluster "$VER" main
fi
if ! pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster "$VER" main start -- -o "-c listen_addresses=127.0.0.1"
fi
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASS' CREATEDB;
  END IF;
END \$\$;
SQL
runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname='$PG_DB'" | grep -q 1 \
  || runuser -u postgres -- createdb -O "$PG_USER" "$PG_DB"
echo "services.sh: PostgreSQL $VER on 127.0.0.1:5432 (postgresql://$PG_USER:$PG_PASS@127.0.0.1:5432/$PG_DB)"
