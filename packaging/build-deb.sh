#!/usr/bin/env bash
# Builds the Debian package from this checkout, with Debian's own tools (debhelper):
#
#   bash packaging/build-deb.sh          ->  dist/forwarder_<version>_<arch>.deb
#
# Needs the packages debhelper and python3-venv (`apt-get install debhelper python3-venv`);
# the only network it uses is the Python package index pip is set up for (the wheels of the
# dependencies). It builds in a temporary copy of the checkout (the files git knows, tracked
# or new), so the checkout stays clean: dpkg-buildpackage writes its staging area under
# debian/ and its results next to the source tree. OUT=DIR puts the .deb elsewhere.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/dist}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$out"

if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files that exist (a deleted one is skipped).
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard) \
        | while IFS= read -r -d '' f; do
              [[ -e $repo/$f || -L $repo/$f ]] && printf '%s\0' "$f"
          done >"$work/files"
    tar -C "$repo" --null -T "$work/files" -cf - | tar -C "$work/src" -xf -
else
    tar -C "$repo" --exclude=.venv --exclude=dist --exclude=.git -cf - . \
        | tar -C "$work/src" -xf -
fi

# The Build-Depends of debian/control, but not Debian's implicit build-essential: nothing
# here is compiled, so a compiler is not needed.
(cd "$work/src" && dpkg-checkbuilddeps -I) || {
    echo "build-deb: install the build dependencies above (apt-get install ...)" >&2
    exit 1
}
start=$SECONDS
(cd "$work/src" && dpkg-buildpackage -b --no-sign --no-check-builddeps \
    >"$work/build.log" 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (last lines above)" >&2
    exit 1
}
debs=("$work"/*.deb)
mv "${debs[@]}" "$out/"
for deb in "${debs[@]}"; do
    echo "$out/$(basename "$deb")"
done
echo "build-deb: built in $((SECONDS - start)) s" >&2
