#!/bin/sh
# The deployed path in the test VM: the .deb installed, systemd as PID 1.
#
#   guest-systemd.sh          exec'd by guest-init.sh (still PID 1) for variants with
#                             init "systemd": installs the .deb from the share, points
#                             Prometheus at node_exporter with short intervals, enables
#                             espfix-inspect-watch and the test unit, then execs systemd.
#   guest-systemd.sh run      ExecStart of espfix-vm-test.service, after multi-user.target
#                             and boot-complete.target: runs cmd.sh like guest-init.sh
#                             does, writes out/{stdout,stderr,rc,times}, powers off.
#
# The image boots with -snapshot, so nothing here survives the run.  The image
# already has systemd, systemd-sysv, prometheus and prometheus-node-exporter (both
# enabled by their packages); only the .deb comes in through the share.
SHARE=/mnt/share
OUT=$SHARE/out
# guest-init.sh copied the tree to /tmp/project, but systemd-tmpfiles-setup empties /tmp
# at boot (tmpfiles.d/tmp.conf "D /tmp"): the tree moves to /run, which it leaves alone.
PROJECT=/run/espfix-project
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "espfix-vm: $*" >/dev/console; }

if [ "$1" = run ]; then
    set -a
    . $SHARE/env
    set +a
    export HOME=/root PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
           ESPFIX_VM_OUT=$OUT
    read -r t_cmd _ </proc/uptime
    say "systemd: running command at uptime ${t_cmd}s"
    cd $PROJECT && /bin/sh $SHARE/cmd.sh >$OUT/stdout 2>$OUT/stderr </dev/null
    rc=$?
    read -r t_end _ </proc/uptime
    journalctl -b --no-pager -o short-monotonic >$OUT/journal.txt 2>&1
    echo "init=$(cat /run/espfix-vm-init-time) command=$t_cmd end=$t_end" >$OUT/times
    echo $rc >$OUT/rc.tmp && mv $OUT/rc.tmp $OUT/rc
    sync
    say "command exited with status $rc at uptime ${t_end}s; powering off"
    echo o >/proc/sysrq-trigger
    sleep 60
    exit 0
fi

fail() {  # a boot that cannot be set up still reports: status 97 and the reason
    say "systemd boot setup failed: $*"
    echo "systemd boot setup failed: $*" >>$OUT/stderr
    echo 97 >$OUT/rc
    sync
    echo o >/proc/sysrq-trigger
    while :; do :; done
}

read -r t_init _ </proc/uptime
echo "$t_init" >/run/espfix-vm-init-time
mv /tmp/project $PROJECT || fail "mv /tmp/project $PROJECT"
set -- $SHARE/deb/*.deb
[ -f "$1" ] || fail "no .deb in the share (run_in_vm(deb=...))"
dpkg -i "$@" >$OUT/dpkg.log 2>&1 || fail "dpkg -i $*: $(tail -3 $OUT/dpkg.log)"
read -r t_dpkg _ </proc/uptime
say "dpkg -i $(basename "$1") done at uptime ${t_dpkg}s"

# watch is shipped disabled (it needs node_exporter's textfile directory): enable it as
# an administrator would.  validate is enabled by the package itself.
systemctl enable espfix-inspect-watch.service >>$OUT/dpkg.log 2>&1 ||
    fail "systemctl enable espfix-inspect-watch.service"

# Prometheus: scrape the local node_exporter every 5 s (a full default node_exporter
# scrape must fit in the timeout under TCG), evaluate the shipped rules as often.
cat >/etc/prometheus/prometheus.yml <<'EOF'
# espfix-inspect test VM (tests/vm/guest-systemd.sh): short intervals for the test
global:
  scrape_interval: 5s
  scrape_timeout: 5s
  evaluation_interval: 5s
rule_files:
  - /usr/share/espfix-inspect/prometheus/espfix-inspect.rules.yml
scrape_configs:
  - job_name: node
    static_configs:
      - targets: ['127.0.0.1:9100']   # Go resolves localhost by DNS without /etc/hosts
EOF

cat >/etc/systemd/system/espfix-vm-test.service <<EOF
[Unit]
Description=espfix-inspect test VM: the test command (tests/vm/guest-systemd.sh)
After=multi-user.target boot-complete.target

[Service]
Type=oneshot
ExecStart=/bin/sh $SHARE/guest-systemd.sh run
StandardOutput=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
systemctl enable espfix-vm-test.service >>$OUT/dpkg.log 2>&1 || fail "enable espfix-vm-test"
say "exec systemd at uptime $(cut -d' ' -f1 /proc/uptime)s"
exec /lib/systemd/systemd
