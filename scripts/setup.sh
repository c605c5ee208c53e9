#!/usr/bin/env bash
# make setup: everything gasnap needs on a fresh Debian 12 host, as root.
# Idempotent: each step checks before it acts.  A libvirtd that already runs
# is left exactly as it is (configuration included).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEB_PACKAGES=(
    qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    libvirt-dev pkg-config gcc python3-dev python3-venv qemu-guest-agent busybox-static cpio
    e2fsprogs linux-image-amd64 procps
)
# make test only: a private PostgreSQL cluster (Debian's own is left alone),
# systemd-analyze for the units, vagrant to validate the Vagrantfile, and
# curl and jq, which the examples in docs/ use (the tests run those examples).
TEST_PACKAGES=(postgresql systemd vagrant vagrant-libvirt curl jq)
MODE=${1:-}
[ "$MODE" = "--test" ] && DEB_PACKAGES+=("${TEST_PACKAGES[@]}")
LIBVIRT_SOCK=/var/run/libvirt/libvirt-sock

say() { printf 'setup: %s\n' "$*"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: must run as root (libvirtd, lab guests)" >&2
        exit 1
    fi
}

install_packages() {
    local missing=()
    for pkg in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

libvirt_up() { virsh -q -c qemu:///system version >/dev/null 2>&1; }

start_libvirtd() {
    if libvirt_up; then
        say "libvirtd already running: left as it is"
        return
    fi
    # HOST.md's recipe for hosts without systemd: run QEMU as root, no
    # security driver, console output to files (no virtlogd).
    getent group kvm >/dev/null || groupadd -r kvm
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null \
        || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    if ! grep -q '^# gasnap lab host' /etc/libvirt/qemu.conf 2>/dev/null; then
        [ -f /etc/libvirt/qemu.conf ] && cp -n /etc/libvirt/qemu.conf /etc/libvirt/qemu.conf.dist
        cat > /etc/libvirt/qemu.conf <<'CONF'
# gasnap lab host: written by gasnap's make setup because no libvirtd ran here
# (the original is kept as qemu.conf.dist).
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
CONF
    fi
    mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt
    say "starting libvirtd"
    # On CPU 0: libvirt's cache of QEMU's capabilities is keyed on the CPUID
    # of the CPU libvirtd starts on, and a VM's vCPUs can differ; elsewhere a
    # restart could probe QEMU again (seconds before libvirtd answers).
    # libvirt still gives each QEMU all CPUs.
    taskset -c 0 libvirtd -d
    for _ in $(seq 1 100); do
        libvirt_up && return
        sleep 0.1
    done
    echo "setup: libvirtd did not come up (see /var/log/libvirt)" >&2
    exit 1
}

make_venv() {
    local stamp="$VENV/.gasnap-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    say "creating $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e '.[dev]'
    touch "$stamp"
}

build_lab_image() {
    "$VENV/bin/gasnap" lab image >/dev/null
    say "lab image ready"
}

need_root
install_packages
[ "$MODE" = "--packages" ] && exit 0  # make install: what building gasnap needs
start_libvirtd
make_venv
build_lab_image
