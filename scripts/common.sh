# Sourced by the scripts next to it: the steps a fresh Debian or Ubuntu
# machine needs before the package runs, each skipped when already done.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PACKAGE...: install the Debian packages that are missing.
apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# make_venv DIRECTORY PYTHON: a virtualenv made with PYTHON unless DIRECTORY
# already holds one (Debian's python3 needs python3-venv for it).
make_venv() {
  local directory=$1 python=$2
  [ -x "$directory/bin/python" ] && return 0
  if ! "$python" -c "import ensurepip, venv" >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  echo "Creating the virtualenv $directory with $("$python" --version)"
  "$python" -m venv "$directory"
  "$directory/bin/python" -m pip install -q --upgrade pip
}

# newest_python: the path of a Python 3.13 on PATH or under pyenv, if any.
newest_python() {
  local candidate
  for candidate in "${TASK_DB_NEWEST_PYTHON:-}" python3.13 \
    "$(pyenv root 2>/dev/null)"/versions/3.13*/bin/python3.13; do
    if [ -n "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

wait_for() {  # wait_for NAME CHECK-COMMAND...
  local name=$1
  shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "$name is not answering after 60 s" >&2
  return 1
}

# start_servers: start the test servers installed here that do not answer,
# with the commands of the Debian packages (README.rst, Development).
start_servers() {
  if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "Starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
    wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432 || true
  fi
  if [ -x /usr/sbin/mariadbd ] && ! mariadb-admin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    echo "Starting MariaDB"
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for MariaDB mariadb-admin -h 127.0.0.1 -u root ping || true
  fi
  if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    echo "Starting Redis"
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis-cli -h 127.0.0.1 ping || true
  fi
}
