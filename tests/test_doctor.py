"""`mtasts-policyd doctor`: the live setup checked against real parts, with the exact lines it prints.

A real daemon (start_daemon), the rig's DNS server as resolver, real `postconf -c DIR` on a
temporary main.cf and the real Exim binary on contrib/exim/exim.conf and broken copies of it.
Exit 0: no problem (warnings allowed); 1: one `problem` line per problem.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from mtasts_policyd.commands.main import main
from mtasts_policyd.net.trust import directory_certificates, file_certificates
from tests.conftest import free_port, run_cli
from tests.e2e.exim_mta import CONFIG as CONTRIB_EXIM_CONF
from tests.e2e.exim_mta import EXIM
from tests.e2e.postfix_mta import CONTRIB_MAIN_CF, MASTER_CF, POSTCONF
from tests.e2e.world import SYSTEM_BUNDLE, TRUST_VARIABLES

MAPS = "postfix, postfix-sts, postfix-legacy"


@pytest.fixture(autouse=True)
def operator_environment(monkeypatch):
    """The trust store of an operator's shell: none of the variables that would choose one."""
    for name in TRUST_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def doctor(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out.splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem ")]


def machine_store() -> str:
    """How the doctor names this machine's store (Debian: the ca-certificates bundle)."""
    cas = len(file_certificates(SYSTEM_BUNDLE) | directory_certificates("/etc/ssl/certs"))
    return f"openssl-default cafile={SYSTEM_BUNDLE} capath=/etc/ssl/certs cas={cas}"


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def doctor_config(daemon, tmp_path: Path, **sections: dict) -> str:
    """The running daemon's configuration on the machine's trust store (no fetch.ca_file), changed."""
    data = yaml.safe_load(daemon.config_path.read_text())
    data["fetch"].pop("ca_file")
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----- the common checks ---------------------------------------------------------------------


def test_all_well_with_a_running_daemon(rig, daemon, tmp_path, capsys):
    rig.dns.set(".", "NS", "a.root.test.", "b.root.test.")
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path))
    assert code == 0, lines
    assert lines == [
        f"ok socketmap: 127.0.0.1:{daemon.port} answers",
        f"ok exim-listener: 127.0.0.1:{daemon.exim_port} answers",
        f"ok trust-store: trust store={machine_store()}",
        f"ok resolver: 127.0.0.1 port {rig.dns.port} answers (. NS: 2 names)",
        f"ok cache: {tmp_path}/cache.sqlite3: {tmp_path} is writable",
        "doctor: 0 problems, 0 warnings",
    ]


def test_each_common_problem_is_one_line_saying_what_to_change(tmp_path, capsys):
    """Nothing listening, a CA file without certificates, a resolver that never answers, and a cache
    directory that cannot be created (/proc takes no files, not even root's)."""
    socketmap, exim, dns = free_port(), free_port(), free_port()
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({
        "socketmap": {"listen": [f"127.0.0.1:{socketmap}"]}, "exim": {"listen": [f"127.0.0.1:{exim}"]},
        "fetch": {"ca_file": str(empty)}, "dns": {"nameservers": ["127.0.0.1"], "port": dns, "timeout": 1},
        "cache": {"path": "/proc/mtasts-doctor/cache.sqlite3"}}))

    code, lines = doctor(capsys, "--config", str(config))

    assert code == 1
    assert lines == [
        f"problem socketmap: 127.0.0.1:{socketmap} does not answer (Connection refused): start the daemon "
        "(mtasts-policyd serve) with this configuration, or correct socketmap.listen",
        f"problem exim-listener: 127.0.0.1:{exim} does not answer (Connection refused): start the daemon "
        "(mtasts-policyd serve) with this configuration, or correct exim.listen",
        f"problem trust-store: fetch.ca_file cafile={empty} cas=0 holds no CA certificate (fetch.ca_file {empty} "
        "holds no readable PEM certificate): every policy fetch fails with certificate-invalid; install "
        "ca-certificates or set fetch.ca_file to a PEM bundle",
        f"problem resolver: 127.0.0.1 port {dns} does not answer (. NS: timed out): every lookup fails as "
        "dns-temporary and no policy is ever found; point dns.nameservers at a working resolver",
        "problem cache: cannot create files in /proc (No such file or directory): the daemon keeps the cache "
        "/proc/mtasts-doctor/cache.sqlite3 in memory only and loses it on restart; make /proc writable for the "
        "daemon's user, or set cache.path",
        "doctor: 5 problems, 0 warnings",
    ]


