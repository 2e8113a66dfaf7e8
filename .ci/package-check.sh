#!/usr/bin/env bash
# The Debian package, tested for real on this machine (root, no systemd as PID 1):
#   build it (packaging/build-deb.sh) and lint it (lintian: no error or warning that
#   debian/forwarder.lintian-overrides does not justify); install it with apt-get; check
#   what the maintainer scripts made (user, modes, conffile, state directory, nothing
#   enabled); run the installed `forwarder check`; start the installed daemon as the
#   forwarder user with the installed unit's ExecStart line, on loopback, relaying to an
#   SMTP sink on loopback (Postfix's smtp-sink); send one message through it and see it
#   arrive; ask `forwarder status`; verify the installed unit (systemd-analyze verify and the
#   exposure score: .ci/systemd-check.sh); install it again over itself (the upgrade path:
#   `forwarder check` before any restart, the admin's configuration kept); purge; check the
#   machine is as it was.
#
#   bash .ci/package-check.sh        (as root; refuses to run where forwarder is installed)
#
# After the purge the state directory and the forwarder user remain, as Debian policy wants
# (docs/admin.md says why); this script checks that, then removes them itself when it was
# the one that made them, so the machine is left exactly as it was found.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=/var/lib/forwarder
CONF=/etc/forwarder/forwarder.toml
UNIT=/lib/systemd/system/forwarder.service

exec 9>&2  # fail() speaks on the script's stderr even from a command whose output is hidden
fail() { echo "package-check: FAIL: $*" >&9; exit 1; }
step() { echo "== package: $* ($((SECONDS - t0)) s)"; }
t0=$SECONDS

[[ $(id -u) -eq 0 ]] || fail "must run as root (it installs and purges a package)"
if dpkg-query -W -f '${db:Status-Status}' forwarder 2>/dev/null | grep -qv '^not-installed$'; then
    fail "a forwarder package is already on this machine; not touching it"
fi
for path in /opt/forwarder /etc/forwarder "$STATE"; do
    [[ ! -e $path ]] || fail "$path exists already; not touching it"
