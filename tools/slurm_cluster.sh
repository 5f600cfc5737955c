#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the sweep tests (tests/test_slurm.py) and CI:
#   tools/slurm_cluster.sh start [dir]    install what is missing (apt), start it, prove it runs a job
#   tools/slurm_cluster.sh status [dir]   exit 0 when every daemon runs and sinfo answers
#   tools/slurm_cluster.sh stop [dir]     cancel its jobs, stop its daemons by pid, keep dir for the logs
# dir (default /tmp/imgcls-slurm, or $IMGCLS_SLURM_DIR) holds every config, pid file, log, spool and
# database file. `start` prints one line on stdout, `export SLURM_CONF=<dir>/slurm.conf`, for `eval`;
# everything else goes to stderr. `start` and `stop` are idempotent.
#
# The cluster: Debian 12's slurm-wlm 22.05, munge, slurmdbd accounting in MariaDB (submitit tells a
# cancelled or timed-out job from a failed one only through `sacct`), one node (this host, its CPUs,
# 90% of its memory) in one CPU partition `cpu` without gres, every daemon run as root.
#
# Nothing is written outside dir: the config is found through SLURM_CONF rather than /etc/slurm, munged
# listens on its own socket with its own key, MariaDB on its own data folder and port. So a machine's own
# SLURM or MariaDB (a login node, a developer laptop) is neither read nor changed, and `stop` leaves the
# machine as it found it apart from the packages. The price: every SLURM command must see SLURM_CONF
# (the tests' fixture sets it from this dir when it is unset; jobs inherit it through sbatch).
set -euo pipefail

