"""[[dkim_sign]] and [arc_seal] without a server: which messages each entry signs, the
errors of the tables and key files, and the key formats read."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgate.queue.dkim_keys import (
    generate_key,
    load_signing_key,
    txt_record,
    write_key_file,
)
from mailgate.queue.signing import MessageSigner, message_signer
from mailgate.server.options import PolicySection
from mailgate.settings import ConfigError

OURS = ("example.com",)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("keys")
    made = {}
    for name, algorithm in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
        path = directory / f"{name}.key"
        write_key_file(path, generate_key(algorithm))  # type: ignore[arg-type]
        made[name] = path
    return made


def section(number: int, **values: Any) -> PolicySection:
    return PolicySection("dkim_sign", values, None, f"mailgate.toml [[dkim_sign]] #{number}")


def signer(keys: dict[str, Path], *entries: dict[str, Any]) -> MessageSigner:
    sections = [
        section(number, **{"selector": "s1", "key_file": str(keys["rsa"]), **entry})
        for number, entry in enumerate(entries, 1)
    ]
    made = message_signer(
        sections, hostname="mx.example.com", relay_networks=(ipaddress.ip_network("192.0.2.0/24"),)
    )
    assert made is not None
    return made


def mail(author: str | None) -> bytes:
    head = f"From: Someone <{author}>\r\n" if author is not None else ""
    return (head + "To: x@example.net\r\nSubject: hi\r\n\r\nbody\r\n").encode()


def signed_by(
    made: MessageSigner,
    author: str | None,
    *,
    sender: str = "",
    client: str = "192.0.2.7",
    user: str | None = None,
) -> list[str]:
    """The d= of each signature the signer adds."""
    added, what = made.sign(mail(author), envelope_sender=sender, client=client, user=user)
    assert added.count(b"DKIM-Signature:") == len(what)
    return [item.split()[1].removeprefix("d=") for item in what]


@pytest.mark.parametrize(
    ("author", "signed"),
    [
        ("alice@example.com", True),
        ("alice@EXAMPLE.COM", True),
        ("news@lists.example.com", True),  # a subdomain: DMARC's relaxed alignment
        ("alice@notexample.com", False),  # not a subdomain, only a longer name
        ("alice@example.com.evil.test", False),
        ("alice@other.test", False),
    ],
)
def test_sender_domain_is_the_default(keys: dict[str, Path], author: str, signed: bool) -> None:
    made = signer(keys, {"domain": "example.com"})
    assert signed_by(made, author) == (["example.com"] if signed else [])


def test_without_a_from_field_the_envelope_sender_is_the_author(keys: dict[str, Path]) -> None:
    made = signer(keys, {"domain": "example.com"})
    assert signed_by(made, None, sender="a@example.com") == ["example.com"]
    assert signed_by(made, None, sender="a@other.test") == []
    assert signed_by(made, None, sender="") == []
    # The From field decides when there is one, whatever the envelope says.
    assert signed_by(made, "a@other.test", sender="a@example.com") == []


def test_only_mail_of_our_users_is_signed(keys: dict[str, Path]) -> None:
    made = signer(keys, {"domain": "example.com"})
    # From relay_networks, or authenticated from anywhere: ours.
    assert signed_by(made, "a@example.com", client="192.0.2.7") == ["example.com"]
    assert signed_by(made, "a@example.com", client="203.0.113.9", user="a") == ["example.com"]
    # Anyone else claiming our domain in From gets no signature.
    assert signed_by(made, "a@example.com", client="203.0.113.9") == []
    assert signed_by(made, "a@example.com", client="not an address") == []
    assert signed_by(made, "a@example.com", client="::ffff:192.0.2.7") == ["example.com"]


@pytest.mark.parametrize(
    ("match", "author", "user", "signed"),
    [
        ("*", "x@anything.test", None, True),
        (["partner.test"], "x@partner.test", None, True),
        (["partner.test"], "x@sub.partner.test", None, False),
        (["*.partner.test"], "x@sub.partner.test", None, True),
        (["*.partner.test"], "x@partner.test", None, False),
        (["boss@partner.test"], "Boss@PARTNER.test", None, True),
        (["boss@partner.test"], "other@partner.test", None, False),
        ("user:alice", "x@anything.test", "alice", True),
        ("user:alice", "x@anything.test", "bob", False),
        ("user:*", "x@anything.test", "bob", True),
        ("user:*", "x@anything.test", None, False),
        (["user:alice", "sender-domain"], "x@example.com", None, True),
        (["user:alice", "sender-domain"], "x@other.test", "carol", False),
    ],
)
def test_match_items(
    keys: dict[str, Path], match: Any, author: str, user: str | None, signed: bool
) -> None:
    made = signer(keys, {"domain": "example.com", "match": match})
    assert signed_by(made, author, user=user) == (["example.com"] if signed else [])


def test_several_entries_sign_in_table_order(keys: dict[str, Path]) -> None:
    made = signer(
        keys,
        {"domain": "example.com"},
        {
            "domain": "example.com",
            "selector": "e1",
            "key_file": str(keys["ed"]),
            "algorithm": "ed25519-sha256",
        },
        {"domain": "example.org"},
        {"domain": "esp.test", "match": "*"},
    )
    added, what = made.sign(
        mail("a@example.com"), envelope_sender="", client="192.0.2.1", user=None
    )
    assert what == [
        "dkim d=example.com s=s1 rsa-sha256",
        "dkim d=example.com s=e1 ed25519-sha256",
        "dkim d=esp.test s=s1 rsa-sha256",
    ]
    assert added.startswith(b"DKIM-Signature: v=1; a=rsa-sha256")


def test_headers_setting_sets_h(keys: dict[str, Path]) -> None:
    made = signer(keys, {"domain": "example.com", "headers": ["From", "from", "Subject"]})
    added, _ = made.sign(mail("a@example.com"), envelope_sender="", client="192.0.2.1", user=None)
    assert b"h=from : from : subject;" in added.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"selector": "s1", "key_file": "k"},
            "[[dkim_sign]] #1: [[dkim_sign]] needs the signing domain: add domain",
        ),
        ({"domain": "example.com", "key_file": "k"}, "needs a selector: add selector"),
        ({"domain": "example.com", "selector": "s1"}, "needs the private key file: add key_file"),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "algoritm": "x"},
            "unknown key 'algoritm' (did you mean 'algorithm'?)",
        ),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "algorithm": "rsa-sha1"},
            "algorithm:",
        ),
        (
            {"domain": "not a domain", "selector": "s1", "key_file": "k"},
            "domain: 'not a domain' is not a valid host name",
        ),
        (
            {"domain": "example.com", "selector": "s_1!", "key_file": "k"},
            "selector: 's_1!' is not a selector",
        ),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "headers": ["to"]},
            "headers: must include from",
        ),
        (
            {
                "domain": "example.com",
                "selector": "s1",
                "key_file": "k",
                "headers": ["from", "received"],
            },
            "received must not be signed",
        ),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "match": ["example..com"]},
            "match: 'example..com' is not sender-domain",
        ),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "match": ["user:"]},
            "user: needs a name",
        ),
        (
            {"domain": "example.com", "selector": "s1", "key_file": "k", "match": []},
            "match: needs at least one item",
        ),
    ],
)
def test_table_errors_name_the_entry_and_key(values: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        message_signer([section(1, **values)], hostname="mx.example.com")
    assert error in str(caught.value)
    assert str(caught.value).startswith("mailgate.toml [[dkim_sign]] #1")


def test_key_file_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    def error(number: int, key_file: Path, algorithm: str = "rsa-sha256") -> str:
        entries = [
            section(1, domain="example.com", selector="s1", key_file=str(keys["rsa"])),
            section(
                number,
                domain="example.com",
                selector="s2",
                key_file=str(key_file),
                algorithm=algorithm,
            ),
        ]
        with pytest.raises(ConfigError) as caught:
            message_signer(entries, hostname="mx.example.com")
        text = str(caught.value)
        assert "\n" not in text
        return text

    missing = tmp_path / "missing.key"
    assert error(2, missing) == (
        f"mailgate.toml [[dkim_sign]] #2 key_file: cannot read {missing}: No such file or "
        "directory (make one with: mailgate dkim keygen)"
    )
    garbage = tmp_path / "garbage.key"
    garbage.write_text(
        "-----BEGIN RSA PRIVATE KEY-----\nnot base64\n-----END RSA PRIVATE KEY-----\n"
    )
    assert error(2, garbage).startswith(
        f"mailgate.toml [[dkim_sign]] #2 key_file: {garbage}: not a private key"
    )
    assert "an Ed25519 key, but the algorithm is rsa-sha256" in error(2, keys["ed"])
    assert "an RSA key, but the algorithm is ed25519-sha256" in error(
        2, keys["rsa"], "ed25519-sha256"
    )
    text = tmp_path / "text.key"
    text.write_text("hello\n")
    assert "not a PEM private key" in error(2, text)
    assert "not an Ed25519 key" in error(2, text, "ed25519-sha256")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    assert "encrypted with a passphrase" in error(2, encrypted)
    unreadable = tmp_path / "directory.key"
    unreadable.mkdir()
    assert "cannot read" in error(2, unreadable)


def test_arc_seal_table(keys: dict[str, Path]) -> None:
    arc = PolicySection(
        "arc_seal",
        {"domain": "example.com", "selector": "arc", "key_file": str(keys["rsa"])},
        None,
        "mailgate.toml [arc_seal]",
    )
    made = message_signer([arc], hostname="mx.example.com")
    assert made is not None and made.arc is not None and not made.dkim
    assert made.arc.authserv_id == "mx.example.com"
    mail_auth = PolicySection("mail_auth", {"authserv_id": "auth.example.com"}, None, "x")
    made = message_signer([mail_auth, arc], hostname="mx.example.com")
    assert made is not None and made.arc is not None
    assert made.arc.authserv_id == "auth.example.com"
    ed_arc = PolicySection(
        "arc_seal",
        {"domain": "example.com", "selector": "arc", "key_file": str(keys["ed"])},
        None,
        "mailgate.toml [arc_seal]",
    )
    with pytest.raises(ConfigError, match=r"\[arc_seal\] key_file: .*an Ed25519 key"):
        message_signer([ed_arc], hostname="mx.example.com")
    assert message_signer([mail_auth], hostname="mx.example.com") is None


def test_key_formats_of_other_tools(tmp_path: Path) -> None:
    """PKCS#8 RSA (openssl genpkey), PKCS#1 (opendkim-genkey), an Ed25519 PEM and
    dknewkey's base64 seed all load, and sign what their records verify."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = {
        "pkcs8.pem": (
            rsa_key,
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        "pkcs1.pem": (
            rsa_key,
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        ),
        "ed.pem": (
            ed_key,
            ed_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        "ed.seed": (
            ed_key,
            base64.b64encode(
                ed_key.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
            )
            + b"\n",
        ),
    }
    message = mail("a@example.com")
    for name, (key, data) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        algorithm = "ed25519-sha256" if name.startswith("ed") else "rsa-sha256"
        loaded = load_signing_key(path, algorithm)  # type: ignore[arg-type]
        assert loaded.record == txt_record(key)
        signature = dkim.sign(
            message,
            b"s",
            b"example.com",
            loaded.dkimpy_key,
            signature_algorithm=algorithm.encode(),
        )
        records = {b"s._domainkey.example.com.": loaded.record.encode()}
        assert dkim.verify(
            signature + message,
            dnsfunc=lambda name, timeout=5, records=records: records.get(name),
        ), name


def test_openssl_rsa_signs_exactly_as_dkimpy(
    keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RSA step goes through OpenSSL for speed; PKCS#1 v1.5 is deterministic, so at
    one time the DKIM-Signature and ARC set are byte for byte dkimpy's own."""
    monkeypatch.setattr(dkim.time, "time", lambda: 1796582997.0)
    made = signer(keys, {"domain": "example.com"})
    message = mail("a@example.com")
    added, _ = made.sign(message, envelope_sender="", client="192.0.2.1", user=None)
    key = load_signing_key(keys["rsa"], "rsa-sha256")
    assert key.rsa_key is not None
    assert added == dkim.sign(
        message, b"s1", b"example.com", key.dkimpy_key, canonicalize=(b"relaxed", b"relaxed")
    )
    arc = PolicySection(
        "arc_seal",
        {"domain": "example.com", "selector": "arc", "key_file": str(keys["rsa"])},
        None,
        "mailgate.toml [arc_seal]",
    )
    sealer = message_signer([arc], hostname="mx.example.com")
    assert sealer is not None
    checked = b"Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=a@example.com\r\n"
    sealed, what = sealer.sign(
        checked + message, envelope_sender="", client="203.0.113.1", user=None
    )
    assert what == ["arc d=example.com s=arc"]
    assert sealed == b"".join(
        dkim.arc_sign(checked + message, b"arc", b"example.com", key.dkimpy_key, b"mx.example.com")
    )
    assert sealed.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256;")


def test_start_up_log_says_what_is_signed(
    keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mailgate.composition.builtins import message_signer as start_signer
    from mailgate.config import options_from_settings

    options = options_from_settings(
        {
            "hostname": "mx.example.com",
            "state_dir": str(tmp_path),
            "dkim_sign": [
                {"domain": "example.com", "selector": "s1", "key_file": str(keys["rsa"])}
            ],
            "arc_seal": {"domain": "example.com", "selector": "arc", "key_file": str(keys["rsa"])},
        }
    )
    with caplog.at_level("INFO", logger="mailgate.server"):
        assert start_signer(options) is not None
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("DKIM signing for example.com with selector s1 (rsa-sha256, ")
    assert lines[0].endswith(" bits; match sender-domain)")
    assert lines[1] == (
        "ARC sealing as example.com with selector arc (Authentication-Results of mx.example.com)"
    )
    assert "[mail_auth], which is not configured" in lines[2]
