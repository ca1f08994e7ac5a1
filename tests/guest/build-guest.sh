#!/usr/bin/env bash
# Build the test guest: the stock Debian kernel plus a busybox-static initramfs
# with a real getty on ttyS0. Output goes to tests/guest/out/ (git-ignored):
#   vmlinuz             the kernel, copied from /boot (package linux-image-amd64)
#   vmlinux             the same kernel uncompressed, when it has CONFIG_PVH: QEMU boots
#                       it directly (PVH entry), skipping the BIOS real-mode setup and
#                       the guest's own xz decompression, which take seconds under TCG
#   initramfs.cpio.gz   reproducible: fixed mtimes, sorted names, root-owned, gzip -n
#   cmdline             the kernel command line the tests and `make run-vm` use
#   guest.env           KERNEL_VERSION, GUEST_USER, GUEST_PASSWORD, sha256 of both images
# Missing Debian packages (busybox-static, cpio, linux-image-amd64, qemu-system-x86, openssl)
# are installed with apt-get when this runs as root.
#
#   tests/guest/build-guest.sh          build when missing or out of date
#   tests/guest/build-guest.sh --force  rebuild
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/out"
force=0
[ "${1:-}" = "--force" ] && force=1

GUEST_USER=tester
GUEST_PASSWORD=relayd-test
GUEST_HOSTNAME=relayd-guest
# A fixed salt keeps the image byte-for-byte reproducible.
SALT=relaydguest
# 2024-01-01T00:00:00Z: every file in the image gets this mtime.
EPOCH="${SOURCE_DATE_EPOCH:-1704067200}"
# The full boot log (from "Linux version") reaches ttyS0; rcS then quiets the console
# to warnings, as `quiet` would, so late kernel chatter does not land in test output.
CMDLINE="console=ttyS0,115200 panic=-1"

"$repo/scripts/ensure-system-packages.sh" busybox-static cpio linux-image-amd64 qemu-system-x86 openssl

# The newest stock kernel in /boot (what linux-image-amd64 installed).
kernel="$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' | sort -V | tail -n1)"
if [ -z "$kernel" ] || [ ! -r "$kernel" ]; then
  echo "build-guest: no readable /boot/vmlinuz-*-amd64 (install linux-image-amd64)" >&2
  exit 1
fi
kver="${kernel#/boot/vmlinuz-}"
config="/boot/config-$kver"
if [ -r "$config" ]; then
  for opt in CONFIG_SERIAL_8250=y CONFIG_SERIAL_8250_CONSOLE=y CONFIG_MAGIC_SYSRQ_SERIAL=y \
             CONFIG_BLK_DEV_INITRD=y CONFIG_DEVTMPFS=y; do
    grep -qx "$opt" "$config" || { echo "build-guest: $kernel lacks $opt" >&2; exit 1; }
  done
fi
busybox=/bin/busybox  # busybox-static's: no shared libraries needed in the image

# Everything that goes into the image, hashed: rebuild only when it changes.
self_sum="$(cat "${BASH_SOURCE[0]}" "$busybox" | sha256sum | cut -d' ' -f1)"
stamp="$kver $self_sum"
if [ $force -eq 0 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  echo "build-guest: $out is up to date"
  exit 0
fi

started=$(date +%s%N)
mkdir -p "$out"
root="$(mktemp -d "$out/.root.XXXXXX")"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,proc,sys,dev,run,tmp,root,home/$GUEST_USER}
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
# One symlink per applet, where busybox says it lives (/bin/sh, /sbin/getty, ...).
"$busybox" --list-full | while read -r applet; do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done
# The kernel runs /init from an initramfs; busybox runs init when called so.
ln -sf /bin/busybox "$root/init"

cat > "$root/etc/inittab" <<INITTAB
# busybox init: mount, enable SysRq, then a real getty on the serial console.
::sysinit:/etc/init.d/rcS
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
INITTAB

cat > "$root/etc/init.d/rcS" <<'RCS'
#!/bin/sh
# Early boot of the relayd test guest (initramfs only, no disk).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
# Magic SysRq over the serial line: BREAK, then a key.
sysctl -q -w kernel.sysrq=1
# Console log level 4 from here on (SysRq output is printed regardless).
sysctl -q -w kernel.printk="4 4 1 7"
chown -R 1000:1000 /home/tester
chmod 0700 /home/tester
chmod 0600 /etc/shadow
echo "relayd-guest: init done ($(uname -r), sysrq=$(cat /proc/sys/kernel/sysrq))"
RCS
chmod 0755 "$root/etc/init.d/rcS"

hash="$(openssl passwd -6 -salt "$SALT" "$GUEST_PASSWORD")"
cat > "$root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/bin/sh
$GUEST_USER:x:1000:1000:relayd test account:/home/$GUEST_USER:/bin/sh
PASSWD
cat > "$root/etc/shadow" <<SHADOW
root:!:19723:0:99999:7:::
$GUEST_USER:$hash:19723:0:99999:7:::
SHADOW
cat > "$root/etc/group" <<GROUP
root:x:0:
tty:x:5:
$GUEST_USER:x:1000:
GROUP
echo "$GUEST_HOSTNAME" > "$root/etc/hostname"
printf 'relayd test guest (busybox on Linux \\r), serial \\l\n\n' > "$root/etc/issue"
cat > "$root/etc/profile" <<'PROFILE'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PS1='\u@\h:\w\$ '
PROFILE
: > "$root/etc/fstab"

# Reproducible archive: sorted names, one mtime, uid/gid 0, gzip without a name or time.
find "$root" -exec touch -h -d "@$EPOCH" {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
  | cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) \
  | gzip -n -9 > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp "$kernel" "$out/vmlinuz.tmp"
chmod 0644 "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
rm -f "$out/vmlinux"
if grep -qx CONFIG_PVH=y "$config" 2>/dev/null; then
  # The bzImage payload is one compressed ELF (xz on Debian amd64; gzip elsewhere).
  python3 - "$out/vmlinuz" "$out/vmlinux.tmp" <<'PY' && mv "$out/vmlinux.tmp" "$out/vmlinux"
import gzip, lzma, sys, zlib
image = open(sys.argv[1], "rb").read()
for magic, decompress in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
                          (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(31).decompress(b))):
    at = image.find(magic)
    while at >= 0:
        try:
            elf = decompress(image[at:])
        except (lzma.LZMAError, zlib.error, gzip.BadGzipFile):
            elf = b""
        if elf.startswith(b"\x7fELF"):
            open(sys.argv[2], "wb").write(elf)
            sys.exit(0)
        at = image.find(magic, at + 1)
sys.exit("build-guest: no ELF payload found in the bzImage; QEMU will boot vmlinuz")
PY
  rm -f "$out/vmlinux.tmp"
fi
echo "$CMDLINE" > "$out/cmdline"
cat > "$out/guest.env" <<ENV
KERNEL_VERSION=$kver
GUEST_USER=$GUEST_USER
GUEST_PASSWORD=$GUEST_PASSWORD
GUEST_HOSTNAME=$GUEST_HOSTNAME
VMLINUZ_SHA256=$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)
INITRAMFS_SHA256=$(sha256sum "$out/initramfs.cpio.gz" | cut -d' ' -f1)
ENV
echo "$stamp" > "$out/stamp"
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
echo "build-guest: $kver + initramfs ($(stat -c %s "$out/initramfs.cpio.gz") bytes)" \
  "in ${elapsed_ms} ms -> $out"
