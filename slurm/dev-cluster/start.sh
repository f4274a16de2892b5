#!/usr/bin/env bash
# Bring up a real single-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) on this machine.
# Needs root (or the packages pre-installed; see ../../../shared notes in README). Every daemon writes
# a pid file under $CXR_SLURM_DIR; stop.sh stops them by those files. Idempotent: exits 0 if running.
set -euo pipefail
DIR="${CXR_SLURM_DIR:-/tmp/cxr-slurm}"
CLUSTER=cxr
HOST="$(hostname -s)"
MYSQL_PORT="${CXR_SLURM_MYSQL_PORT:-3307}"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "start.sh: $what did not come up in ${t}s; see logs in $DIR/log" >&2; exit 1
}

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
  echo "dev cluster already running ($DIR)"; exit 0
fi

# 1. packages (Debian); the daemons are started by hand below (no systemd, policy-rc.d denies services)
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
   || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server
fi

# 2. a fresh state dir: job ids restart at 1, so the accounting DB (inside it) is dropped with it
rm -rf "$DIR"
mkdir -p "$DIR"/{log,state,spool,mysql,mysql-run}
chmod 755 "$DIR"

# 3. munge, as user munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then mungekey -c -f -k /etc/munge/munge.key; fi
chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
fi
ln -sf /run/munge/munged.pid "$DIR/munged.pid"
wait_for 10 munged munge -n

# 4. MariaDB for accounting, as user mysql, loopback only, its data inside $DIR
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
chown mysql:mysql "$DIR/mysql" "$DIR/mysql-run"
mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
  >"$DIR/log/mariadb-install.log" 2>&1
mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysql-run/mysqld.sock" --pid-file="$DIR/mysql-run/mysqld.pid" \
  --bind-address=127.0.0.1 --port="$MYSQL_PORT" --log-error="$DIR/mysql-run/mariadb.log" \
  --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
wait_for 30 mariadbd mariadb --socket="$DIR/mysql-run/mysqld.sock" -e "select 1"
mariadb --socket="$DIR/mysql-run/mysqld.sock" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# 5. Slurm configuration (one node = this host; partition "debug", and "short" with a 1-minute default limit)
mkdir -p /etc/slurm
MEM=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MinJobAge=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$HOST DefaultTime=00:01:00 MaxTime=00:02:00 State=UP
CONF
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf

# 6. slurmdbd, register the cluster, then slurmctld and slurmd (all root)
slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
slurmctld
wait_for 30 slurmctld scontrol ping
slurmd
node_idle() { sinfo -h -n "$HOST" -o %T | grep -qE '^idle'; }
wait_for 60 "node $HOST (idle)" node_idle
echo "dev cluster up: partition debug on $HOST ($(nproc) CPUs, ${MEM} MiB); state in $DIR"
