"""The pg_server fixture really serves scram (plain and verify-full TLS), md5 and trust logins."""

from __future__ import annotations

import psycopg
import pytest

from fixtures.postgres import PgServer


def _select_one(dsn: str) -> tuple[int, bool, str]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT 1, coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false),"
            " current_user"
        ).fetchone()
        assert row is not None
        return row[0], row[1], row[2]


def test_scram_plain(pg_server: PgServer) -> None:
    assert _select_one(pg_server.dsn(sslmode="disable")) == (1, False, pg_server.service_user)


def test_scram_verify_full(pg_server: PgServer) -> None:
    if not pg_server.ssl_mode_available:
        pytest.skip("PostgreSQL build without SSL")
    dsn = pg_server.dsn(host="localhost", sslmode="verify-full", sslrootcert=str(pg_server.ca_cert))
    assert _select_one(dsn) == (1, True, pg_server.service_user)


def test_ssl_only_role_needs_tls(pg_server: PgServer) -> None:
    if not pg_server.ssl_mode_available:
        pytest.skip("PostgreSQL build without SSL")
    user = pg_server.ssl_user
    ok = pg_server.dsn(user=user, sslmode="verify-ca", sslrootcert=str(pg_server.ca_cert))
    assert _select_one(ok) == (1, True, user)
    with pytest.raises(psycopg.OperationalError):
        _select_one(pg_server.dsn(user=user, sslmode="disable"))


def test_md5(pg_server: PgServer) -> None:
    stored = pg_server.psql(
        f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_server.md5_user}'"
    )
    assert stored.startswith("md5")
    assert _select_one(pg_server.dsn(user=pg_server.md5_user, sslmode="disable"))[0] == 1


def test_trust(pg_server: PgServer) -> None:
    assert _select_one(pg_server.dsn(user=pg_server.trust_user, sslmode="disable"))[0] == 1


def test_wrong_password_rejected(pg_server: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _select_one(pg_server.dsn(password="wrong", sslmode="disable"))


def test_url_and_psql_helpers(pg_server: PgServer) -> None:
    assert _select_one(pg_server.url(sslmode="disable"))[0] == 1
    assert pg_server.psql("SELECT current_database()") == pg_server.database
    owner = pg_server.psql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    )
    assert owner == pg_server.service_user