def test_other_programs_on_the_listeners(start_daemon, tmp_path, capsys):
    """The configured addresses answer, but not as this daemon: each listener kind on the other's port."""
    daemon = start_daemon(exim={"read_timeout": 1})
    config = doctor_config(daemon, tmp_path, socketmap={"listen": [f"127.0.0.1:{daemon.exim_port}"]},
                           exim={"listen": [f"127.0.0.1:{daemon.port}"]})

    code, lines = doctor(capsys, "--config", config)

    assert code == 1
    assert problems(lines) == [
        f"problem socketmap: 127.0.0.1:{daemon.exim_port} answered b'error timeout waiting for the request "
        "line\\n' (not a netstring), not 'NOTFOUND ': another program, or the daemon with another configuration, "
        "listens there; correct socketmap.listen or restart the daemon",
        f"problem exim-listener: 127.0.0.1:{daemon.port} answered '31:PERM malformed netstring length,', not "
        "'none': another program, or the daemon with another configuration, listens there; correct exim.listen "
        "or restart the daemon",
    ]


def test_machine_without_a_ca_store_is_a_warning(daemon, tmp_path, capsys, monkeypatch):
    """certifi is the last resort, and the doctor says the machine has no store of its own."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path))
    assert code == 0
    assert [line for line in lines if line.startswith("warning ")] == [
        f"warning trust-store: SSL_CERT_FILE={tmp_path}/none.pem holds no readable PEM certificate",
        f"warning trust-store: SSL_CERT_DIR={tmp_path} holds no certificate under a hashed name "
        f"(run openssl rehash {tmp_path})",
        f"warning trust-store: the machine has no CA store (no certificate in {tmp_path}/none.pem or {tmp_path})",
    ]
    assert [line for line in lines if line.startswith("ok trust-store")][0].startswith(
        "ok trust-store: trust store=certifi cafile=")


def test_console_script_exit_code(tmp_path):
    config = tmp_path / "down.yaml"
    config.write_text(yaml.safe_dump({"socketmap": {"listen": [f"127.0.0.1:{free_port()}"]}, "exim": {"listen": []},
                                      "cache": {"path": str(tmp_path / "cache.sqlite3")}}))
    result = run_cli("doctor", "--config", str(config))
    assert result.returncode == 1
    assert len(problems(result.stdout.splitlines())) >= 1
    assert result.stdout.splitlines()[-1].startswith("doctor: ")


# ----- Postfix: real postconf -c DIR ---------------------------------------------------------

needs_postconf = pytest.mark.skipif(not os.path.exists(POSTCONF), reason="postconf (Debian package postfix) missing")


def postfix_dir(tmp_path: Path, main_cf: str) -> str:
    directory = tmp_path / "postfix"
    directory.mkdir(exist_ok=True)
    (directory / "main.cf").write_text("compatibility_level = 3.6\n" + main_cf)
    (directory / "master.cf").write_text(MASTER_CF.format(smtp_options=""))
    # Postfix waits (up to 2 s, in 300 ms steps) for a main.cf modified within the last seconds to settle.
    settled = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(directory / name, (settled, settled))
    return str(directory)


def contrib_main_cf(port: int) -> str:
    text = CONTRIB_MAIN_CF.read_text()
    assert "socketmap:inet:127.0.0.1:8461:postfix\n" in text
    return text.replace("socketmap:inet:127.0.0.1:8461:postfix\n", f"socketmap:inet:127.0.0.1:{port}:postfix\n")


@needs_postconf
def test_postfix_with_contrib_main_cf_is_well(daemon, tmp_path, capsys):
    """contrib's main.cf (DANE by default, DNSSEC lookups on) has no problem and no warning: the
    daemon answers DANE first (dane.mode auto), so an enforce answer never replaces DANE."""
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--postfix",
                         "--postconf-dir", postfix_dir(tmp_path, contrib_main_cf(daemon.port)))
    assert code == 0, lines
    assert [line for line in lines if " postfix: " in line] == [
        f"ok postfix: smtp_tls_policy_maps entry socketmap:inet:127.0.0.1:{daemon.port}:postfix answers",
        f"ok postfix: smtp_tls_CAfile = {SYSTEM_BUNDLE} ({len(file_certificates(SYSTEM_BUNDLE))} CAs)",
        "ok postfix: smtp_tls_security_level = dane",
    ]
    assert lines[-1] == "doctor: 0 problems, 0 warnings"


def postfix_case(name: str, port: int, tmp_path: Path) -> tuple[str, list[str]]:
    """main.cf lines of one broken case, and the problem lines expected for it."""
    good_map = f"smtp_tls_policy_maps = socketmap:inet:127.0.0.1:{port}:postfix\n"
    good_ca = f"smtp_tls_CAfile = {SYSTEM_BUNDLE}\n"
    dnssec = "smtp_dns_support_level = dnssec\n"  # the daemon answers DANE (dane.mode auto, the default)
    good = good_map + good_ca + "smtp_tls_security_level = may\n" + dnssec
    add = f"add smtp_tls_policy_maps = socketmap:inet:127.0.0.1:{port}:postfix"
    defer = f"Postfix defers mail to enforce domains; set smtp_tls_CAfile = {SYSTEM_BUNDLE}"
    plain = tmp_path / "not-rehashed"
    plain.mkdir(exist_ok=True)
    shutil.copy(SYSTEM_BUNDLE, plain / "bundle.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases = {
        "no-map": (good_ca + "smtp_tls_security_level = may\n" + dnssec,
                   [f"problem postfix: smtp_tls_policy_maps asks no socketmap listener of this daemon: {add}"]),
        "wrong-port": (good.replace(f":{port}:", ":1:"),
                       ["problem postfix: smtp_tls_policy_maps asks no socketmap listener of this daemon (it has "
                        f"socketmap:inet:127.0.0.1:1:postfix): {add}"]),
        "unknown-name": (good.replace(":postfix\n", ":typo\n"),
                         [f"problem postfix: smtp_tls_policy_maps entry socketmap:inet:127.0.0.1:{port}:typo: map "
                          f"name 'typo' is not served (socketmap.maps: {MAPS}), so Postfix gets PERM and defers all "
                          "mail: use one of those names"]),
        "no-ca": (good_map + "smtp_tls_security_level = may\n" + dnssec,
                  ["problem postfix: smtp_tls_CAfile and smtp_tls_CApath are empty: Postfix can verify no MX "
                   f"certificate and defers all mail to enforce domains; set smtp_tls_CAfile = {SYSTEM_BUNDLE}"]),
        "missing-ca": (good.replace(good_ca, f"smtp_tls_CAfile = {tmp_path}/missing.pem\n"),
                       [f"problem postfix: smtp_tls_CAfile = {tmp_path}/missing.pem cannot be read: {defer}"]),
        "empty-ca": (good.replace(good_ca, f"smtp_tls_CAfile = {empty}\n"),
                     [f"problem postfix: smtp_tls_CAfile = {empty} holds no PEM certificate: {defer}"]),
        "capath-not-rehashed": (good + f"smtp_tls_CApath = {plain}\n",
                                [f"problem postfix: smtp_tls_CApath = {plain} holds no certificate under a hashed "
                                 f"name: run openssl rehash {plain}, or unset it"]),
        "level-none": (good.replace("= may", "= none"),
                       ["problem postfix: smtp_tls_security_level = none: mail without an enforce policy goes out "
                        "without TLS and DANE is off; set smtp_tls_security_level = may (or dane, with "
                        "smtp_dns_support_level = dnssec)"]),
        "level-unset": (good_map + good_ca,
                        ["problem postfix: smtp_tls_security_level = (empty): mail without an enforce policy goes "
                         "out without TLS and DANE is off; set smtp_tls_security_level = may (or dane, with "
                         "smtp_dns_support_level = dnssec)"]),
        "dane-without-dnssec": (good_map + good_ca + "smtp_tls_security_level = dane\n",
                                ["problem postfix: smtp_tls_security_level = dane needs smtp_dns_support_level = "
                                 "dnssec (it is (empty)): without it Postfix uses no DANE; set "
                                 "smtp_dns_support_level = dnssec"]),
        # The daemon answers `dane-only`/`dane` for DANE domains: without DNSSEC lookups Postfix
        # defers mail for dane-only (measured, tests/e2e/test_postfix_dane_e2e.py).
        "may-without-dnssec": (good_map + good_ca + "smtp_tls_security_level = may\n",
                               ["problem postfix: smtp_dns_support_level = (empty): the daemon answers DANE "
                                "(dane.mode auto or require), and without DNSSEC lookups Postfix defers mail for "
                                "`dane-only` and ignores `dane`; set smtp_dns_support_level = dnssec (or "
                                "dane.mode: off)"]),
    }
    return cases[name]


@needs_postconf
@pytest.mark.parametrize("case", ["no-map", "wrong-port", "unknown-name", "no-ca", "missing-ca", "empty-ca",
                                  "capath-not-rehashed", "level-none", "level-unset", "dane-without-dnssec",
                                  "may-without-dnssec"])
def test_postfix_problems(daemon, tmp_path, capsys, case):
    main_cf, expected = postfix_case(case, daemon.port, tmp_path)
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--postconf-dir",
                         postfix_dir(tmp_path, main_cf))
    assert code == 1
    assert problems(lines) == expected


DANE_WARNING = ("warning postfix: with dane.mode off an MTA-STS enforce answer replaces smtp_tls_security_level "
                "= dane for its destination (RFC 8461 §2 wants DANE to win): set dane.mode auto, or list a DANE "
                "policy table before the socketmap in smtp_tls_policy_maps")


@needs_postconf
def test_postfix_dane_is_a_warning_only_with_dane_mode_off(daemon, tmp_path, capsys):
    """With DANE as Postfix's default level, the daemon answers DANE first (dane.mode auto, the
    default; README "DANE"). With dane.mode off its enforce answer replaces DANE for a destination
    (RFC 8461 §2 wants DANE to win): a warning, unless a table is asked before the daemon."""
    socketmap = f"socketmap:inet:127.0.0.1:{daemon.port}:postfix"
    base = f"smtp_tls_CAfile = {SYSTEM_BUNDLE}\nsmtp_tls_security_level = dane\nsmtp_dns_support_level = dnssec\n"
    only_socketmap = postfix_dir(tmp_path, base + f"smtp_tls_policy_maps = {socketmap}\n")

    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--postconf-dir", only_socketmap)
    assert code == 0 and not [line for line in lines if line.startswith("warning ")]
    assert "ok postfix: smtp_tls_security_level = dane" in lines

    config = doctor_config(daemon, tmp_path, dane={"mode": "off"})
    code, lines = doctor(capsys, "--config", config, "--postconf-dir", only_socketmap)
    assert code == 0
    assert [line for line in lines if line.startswith("warning ")] == [DANE_WARNING]

    table = f"hash:{tmp_path}/tls_policy_dane"
    code, lines = doctor(capsys, "--config", config, "--postconf-dir",
                         postfix_dir(tmp_path, base + f"smtp_tls_policy_maps = {table}, {socketmap}\n"))
    assert code == 0
    assert not [line for line in lines if line.startswith("warning ")]
    assert f"ok postfix: smtp_tls_policy_maps asks {table} before this daemon: destinations it lists keep " \
           "their DANE level" in lines


@needs_postconf
def test_postfix_map_name_the_running_daemon_does_not_serve(daemon, tmp_path, capsys):
    """The configuration names a map the running daemon (started with another configuration) lacks."""
    config = doctor_config(daemon, tmp_path, socketmap={"maps": {"strict": {"testing_as_enforce": True}}})
    main_cf = (f"smtp_tls_policy_maps = socketmap:inet:127.0.0.1:{daemon.port}:strict\n"
               f"smtp_tls_CAfile = {SYSTEM_BUNDLE}\nsmtp_tls_security_level = may\nsmtp_dns_support_level = dnssec\n")
    code, lines = doctor(capsys, "--config", config, "--postconf-dir", postfix_dir(tmp_path, main_cf))
    perm = repr("PERM unknown map name 'strict'; this daemon serves postfix, postfix-legacy, postfix-sts")
    assert code == 1
    assert problems(lines) == [
        f"problem socketmap: 127.0.0.1:{daemon.port} answered {perm}, not 'NOTFOUND ': another program, or the "
        "daemon with another configuration, listens there; correct socketmap.listen or restart the daemon",
        f"problem postfix: smtp_tls_policy_maps entry socketmap:inet:127.0.0.1:{daemon.port}:strict is answered "
        f"{perm}, not 'NOTFOUND ': restart the daemon with this configuration",
    ]


@needs_postconf
def test_postfix_configuration_that_does_not_exist(daemon, tmp_path, capsys):
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--postconf-dir",
                         str(tmp_path / "nowhere"))
    assert code == 1
    binary = shutil.which("postconf") or POSTCONF
    assert problems(lines) == [
        f"problem postfix: postconf -c {tmp_path}/nowhere cannot read the Postfix configuration ({binary}: fatal: "
        f"open {tmp_path}/nowhere/main.cf: No such file or directory): give its directory with --postconf-dir DIR"]


# ----- Exim: the configuration file and the real binary --------------------------------------

needs_exim = pytest.mark.skipif(not os.path.exists(EXIM), reason="Exim is unpacked into /opt/exim4 by .ci/run")


def exim_conf(tmp_path: Path, port: int, edit=lambda text: text) -> str:
    """contrib/exim/exim.conf asking the test daemon's Exim port, with `edit` applied."""
    text = CONTRIB_EXIM_CONF.read_text()
    assert "MTASTS_EXIM = 127.0.0.1:8462\n" in text
    path = tmp_path / "exim.conf"
    path.write_text(edit(text.replace("MTASTS_EXIM = 127.0.0.1:8462\n", f"MTASTS_EXIM = 127.0.0.1:{port}\n")))
    return str(path)


