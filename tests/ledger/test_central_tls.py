"""The central store over TLS (issue 15): a real PostgreSQL that takes TLS connections only,
with a server certificate from a throwaway CA; libpq's own URL parameters do the rest.

Shipping under ``sslmode=verify-full`` gives the same figures as without TLS; a server the
given CA did not sign, or a host name the certificate does not name, fails closed (nothing
shipped, the ledger stays the spool) and shipping resumes once the CA file is right; a
connection without TLS is rejected by pg_hba; a login may authenticate by client certificate.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from gpuflops.ledger.central import CentralConfig, CentralError, CentralStore
from gpuflops.ledger.ship import RawChainReader, Shipper
from gpuflops.ledger.signing import load_or_generate
from gpuflops.ledger.store import Ledger
from tests.central_fixtures import CERT_LOGIN, PASSWORD, CentralDb, ClientTls
from tests.ledger.fleet_helpers import MADE_SHIPPERS, T0, central_jobs, fill, local_jobs


def _url(db: CentralDb, login: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://{login}@127.0.0.1:{db.pg.port}/{db.dbname}?{query}"


def _shipper(store: CentralStore, path: Path) -> Shipper:
    key, _ = load_or_generate(path.parent / "node.key")
    MADE_SHIPPERS.append(Shipper(store, RawChainReader(path), key, node="node-a", cluster="c1",
                                 period_s=5.0))
    return MADE_SHIPPERS[-1]


def _ledger(path: Path, n: int) -> None:
    led = Ledger.open(path, clock=lambda: T0)
    fill(led, random.Random(15), n, T0)
    led.close()


def _tls_of_session(store: CentralStore) -> tuple[bool, str]:
    row = store.fetch("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0]
    return bool(row[0]), str(row[1])


def test_ships_under_verify_full_with_the_same_figures(central_tls: CentralDb,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _ledger(path, 600)
    url = central_tls.url("gf_ship")
    assert "sslmode=verify-full" in url and "sslrootcert=" in url
    shipper = _shipper(central_tls.store("gf_ship"), path)
    assert shipper.run_once() == 601
    on, version = _tls_of_session(shipper.store)
    assert on and version.startswith("TLSv1."), version
    st = shipper.status()
    assert st.errors == {} and st.backlog_records == 0
    with central_tls.store("gf_read") as store:
        assert central_jobs(store, str(st.ledger_id)) == local_jobs(path)  # every bit


def test_a_connection_without_tls_is_rejected(central_tls: CentralDb) -> None:
    plain = central_tls.pg.plain_url("gf_ship", central_tls.dbname)
    with CentralStore(CentralConfig(plain, PASSWORD)) as store, \
            pytest.raises(CentralError) as err:
        store.fetch("SELECT 1")
    assert err.value.kind == "connect"
    assert "pg_hba.conf rejects connection" in str(err.value) and "no encryption" in str(err.value)
    assert PASSWORD not in str(err.value)


def test_a_server_the_ca_did_not_sign_fails_closed_and_shipping_resumes(
        central_tls: CentralDb, tls: ClientTls, tmp_path: Path) -> None:
    """libpq reads sslrootcert at every connection: fixing the file needs no restart."""
    path = tmp_path / "ledger.sqlite3"
    _ledger(path, 300)
    ca_file = tmp_path / "central-ca.crt"
    shutil.copyfile(tls.other_ca, ca_file)
    url = _url(central_tls, "gf_ship", sslmode="verify-full", sslrootcert=str(ca_file))
    shipper = _shipper(CentralStore(CentralConfig(url, PASSWORD)), path)
    for _ in range(2):
        assert shipper.run_once() == 0
    st = shipper.status()
    assert st.errors == {"connect": 2} and st.fenced is None
    assert st.backlog_records == 301 and st.central_raw_seq == 0  # the ledger is the spool
    with central_tls.store("gf_read") as store:
        assert store.fetch("SELECT count(*) FROM gpuflops.ledgers")[0][0] == 0  # nothing sent
    shutil.copyfile(tls.ca, ca_file)  # the operator installs the right CA bundle
    assert shipper.run_once() == 301
    assert shipper.status().backlog_records == 0
    with central_tls.store("gf_read") as store:
        assert central_jobs(store, str(shipper.status().ledger_id)) == local_jobs(path)


@pytest.mark.parametrize("case", ["other_ca", "wrong_host_name", "no_root_cert"])
def test_verify_full_refuses_what_it_cannot_verify(central_tls: CentralDb, tls: ClientTls,
                                                   tmp_path: Path, case: str) -> None:
    params = {"sslmode": "verify-full", "sslrootcert": str(tls.ca)}
    expected = "certificate verify failed"
    if case == "other_ca":
        params["sslrootcert"] = str(tls.other_ca)
    elif case == "wrong_host_name":  # connect to 127.0.0.1, but expect the name "localhost"
        params |= {"host": "localhost", "hostaddr": "127.0.0.1"}
        expected = 'does not match host name "localhost"'
    else:  # a root certificate file that is not there: libpq then trusts no server at all
        params["sslrootcert"] = str(tmp_path / "missing.crt")
        expected = "root certificate file"
    with CentralStore(CentralConfig(_url(central_tls, "gf_ship", **params), PASSWORD)) as store, \
            pytest.raises(CentralError) as err:
        store.fetch("SELECT 1")
    assert err.value.kind == "connect" and expected in str(err.value), str(err.value)
    assert PASSWORD not in str(err.value)


def test_a_login_may_authenticate_by_client_certificate(central_tls: CentralDb, tls: ClientTls,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _ledger(path, 200)
    base = {"sslmode": "verify-full", "sslrootcert": str(tls.ca)}
    url = _url(central_tls, CERT_LOGIN, **base, sslcert=str(tls.cert), sslkey=str(tls.key))
    shipper = _shipper(CentralStore(CentralConfig.from_options(url)), path)  # no password
    assert shipper.run_once() == 201 and shipper.status().errors == {}
    with central_tls.store("gf_read") as store:
        assert central_jobs(store, str(shipper.status().ledger_id)) == local_jobs(path)
    key_text = tls.key.read_text()
    refusals = {
        # A certificate for the same name from another CA: the server does not know its CA.
        "unknown ca": _url(central_tls, CERT_LOGIN, **base, sslcert=str(tls.rogue_cert),
                           sslkey=str(tls.rogue_key)),
        # No certificate: the pg_hba line says cert, and a password does not do instead.
        "requires a valid client certificate": _url(central_tls, CERT_LOGIN, **base,
                                                    sslcert=str(tmp_path / "none.crt")),
    }
    for expected, bad in refusals.items():
        with CentralStore(CentralConfig(bad, PASSWORD)) as store, \
                pytest.raises(CentralError) as err:
            store.fetch("SELECT 1")
        assert err.value.kind == "connect" and expected in str(err.value), str(err.value)
        assert PASSWORD not in str(err.value) and key_text not in str(err.value)


def test_the_logged_description_names_no_secret(tls: ClientTls) -> None:
    url = (f"postgresql://gf_ship@pg.example:5432/gpuflops?sslmode=verify-full"
           f"&sslrootcert={tls.ca}&sslcert={tls.cert}&sslkey={tls.key}")
    described = CentralConfig(url, PASSWORD).describe()
    assert described == {"host": "pg.example", "port": "5432", "dbname": "gpuflops",
                         "user": "gf_ship", "sslmode": "verify-full"}
