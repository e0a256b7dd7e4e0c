#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munged, slurmctld, slurmd) for the
# launch tests, and wait until the node is idle. Idempotent: daemons already up are left
# alone. Needs root and the Debian packages `slurmctld slurmd munge slurm-client`
# (scripts/ci_slurm.sh installs them).
#
# The config goes to /etc/slurm/slurm.conf only when no file is there or the file there
# was written by this script: a real cluster's config is never overwritten.
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by meshforge scripts/slurm/start.sh"
HOST=$(hostname -s)
LOGDIR=/var/log/slurm

for exe in munged slurmctld slurmd sinfo scontrol; do
  command -v "$exe" >/dev/null || { echo "slurm/start.sh: $exe not found; install slurmctld slurmd munge slurm-client" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm/start.sh: run as root" >&2; exit 1; }

if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  echo "slurm/start.sh: $CONF exists and was not written by this script; leaving SLURM alone" >&2
  exit 1
fi

mkdir -p "$(dirname "$CONF")" /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" /run/munge
NODE=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=([0-9]+)//')   # memory: not enforced
NEW=$(cat <<CONFEOF
$MARK
ClusterName=meshforge
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
$NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
)
changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEW" ]; then
  printf '%s\n' "$NEW" > "$CONF"
  changed=1
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: a key, then the daemon
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; \
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null >/dev/null 2>&1; then
  su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null | unmunge >/dev/null || { echo "slurm/start.sh: munge does not work" >&2; exit 1; }

if [ "$changed" = 1 ]; then   # a new config: restart whatever runs with the old one
  for pidf in /run/slurmd.pid /run/slurmctld.pid; do
    if alive "$pidf"; then kill "$(cat "$pidf")"; for _ in $(seq 50); do alive "$pidf" || break; sleep 0.1; done; fi
  done
fi
alive /run/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "UP" && break; sleep 0.2; done
alive /run/slurmd.pid || slurmd

# wait for the node to register and be idle (resume it if an earlier run left it down)
for i in $(seq 150); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc) echo "slurm: node $HOST is $state"; exit 0 ;;
    down*|drain*|drng*|fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.2
done
echo "slurm/start.sh: node $HOST did not become idle (state: ${state:-none}); see $LOGDIR" >&2
sinfo >&2 || true
tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
exit 1
