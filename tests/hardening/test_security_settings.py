"""Token and TLS settings: what is accepted, and clear errors for what is not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from xaid_server.auth import AuthInterceptor, bearer, load_tokens, parse_tokens
from xaid_server.settings import Settings
from xaid_server.tls import server_credentials


def test_tokens_parse_from_lines_and_commas() -> None:
    tokens = parse_tokens("# comment\na: one\nb:two, c:three # trailing\n\n", "file")
    assert [(t.subject, t.secret) for t in tokens] == [
        ("a", b"one"),
        ("b", b"two"),
        ("c", b"three"),
    ]
    assert "one" not in repr(tokens)
    for bad in ("no-colon", ":secret", "subject:", "a:b,c"):
        with pytest.raises(ValueError, match="subject:token"):
            parse_tokens(bad, "file")


def test_tokens_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("a:one\n")
    settings = replace(Settings(), auth_token_file=str(path), auth_token_env="T")
    assert [t.subject for t in load_tokens(settings, {"T": "b:two"})] == ["a", "b"]
    with pytest.raises(ValueError, match="T is empty or unset"):
        load_tokens(settings, {})
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="no token"):
        load_tokens(replace(Settings(), auth_token_file=str(path)), {})
    assert load_tokens(Settings(), {}) == []


def test_only_a_known_bearer_token_names_a_subject() -> None:
    interceptor = AuthInterceptor(parse_tokens("a:one,b:two", "env"))
    assert interceptor.subject(bearer([("authorization", "Bearer two")])) == "b"
    assert interceptor.subject(bearer([("authorization", "bearer  one ")])) == "a"
    for metadata in ([], [("authorization", "Basic two")], [("authorization", "Bearer ")]):
        assert interceptor.subject(bearer(metadata)) is None
    assert interceptor.subject(b"tw") is None


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    assert server_credentials(Settings()) is None
    with pytest.raises(ValueError, match="go together"):
        server_credentials(replace(Settings(), tls_cert="c.pem"))
    with pytest.raises(ValueError, match="needs tls_cert"):
        server_credentials(replace(Settings(), tls_client_ca="ca.pem"))
    missing = str(tmp_path / "absent.pem")
    with pytest.raises(ValueError, match=r"cannot read absent\.pem"):
        server_credentials(replace(Settings(), tls_cert=missing, tls_key=missing))
