set -x
espfix-inspect validate; echo "rc=$?"
espfix-inspect stacks; echo "rc=$?"
espfix-inspect exercise --control; echo "rc=$?"
espfix-inspect stacks; echo "rc=$?"
setpriv --reuid=65534 --regid=65534 --clear-groups python3 -m inspector validate; echo "rc=$?"
echo 2 > /proc/sys/kernel/kptr_restrict; espfix-inspect validate; echo "rc=$?"; echo 0 > /proc/sys/kernel/kptr_restrict
espfix-inspect validate --symbols /boot/System.map-$(uname -r); echo "rc=$?"
espfix-inspect snapshot -o /tmp/s.core; echo "rc=$?"
