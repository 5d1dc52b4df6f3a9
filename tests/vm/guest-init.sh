#!/bin/sh
# PID 1 of the espfix-inspect test VM.  The image's stub /sbin/espfix-vm-init has
# mounted proc, sysfs, devtmpfs and the 9p share on /mnt/share, then exec'd this file
# from the share (so editing it needs no image rebuild).
#
# Share layout (written by tests/vm/run.py):
#   tree/      the project tree (copied to /tmp/project here)
#   cmd.sh     the command to run (sh script), as root, cwd = /tmp/project
#   env        KEY=VALUE lines exported to the command (ESPFIX_VM_*)
#   out/       stdout, stderr, rc, times (written here)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SHARE=/mnt/share
OUT=$SHARE/out
PROJECT=/tmp/project

say() { echo "espfix-vm: $*" >/dev/console; }

mnt() {  # mnt TYPE DIR [OPTIONS]
    [ -d "$2" ] || mkdir -p "$2"
    mountpoint -q "$2" && return 0
    if [ -n "$3" ]; then mount -t "$1" -o "$3" "$1" "$2"; else mount -t "$1" "$1" "$2"; fi ||
        say "mount $1 on $2 failed"
}

mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev
mnt devpts /dev/pts gid=5,mode=620
mnt tmpfs /dev/shm mode=1777
mnt tmpfs /tmp mode=1777
mnt tmpfs /run mode=755
mnt debugfs /sys/kernel/debug
mnt tracefs /sys/kernel/tracing
mnt bpf /sys/fs/bpf
mnt securityfs /sys/kernel/security
if ! mountpoint -q $SHARE; then
    modprobe 9pnet_virtio && modprobe 9p
    mnt 9p $SHARE trans=virtio,version=9p2000.L,msize=262144
fi
hostname espfix-vm 2>/dev/null

mkdir -p $OUT
read -r t_start _ </proc/uptime
say "init at uptime ${t_start}s, kernel $(uname -r)"

cp -a $SHARE/tree $PROJECT
mkdir -p /tmp/bin
cat >/tmp/bin/espfix-inspect <<'WRAP'
#!/bin/sh
# espfix-inspect from the shared project tree
PYTHONPATH=/tmp/project${PYTHONPATH:+:$PYTHONPATH} exec python3 -m inspector "$@"
WRAP
chmod 755 /tmp/bin/espfix-inspect

set -a
[ -f $SHARE/env ] && . $SHARE/env
set +a
export PATH=/tmp/bin:$PATH HOME=/root PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
       LANG=C.UTF-8 ESPFIX_VM_OUT=$OUT

# Variants with systemd as PID 1 (kernels.py, init="systemd"): install the .deb and
# exec systemd; a unit runs the command after boot (tests/vm/guest-systemd.sh).
if [ "${ESPFIX_VM_INIT:-script}" = systemd ]; then
    exec /bin/sh $SHARE/guest-systemd.sh
fi

read -r t_cmd _ </proc/uptime
say "running command at uptime ${t_cmd}s"
cd $PROJECT && /bin/sh $SHARE/cmd.sh >$OUT/stdout 2>$OUT/stderr </dev/null
rc=$?
read -r t_end _ </proc/uptime
echo "init=$t_start command=$t_cmd end=$t_end" >$OUT/times
echo $rc >$OUT/rc.tmp && mv $OUT/rc.tmp $OUT/rc
sync
say "command exited with status $rc at uptime ${t_end}s; powering off"
echo o >/proc/sysrq-trigger
# Only shell builtins from here on: the disk goes away under us.
while :; do :; done
