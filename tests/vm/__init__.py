"""QEMU/TCG test-VM harness for espfix-inspect (see tests/vm/README.md)."""
