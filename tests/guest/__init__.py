"""Integration tests against a real Linux guest under QEMU (see build-guest.sh)."""
