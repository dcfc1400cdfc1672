# Sourced by scripts/test and scripts/mutants (after _venv.sh): the system tools the tests drive.
# System tools some tests drive (PgBouncer in transaction mode, as Supabase's Supavisor on port 6543): pip
# has no build of them, so Debian's packages are installed when missing and we may (root, apt-get).
need=()
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]} with apt-get (for the pooler tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]} and cannot apt-get install: those tests fail in CI and are skipped elsewhere" >&2
  fi
fi

# promtool, prometheus and amtool (tests/test_deploy.py, tests/test_metrics.py, tests/test_alerts_live.py): only
# the binaries, taken out of Debian's prometheus and prometheus-alertmanager packages into the venv; `apt-get
# install` would also start the servers as system services. Without them those tests fail in CI (CI=true) and
# are skipped elsewhere.
fetch_tools() {  # fetch_tools DEBIAN_PACKAGE BINARY...: the binaries not found yet, from one download
  local package="$1" binary deb_dir missing=()
  shift
  for binary in "$@"; do
    command -v "$binary" >/dev/null || [ -x "$VENV/bin/$binary" ] || missing+=("$binary")
  done
  if [ ${#missing[@]} -eq 0 ] || ! command -v apt-get >/dev/null; then return; fi
  echo "fetching ${missing[*]} from Debian's $package package into $VENV/bin (apt-get download, dpkg-deb -x)"
  deb_dir="$(mktemp -d)"
  if (cd "$deb_dir" && { apt-get download "$package" >/dev/null 2>&1 \
        || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download "$package" >/dev/null; }; }); then
    dpkg-deb -x "$deb_dir"/"$package"_*.deb "$deb_dir/x" \
      && for binary in "${missing[@]}"; do cp "$deb_dir/x/usr/bin/$binary" "$VENV/bin/$binary"; done
  else
    echo "could not download Debian's $package package: the ${missing[*]} tests fail in CI" >&2
  fi
  rm -rf "$deb_dir"
}
fetch_tools prometheus promtool prometheus
fetch_tools prometheus-alertmanager amtool
