#!/bin/sh
# /usr/bin/forwarder: the packaged forwarder, in its virtual environment under /opt/forwarder.
# Every command reads the packaged configuration unless told otherwise (--config, or
# FORWARDER_CONFIG set, even to nothing), so `sudo -u forwarder forwarder status` or
# `... account list` reach the daemon's state directory (state_dir in that file) as is.
if [ -z "${FORWARDER_CONFIG+set}" ]; then
    FORWARDER_CONFIG=/etc/forwarder/forwarder.toml
    export FORWARDER_CONFIG
fi
exec /opt/forwarder/bin/forwarder "$@"