done
user_before=$(getent passwd forwarder || true)
group_before=$(getent group forwarder || true)
packages_before=$(dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\n' | sort)

work=$(mktemp -d)
chmod 0755 "$work"  # apt reads the .deb as its unprivileged _apt user
daemon_pid='' sink_pid=''
cleanup() {
    local code=$?
    # Stopped and waited for: userdel refuses a user that still runs a process.
    local pid
    for pid in $daemon_pid $sink_pid; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    if dpkg-query -W -f '${db:Status-Status}' forwarder 2>/dev/null \
            | grep -qv '^not-installed$'; then
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq forwarder >/dev/null 2>&1 || true
    fi
    rm -rf "$STATE"  # refused above if it existed: this run made it
    if [[ -z $user_before ]] && getent passwd forwarder >/dev/null; then
        userdel forwarder 2>/dev/null || true
    fi
    if [[ -z $group_before ]] && getent group forwarder >/dev/null; then
        groupdel forwarder 2>/dev/null || true
    fi
    if [[ $code -ne 0 && -f $work/daemon.log ]]; then
        echo "-- daemon log:" >&9; tail -n 40 "$work/daemon.log" >&9
    fi
    rm -rf "$work"
    exit "$code"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll a visible state, with a deadline
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.2
    done
}

step "build"
deb=$(OUT="$work" bash "$repo/packaging/build-deb.sh") || fail "the package build (above)"
[[ -f $deb ]] || fail "no package built"
echo "$deb ($(du -k "$deb" | cut -f1) KiB)"

step "lintian"
# Tags at error and warning level fail; the justified overrides are in docs/admin.md.
lintian_code=0
lintian --fail-on error,warning "$deb" >"$work/lintian.log" 2>&1 || lintian_code=$?
grep -v 'running with root privileges' "$work/lintian.log" || true
[[ $lintian_code -eq 0 ]] || fail "lintian reports errors or warnings (above)"
dpkg-deb -x "$deb" "$work/content"
if grep -rlF "/debian/forwarder/" "$work/content" >"$work/leaks"; then
    cat "$work/leaks" >&2; fail "the build's staging path is left in the files above"
fi

step "install"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log" >&2; fail "apt-get install"; }
grep -q "installed, not started" "$work/install.log" || fail "the postinst's hint is missing"
getent passwd forwarder >/dev/null || fail "no forwarder user"
[[ $(stat -c '%U:%G %a' "$CONF") == "root:forwarder 640" ]] \
    || fail "$CONF is $(stat -c '%U:%G %a' "$CONF"), not root:forwarder 640"
[[ $(stat -c '%U:%G %a' "$STATE") == "forwarder:forwarder 750" ]] \
    || fail "$STATE is $(stat -c '%U:%G %a' "$STATE"), not forwarder:forwarder 750"
grep -qx "$CONF" /var/lib/dpkg/info/forwarder.conffiles || fail "$CONF is not a conffile"
[[ -f $UNIT && -x /usr/bin/forwarder && -f /usr/lib/sysusers.d/forwarder.conf ]] \
    || fail "unit, /usr/bin/forwarder or the sysusers file missing"
[[ ! -e /etc/systemd/system/multi-user.target.wants/forwarder.service ]] \
    || fail "the package enabled the service"
ls /opt/forwarder/lib/python3.*/site-packages/forwarder/__pycache__/cli.*.pyc >/dev/null \
    || fail "the postinst did not byte-compile the application"
/opt/forwarder/bin/python - <<'EOF' || fail "bytecode names a path other than /opt/forwarder"
import glob, marshal
pyc = glob.glob("/opt/forwarder/lib/python3.*/site-packages/forwarder/__pycache__/cli.*.pyc")[0]
with open(pyc, "rb") as fh:
    fh.read(16)
    assert marshal.load(fh).co_filename.startswith("/opt/forwarder/lib/"), pyc
EOF

step "forwarder check (installed, as the forwarder user, on the packaged configuration)"
runuser -u forwarder -- /usr/bin/forwarder check --config "$CONF" --state-dir "$STATE"

step "serve with the unit's ExecStart line, relaying to a sink"
smtp_port=$(free_port) sink_port=$(free_port) metrics_port=$(free_port)
mkdir "$work/sink" && chown nobody "$work/sink"
smtp-sink -u nobody -d "$work/sink/%M." "127.0.0.1:$sink_port" 10 &
sink_pid=$!
cat >"$CONF" <<EOF
state_dir = "$STATE"
listen = "127.0.0.1:$smtp_port"
domains = ["sigma-clermont.fr"]
hostname = "forwarder.package-check.test"
smarthost = "127.0.0.1:$sink_port"
postmaster = "it-team@school-it.example"
metrics_listen = "127.0.0.1:$metrics_port"
EOF
runuser -u forwarder -- /usr/bin/forwarder account add grad@sigma-clermont.fr \
    --redirect grad@perso.example --no-dns-check >/dev/null
runuser -u forwarder -- /usr/bin/forwarder account delete grad@sigma-clermont.fr >/dev/null
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
[[ $exec_start == /usr/bin/forwarder\ serve\ * ]] || fail "unexpected ExecStart: $exec_start"
user=$(sed -n 's/^User=//p' "$UNIT") group=$(sed -n 's/^Group=//p' "$UNIT")
umask_unit=$(sed -n 's/^UMask=//p' "$UNIT")
# What systemd would do for this unit, short of its sandbox: the user and group, the
# umask, the environment, the working directory /, no inherited standard input.
(
    cd / && umask "$umask_unit"
    # shellcheck disable=SC2086  # ExecStart is a command line: split it as systemd does
    exec env -i PATH=/usr/bin:/bin PYTHONUNBUFFERED=1 \
        setpriv --reuid="$user" --regid="$group" --init-groups -- $exec_start </dev/null
) >"$work/daemon.log" 2>&1 &
daemon_pid=$!
daemon_up() {
    kill -0 "$daemon_pid" 2>/dev/null || fail "the daemon exited at start-up (its log below)"
    runuser -u forwarder -- /usr/bin/forwarder status
}
wait_for 60 "forwarder status to answer" daemon_up

step "one message through the installed daemon"
token="package-check-$RANDOM$RANDOM"
swaks --server "127.0.0.1:$smtp_port" --from noreply@jobteaser.example \
    --to grad@sigma-clermont.fr --header "Subject: $token" --body "hello from $token" \
    >"$work/swaks.log" 2>&1 || { cat "$work/swaks.log" >&2; fail "swaks"; }
wait_for 30 "the message at the sink" grep -rlq "hello from $token" "$work/sink"
got=$(grep -rl "hello from $token" "$work/sink")
grep -q '^X-Rcpt-Args: <grad@perso.example>' "$got" || fail "not sent to the redirect"
grep -q '^X-Mail-Args: <SRS0=.*@sigma-clermont.fr>' "$got" || fail "sender not SRS-rewritten"
counted() {  # the acceptor process reports its counts every second
    runuser -u forwarder -- /usr/bin/forwarder status --json | python3 -c '
import json, sys
hour = json.load(sys.stdin)["last_hour"]
sys.exit(not (hour["accepted"] == 1 and hour["delivered"] == 1))'
}
wait_for 15 "status to count the message in and out" counted
runuser -u forwarder -- /usr/bin/forwarder status
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://127.0.0.1:$metrics_port/metrics" | grep -q '^process_resident_memory_bytes ' \
    || fail "no process metrics on the endpoint"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || fail "the daemon did not stop cleanly on SIGTERM (status $?)"
daemon_pid=''
if stopped=$(runuser -u forwarder -- /usr/bin/forwarder status 2>&1); then
    fail "status exits 0 with the daemon stopped"
fi
[[ $stopped == "forwarder: the daemon is not running (nothing answers on $STATE/status.sock)" ]] \
    || fail "status with the daemon stopped says: $stopped"
[[ -z $(find "$STATE" ! -user forwarder) ]] || fail "files in $STATE not owned by forwarder"

step "the installed unit"
UNIT=$UNIT bash "$repo/.ci/systemd-check.sh"

step "upgrade (the same package again): the postinst checks before any restart"
cp -p "$CONF" "$work/conf.saved"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >"$work/upgrade.log" 2>&1 \
    || { cat "$work/upgrade.log" >&2; fail "dpkg -i over the installed package"; }
grep -q "configuration and storage OK" "$work/upgrade.log" \
    || { cat "$work/upgrade.log" >&2; fail "the upgrade did not run forwarder check"; }
cmp -s "$CONF" "$work/conf.saved" || fail "the upgrade changed the admin's configuration"
[[ $(stat -c '%U:%G %a' "$CONF") == "root:forwarder 640" ]] || fail "$CONF mode after upgrade"
echo 'no_such_key = 1' >>"$CONF"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >"$work/upgrade.log" 2>&1 \
    || { cat "$work/upgrade.log" >&2; fail "a failing check must not fail the upgrade"; }
grep -q "no_such_key" "$work/upgrade.log" && grep -q "was not restarted" "$work/upgrade.log" \
    || { cat "$work/upgrade.log" >&2; fail "the failed check is not reported"; }
cp -p "$work/conf.saved" "$CONF"

step "purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq forwarder >"$work/purge.log" 2>&1 \
    || { cat "$work/purge.log" >&2; fail "apt-get purge"; }
for path in /opt/forwarder /usr/bin/forwarder "$UNIT" /usr/lib/sysusers.d/forwarder.conf \
        /etc/forwarder /usr/share/doc/forwarder /usr/share/man/man1/forwarder.1.gz \
        /var/lib/systemd/deb-systemd-helper-enabled/forwarder.service.dsh-also; do
    [[ ! -e $path && ! -L $path ]] || fail "$path is left after purge"
done
! dpkg-statoverride --list "$CONF" >/dev/null || fail "the statoverride is left after purge"
! dpkg-query -W forwarder >/dev/null 2>&1 || fail "dpkg still knows the package"
# Kept on purpose: the mail queue and directory, and the user owning them.
[[ -f $STATE/queue.sqlite3 && -f $STATE/directory.sqlite3 ]] || fail "purge removed $STATE"
getent passwd forwarder >/dev/null || fail "purge removed the forwarder user"

step "the machine as it was"
rm -rf "$STATE"
[[ -n $user_before ]] || userdel forwarder
[[ -n $group_before ]] || ! getent group forwarder >/dev/null || groupdel forwarder
[[ $(getent passwd forwarder || true) == "$user_before" ]] || fail "user forwarder differs"
[[ $(getent group forwarder || true) == "$group_before" ]] || fail "group forwarder differs"
packages_after=$(dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\n' | sort)
[[ $packages_after == "$packages_before" ]] \
    || { diff <(echo "$packages_before") <(echo "$packages_after") >&2 || true
         fail "installed packages differ"; }
echo "package-check: ok ($((SECONDS - t0)) s)"
