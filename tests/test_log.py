from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from streamd.log import is_secret_key, printable, redact_url, setup_logging

# --- redact_url: examples -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:p@ss123@host/", "rtsp://admin:***@host/"),  # the example
        ("rtsp://admin:pa/ss@cam.local/stream1", "rtsp://admin:***@cam.local/stream1"),
        ("rtsp://admin:pa ss@cam.local:554/s", "rtsp://admin:***@cam.local:554/s"),
        ("rtsp://admin:a:b@c@10.0.0.2", "rtsp://admin:***@10.0.0.2"),
        ("rtsp://admin:p?ss@host/x", "rtsp://admin:***@host/x"),
        ("rtsp://me@corp.com:pw@host/", "rtsp://me@corp.com:***@host/"),
        ("rtsps://:pw@host/", "rtsps://:***@host/"),
        ("rtsp://user@host/stream", "rtsp://user@host/stream"),  # user only: kept
        ("rtsp://host:554/stream", "rtsp://host:554/stream"),
        ("http://[::1]:8080/x?API-KEY=s3cr3t", "http://[::1]:8080/x?API-KEY=***"),
        (
            "https://b.s3.amazonaws.com/v.m3u8?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab&x=1",
            "https://b.s3.amazonaws.com/v.m3u8?X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        ("https://h/live.m3u8?access_token=t0k#frag", "https://h/live.m3u8?access_token=***#frag"),
        ("https://h/cb#access_token=t0k&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/p?email=a@b.com&Sig=x", "https://h/p?email=a@b.com&Sig=***"),
        ("http://h/p?password=&key=k&channel=2", "http://h/p?password=***&key=***&channel=2"),
        ("/dev/video0", "/dev/video0"),
        ("/srv/clips/a@b.mp4", "/srv/clips/a@b.mp4"),
        ("file:///srv/clips/match.mp4", "file:///srv/clips/match.mp4"),
    ],
)
def test_redact_url_examples(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apikey",
        "API-Key",
        "access_token",
        "token",
        "password",
        "passwd",
        "pwd",
        "key",
        "secret",
        "client_secret",
        "sig",
        "signature",
        "auth",
        "X-Amz-Signature",
        "x-amz-credential",
        "X-Amz-Security-Token",
        "X-Goog-Signature",
        "hdnts",
    ],
)
def test_secret_query_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["channel", "subtype", "stream", "width", "fmt", "t"])
def test_plain_query_keys(key: str) -> None:
    assert not is_secret_key(key)


# --- redact_url: property -----------------------------------------------------------------------

SECRET_KEYS = ["api_key", "Access_Token", "token", "PASSWORD", "pwd", "key", "sig", "X-Amz-Date"]
PLAIN_KEYS = ["channel", "subtype", "stream", "fmt"]
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.just("[::1]"),
    st.just("[fe80::1:2]"),
)
_users = st.from_regex(r"[A-Za-z0-9._~-]{0,12}", fullmatch=True)
# Printable text with the characters that broke the old pattern; `?`, `#` and `&` are left
# out (a raw `/` before one of them makes the URL unreadable for anyone, see the examples).
_passwords = st.text(
    alphabet=st.characters(
        codec="utf-8", categories=["L", "N", "P", "S", "Zs"], exclude_characters="?#&"
    ),
    min_size=1,
    max_size=20,
).map(lambda pw: pw + "@/: %"[len(pw) % 5])
_paths = st.from_regex(r"(/[A-Za-z0-9._~-]{0,10}){0,3}", fullmatch=True)
_values = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P"], exclude_characters="&#"),
    min_size=1,
    max_size=16,
)


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str, list[str], str]:
    """(url, expected redaction, secrets, host)."""
    scheme = draw(st.sampled_from(["rtsp", "rtsps", "http", "https"]))
    host = draw(_hosts)
    port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
    path = draw(_paths)
    user = draw(_users)
    password = draw(st.one_of(st.none(), _passwords))
    secrets: list[str] = []
    auth = shown_auth = ""
    if password is not None:
        auth, shown_auth = f"{user}:{password}@", f"{user}:***@"
        secrets.append(password)
    elif draw(st.booleans()) and user:
        auth = shown_auth = f"{user}@"
    params, shown_params = [], []
    for secret in draw(st.lists(st.booleans(), max_size=4)):
        value = draw(_values)
        key = draw(st.sampled_from(SECRET_KEYS if secret else PLAIN_KEYS))
        params.append(f"{key}={value}")
        shown_params.append(f"{key}=***" if secret else f"{key}={value}")
        if secret:
            secrets.append(value)
    query = "?" + "&".join(params) if params else ""
    shown_query = "?" + "&".join(shown_params) if params else ""
    base = f"{scheme}://"
    return (
        f"{base}{auth}{host}{port}{path}{query}",
        f"{base}{shown_auth}{host}{port}{path}{shown_query}",
        secrets,
        host,
    )


@given(urls())
@example(("rtsp://admin:p@ss123@host/", "rtsp://admin:***@host/", ["p@ss123"], "host"))
def test_redact_url_hides_every_secret_and_keeps_the_host(
    case: tuple[str, str, list[str], str],
) -> None:
    url, expected, secrets, host = case
    shown = redact_url(url)
    assert shown == expected  # every secret, and only secrets, became ***
    assert host in shown
    for secret in secrets:
        # (unless the same text is also public: a user, a path, a plain parameter's value)
        assert secret not in shown or secret in expected


# --- printable and the formatters --------------------------------------------------------------


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x08b\nc\td\re\x1b[31m\x7f\x85\u2028\u202e") == (
        r"a\x08b\nc\td\re\x1b[31m\x7f\x85\u2028\u202e"
    )
    assert printable("Ein Tor! ⚽ «bicycle kick» \\o/") == "Ein Tor! ⚽ «bicycle kick» \\o/"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_model_output_cannot_forge_log_lines(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    setup_logging("info", fmt)  # type: ignore[arg-type]
    logging.getLogger("streamd.test").info("window: %s", "A goal.\nERROR fake line\x08\x1b[2J")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    text = json.loads(lines[0])["msg"] if fmt == "json" else lines[0]
    assert text.endswith(r"window: A goal.\nERROR fake line\x08\x1b[2J")


# --- third-party loggers ------------------------------------------------------------------------

_EMIT = """
import logging, warnings
{before}
from streamd.log import setup_logging, adopt_library_loggers
setup_logging("info", "json")
{after}
import huggingface_hub.utils.logging as hub_logging
import transformers.utils.logging as tf_logging
hub_logging.get_logger("huggingface_hub.file_download").warning("hub warns")
tf_logging.get_logger("transformers.modeling_utils").warning("transformers warns")
warnings.warn("a library warning", UserWarning, stacklevel=1)
"""
_IMPORTS = "import huggingface_hub, transformers"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (_IMPORTS, ""),  # imported before setup_logging: it adopts them
        ("", _IMPORTS + "; adopt_library_loggers(); adopt_library_loggers()"),  # a backend's call
    ],
    ids=["imported-first", "imported-later"],
)
def test_library_warnings_come_out_once_as_json(before: str, after: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _EMIT.format(before=before, after=after)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("huggingface_hub.file_download", "warning"),
        ("transformers.modeling_utils", "warning"),
        ("py.warnings", "warning"),
    ]
    assert records[0]["msg"] == "hub warns"
    assert records[1]["msg"] == "transformers warns"
