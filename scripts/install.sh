#!/usr/bin/env bash
# make install: gasnap in its own virtual environment under PREFIX, the
# systemd units (paths rewritten to PREFIX and SYSCONFDIR), the operator docs,
# and a commented default configuration (an existing one is never replaced).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/gasnap}
SYSCONFDIR=${SYSCONFDIR:-/etc/gasnap}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}

say() { printf 'install: %s\n' "$*"; }

say "gasnap into $PREFIX"
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --upgrade pip >/dev/null
"$PREFIX/bin/pip" install -q .

say "units into $UNITDIR"
install -d -m 0755 "$UNITDIR" "$PREFIX/share/doc/gasnap"
install -d -m 0750 "$SYSCONFDIR"
for unit in systemd/*.service systemd/*.timer; do
    sed -e "s|/opt/gasnap|$PREFIX|g" -e "s|/etc/gasnap|$SYSCONFDIR|g" "$unit" \
        > "$UNITDIR/$(basename "$unit")"
    chmod 0644 "$UNITDIR/$(basename "$unit")"
done
install -m 0644 docs/*.md "$PREFIX/share/doc/gasnap/"

install -m 0640 config/agent.toml "$SYSCONFDIR/agent.toml.example"
if [ -e "$SYSCONFDIR/agent.toml" ]; then
    say "$SYSCONFDIR/agent.toml exists: left as it is"
else
    install -m 0640 config/agent.toml "$SYSCONFDIR/agent.toml"
fi
"$PREFIX/bin/gasnap" serve --config "$SYSCONFDIR/agent.toml" --check-config

if [ -d /run/systemd/system ] && [ "$UNITDIR" = /etc/systemd/system ]; then
    systemctl daemon-reload
    say "next: systemctl enable --now gasnap.service"
fi