cmd=${1:-}
DIR=$(realpath -m "${2:-${IMGCLS_SLURM_DIR:-/tmp/imgcls-slurm}}")
# the default SLURM ports (a node runs one cluster); the database gets its own port, not MariaDB's 3306
CTLD_PORT=${IMGCLS_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${IMGCLS_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${IMGCLS_SLURM_DBD_PORT:-6819}
DB_PORT=${IMGCLS_SLURM_DB_PORT:-6820}
CLUSTER=imgcls
PARTITION=cpu
PACKAGES=(slurm-wlm slurmdbd mariadb-server munge)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs it backwards
export SLURM_CONF="$DIR/slurm.conf"

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# the pid of a daemon we started, if it still runs: the pid file's pid, and that process's name must
# match (a pid reused by another program after a crash is not ours)
pid_of() {
  local name=$1 pid comm
  [[ -s $DIR/run/$name.pid ]] || return 1
  pid=$(tr -dc 0-9 <"$DIR/run/$name.pid")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$name"* ]] || return 1
  echo "$pid"
}

install_missing() {
  local need=0 tool
  for tool in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sinfo sacct sacctmgr srun sbatch; do
    command -v "$tool" >/dev/null || need=1
  done
  ((need)) || return 0
  [[ $(id -u) == 0 ]] || die "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get: install ${PACKAGES[*]} (or their equivalents)"
  say "installing ${PACKAGES[*]} (about a minute)"
  # apt starts no services in a container without init; where it does (policy-rc.d allows it), those
  # system daemons use the standard paths and ports, apart from ours
  apt-get update -q >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 \
    || die "apt-get install ${PACKAGES[*]} failed"
}

write_configs() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  # slurmd drains a node whose RealMemory is above what it finds; 90% leaves room for the daemons
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$DIR"/{run,log,state,spool,mysql,jobs}
  chmod 755 "$DIR"  # munged refuses a socket folder that others can write to
  cat >"$DIR/slurm.conf" <<EOF
# written by tools/slurm_cluster.sh: a one-node test cluster, every daemon as root
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/run/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# scancel sends SIGTERM, then SIGKILL after KillWait: 10 s is plenty for a run to save last.pt
KillWait=10
# accounting: sacct (and so submitit) sees every job's end state, CANCELLED, TIMEOUT, NODE_FAIL included
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# with slurmdbd this names the munge socket for talking to it (AuthInfo is not used for that)
AccountingStoragePass=$DIR/run/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # read only when a cgroup plugin is configured (none is); written so a slurmd that looks finds no
  # system cgroup.conf asking for constraints this node cannot give
  cat >"$DIR/cgroup.conf" <<EOF
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  # slurmdbd refuses a config that others can read (it holds the database password)
  (
    umask 077
    cat >"$DIR/slurmdbd.conf" <<EOF
# written by tools/slurm_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$DIR/run/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  )
}

wait_for() {  # wait_for <seconds> <what> <command...>: poll until the command succeeds
  local deadline=$((SECONDS + $1)) what=$2 secs=$1
  shift 2
  while ((SECONDS < deadline)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "$what did not happen within ${secs}s; logs: $DIR/log/"
}

# every daemon's stdin and stdout go to /dev/null and its log: one holding the caller's stdout would keep
# a pipe (`tools/slurm_cluster.sh start | tee`, CI's log) open after this script exits, and none keeps the
# start lock (fd 9) that would make the next start or stop wait for it
start_munged() {
  pid_of munged >/dev/null && return 0
  [[ -s $DIR/run/munge.key ]] || (umask 077 && mungekey --create --keyfile="$DIR/run/munge.key" >&2)
  rm -f "$DIR/run/munge.socket" "$DIR/run/munge.socket.lock"
  munged --key-file="$DIR/run/munge.key" --socket="$DIR/run/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munged.seed" --num-threads=2 </dev/null >/dev/null 2>&1 9>&- \
    || die "munged did not start: $DIR/log/munged.log"
  wait_for 10 "munged answering" timeout 10 sh -c "echo | munge --socket='$DIR/run/munge.socket' | unmunge --socket='$DIR/run/munge.socket'"
}

mariadb_sql() { mariadb --no-defaults --connect-timeout=10 --socket="$DIR/run/mysqld.sock" -u root "$@"; }

start_mariadbd() {
  if ! pid_of mariadbd >/dev/null; then
    if [[ ! -d $DIR/mysql/mysql ]]; then
      mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
    fi
    # slurmdbd logs "settings not recommended" below half its advice (1 GiB pool, 64 MiB log, 900 s lock
    # wait); the pool is reserved, not used, so 512M costs a test cluster nothing
    setsid mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --socket="$DIR/run/mysqld.sock" \
      --pid-file="$DIR/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
      --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=512M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 "MariaDB answering on $DIR/run/mysqld.sock" mariadb_sql -e "SELECT 1"
  fi
  # over TCP from 127.0.0.1 MariaDB may see the client as localhost or 127.0.0.1: grant both
  mariadb_sql <<'EOF' || die "could not create slurmdbd's database and user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurm_daemons() {
  if ! pid_of slurmdbd >/dev/null; then
    slurmdbd </dev/null >/dev/null 2>&1 9>&- || die "slurmdbd did not start: $DIR/log/slurmdbd.log"
    # slurmctld registers the cluster with slurmdbd when it connects, so slurmdbd must answer first
    wait_for 60 "slurmdbd answering" timeout 20 sacctmgr -n list cluster
  fi
  if ! pid_of slurmctld >/dev/null; then
    slurmctld </dev/null >/dev/null 2>&1 9>&- || die "slurmctld did not start: $DIR/log/slurmctld.log"
  fi
  if ! pid_of slurmd >/dev/null; then
    slurmd </dev/null >/dev/null 2>&1 9>&- || die "slurmd did not start: $DIR/log/slurmd.log"
  fi
  wait_for 60 "the node $(hostname -s) idle in sinfo" timeout 20 sh -c "sinfo -h -N -n '$(hostname -s)' -o %t | grep -qx 'idle\|mix\|alloc'"
  wait_for 30 "cluster $CLUSTER registered in slurmdbd" timeout 20 sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx '$CLUSTER'"
}

smoke_job() {
  # a real job end to end: scheduled, run on the node, and recorded as COMPLETED in the accounting
  local out id state
  out=$(cd "$DIR/jobs" && timeout 60 srun -J imgcls-smoke -N1 -n1 -t 1 sh -c 'hostname; echo "job=$SLURM_JOB_ID"') \
    || die "srun hostname failed: $out (logs: $DIR/log/)"
  id=$(sed -n 's/^job=//p' <<<"$out")
  [[ -n $id ]] || die "srun gave no job id: $out"
  for ((i = 0; i < 30; i++)); do
    state=$(sacct -n -X -P -j "$id" -o State 2>/dev/null | head -1)
    [[ $state == COMPLETED ]] && break
    sleep 1
  done
  [[ $state == COMPLETED ]] || die "sacct -j $id says '${state:-nothing}', not COMPLETED: accounting does not work (logs: $DIR/log/)"
  say "job $id ran on $(head -1 <<<"$out") and sacct says COMPLETED"
}

start() {
  install_missing
  [[ $(id -u) == 0 ]] || die "the test cluster runs its daemons as root: run this as root"
  write_configs
  start_munged
  start_mariadbd
  start_slurm_daemons
  smoke_job
  say "running; partition $PARTITION; stop with: tools/slurm_cluster.sh stop $DIR"
  echo "export SLURM_CONF=$SLURM_CONF"
}

status() {
  local ok=0 name pid
  for name in "${DAEMONS[@]}"; do
    if pid=$(pid_of "$name"); then say "$name running (pid $pid)"; else say "$name not running"; ok=1; fi
  done
  if ((ok == 0)) && command -v sinfo >/dev/null && timeout 20 sinfo -h -o '%P %t %D %C' >&2; then
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  return 3
}

stop() {
  local name pid i
  # jobs first: their slurmstepd and processes live apart from slurmd, and would outlive it
  if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null; then
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
      say "cancelling the jobs still queued or running"
      squeue -h -o %i | xargs -r scancel 2>/dev/null || true
      for ((i = 0; i < 30; i++)); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] || say "warning: jobs still listed: $(squeue -h -o '%i %T' | tr '\n' ' ')"
    fi
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    pid=$(pid_of "$name") || continue
    kill -TERM "$pid" 2>/dev/null || true
    for ((t = 0; t < 30; t++)); do [[ -d /proc/$pid ]] || break; sleep 0.5; done
    if [[ -d /proc/$pid ]]; then
      say "$name (pid $pid) still runs 15 s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name (pid $pid)"
  done
  rm -f "$DIR"/run/*.pid
}

# one start or stop at a time per folder (test workers may each ask for the cluster): the second waits,
# then finds the daemons running and only checks them
lock() {
  mkdir -p "$DIR"
  exec 9>"$DIR/lock"
  flock -w 600 9 || die "another tools/slurm_cluster.sh holds $DIR/lock"
}

case $cmd in
  start) lock && start ;;
  stop) lock && stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [dir]   (dir: default /tmp/imgcls-slurm)" >&2; exit 2 ;;
esac