def exim_doctor(capsys, daemon, tmp_path: Path, config: str) -> tuple[int, list[str]]:
    return doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--exim", "--exim-config", config,
                  "--exim-binary", EXIM)


@needs_exim
def test_exim_with_contrib_exim_conf_is_well(daemon, tmp_path, capsys):
    path = exim_conf(tmp_path, daemon.exim_port)
    code, lines = exim_doctor(capsys, daemon, tmp_path, path)
    assert code == 0, lines
    assert [line for line in lines if " exim: " in line] == [
        f"ok exim: {path}: {EXIM_PIECES_OK}",
        f"ok exim: {EXIM} -C {path} -bV accepts it",
    ]


EXIM_PIECES_OK = ("routers mtasts_temp, mtasts_dane_only, mtasts_dane, mtasts_enforce ask the daemon; transports "
                  "mtasts_dane_only, mtasts_dane, mtasts_smtp are set")


def _drop_block(text: str, name: str) -> str:
    """`text` without the driver `name:` and its option lines."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f"{name}:\n")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].strip() or not lines[i][0].isspace())
    return "".join(lines[:start] + lines[end:])


@needs_exim
@pytest.mark.parametrize("case", ["no-router", "no-transport-option", "router-after-dnslookup", "syntax",
                                  "no-temp-router", "no-dane-transport", "no-require-dane", "dane-router-late"])
def test_exim_problems(daemon, tmp_path, capsys, case):
    """Each piece of contrib's recipe: without mtasts_temp a `temp` answer (issue 9: a DNS lookup
    DANE needs failed) would fall through to the remote router and go out; without the DANE
    transports' options a `dane-only` or `dane` answer would not make Exim use DANE (RFC 8461 §2)."""
    edits = {
        "no-router": lambda text: _drop_block(text, "mtasts_enforce"),
        "no-transport-option": lambda text: text.replace("  hosts_require_tls = *\n", ""),
        "router-after-dnslookup": lambda text: text.replace(
            "mtasts_enforce:\n", "dnslookup_first:\n  driver = dnslookup\n  transport = remote_smtp\n\nmtasts_enforce:\n"),
        "no-temp-router": lambda text: _drop_block(text, "mtasts_temp"),
        "no-dane-transport": lambda text: "begin transports".join(
            (lambda routers, transports: (routers, _drop_block(transports, "mtasts_dane")))(
                *text.split("begin transports"))),
        "no-require-dane": lambda text: text.replace("  hosts_require_dane = *\n", ""),
        "dane-router-late": lambda text: text.replace(
            "mtasts_temp:\n", "dnslookup_first:\n  driver = dnslookup\n  transport = remote_smtp\n\nmtasts_temp:\n"),
        "syntax": lambda text: text.replace("keep_environment =\n", "keep_environment =\nno_such_option = yes\n"),
    }
    path = exim_conf(tmp_path, daemon.exim_port, edits[case])
    line = Path(path).read_text().splitlines().index("no_such_option = yes") + 1 if case == "syntax" else 0
    expected = {
        "no-router": [f"problem exim: {path} has no router mtasts_enforce: copy it from contrib/exim/exim.conf, "
                      "before your remote (dnslookup) router"],
        "no-transport-option": ["problem exim: transport mtasts_smtp lacks hosts_require_tls = *: enforce mail "
                                "could go out unverified; copy the transport from contrib"],
        "router-after-dnslookup": ["problem exim: router dnslookup_first comes before mtasts_enforce and routes "
                                   "remote mail first: move mtasts_enforce before it"],
        "syntax": [f"problem exim: {EXIM} -C {path} -bV rejects it: Exim configuration error in line {line} of "
                   f'{path}: main option "no_such_option" unknown'],
        "no-temp-router": [f"problem exim: {path} has no router mtasts_temp: copy it from contrib/exim/exim.conf, "
                           "before your remote (dnslookup) router"],
        "no-dane-transport": [f"problem exim: {path} has no transport mtasts_dane: copy it from contrib/exim/exim.conf"],
        "no-require-dane": ["problem exim: transport mtasts_dane_only lacks hosts_require_dane = *: DANE-only mail "
                            "could go out without DANE; copy the transport from contrib"],
        "dane-router-late": [f"problem exim: router dnslookup_first comes before {name} and routes remote mail "
                             f"first: move {name} before it"
                             for name in ("mtasts_temp", "mtasts_dane_only", "mtasts_dane", "mtasts_enforce")],
    }[case]
    code, lines = exim_doctor(capsys, daemon, tmp_path, path)
    assert code == 1
    assert problems(lines) == expected


@needs_exim
def test_exim_asking_another_address(daemon, tmp_path, capsys):
    """contrib as shipped asks 127.0.0.1:8462; this daemon's Exim listener is elsewhere."""
    code, lines = exim_doctor(capsys, daemon, tmp_path, str(CONTRIB_EXIM_CONF))
    asks = f"not an Exim listener of this daemon (exim.listen: 127.0.0.1:{daemon.exim_port}): set MTASTS_EXIM to one"
    assert code == 1
    assert problems(lines) == [
        *(f"problem exim: router {name} asks inet:127.0.0.1:8462, {asks}"
          for name in ("mtasts_temp", "mtasts_dane_only", "mtasts_dane", "mtasts_enforce")),
        f"problem exim: transport mtasts_smtp asks inet:127.0.0.1:8462, {asks}",
    ]


def test_exim_configuration_missing(daemon, tmp_path, capsys):
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--exim-config",
                         str(tmp_path / "missing.conf"))
    assert code == 1
    assert problems(lines) == [f"problem exim: cannot read {tmp_path}/missing.conf (No such file or directory): "
                               "give the configuration Exim runs with as --exim-config FILE"]


def test_exim_without_a_binary_is_a_warning(daemon, tmp_path, capsys, monkeypatch):
    if any(shutil.which(name, path="/usr/sbin:/sbin") for name in ("exim4", "exim")):
        pytest.skip("an Exim is installed on this machine")
    monkeypatch.setenv("PATH", str(tmp_path))
    path = exim_conf(tmp_path, daemon.exim_port)
    code, lines = doctor(capsys, "--config", doctor_config(daemon, tmp_path), "--exim-config", path)
    assert code == 0
    assert [line for line in lines if line.startswith("warning ")] == [
        f"warning exim: no Exim binary found (exim4, exim), so {path} was not parsed by Exim: give --exim-binary"]
