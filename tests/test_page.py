"""The review page (``GET /``) in a real headless Chromium, against the real daemon.

One daemon per module (motion backend, no broker) plays a looped H.264 clip at 1x: a small
square moves at 0-2 s and a bigger one at 10-12 s of each 20 s loop, so an event opens and
ends about every 10 s, with peaks below 10 (the min-score filter can exclude them all).
"""

from __future__ import annotations

import json
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest

from tests.broker import free_port
from tests.chromium import ARGS as CHROMIUM_ARGS
from tests.chromium import CHROMIUM
from tests.daemon_proc import DaemonProcess, write_config
from tests.scrape import get
from tests.waiting import eventually_sync

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, sync_playwright

pytestmark = pytest.mark.slow

WIDTH, HEIGHT, FPS, LOOP_S = 160, 120, 10, 20
DESKTOP = (1280, 900)
PHONE = (390, 844)


# --- the clip --------------------------------------------------------------------------------


def scene(t: float) -> npt.NDArray[np.uint8]:
    """A still scene (sky, ground, two squares); each square moves out and back once a loop."""
    sky = np.linspace(40, 110, HEIGHT, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(np.concatenate([sky * 0.5, sky * 0.8, sky], axis=2), (HEIGHT, WIDTH, 3))
    image = image.copy()
    image[90:] = (60, 70, 60)

    def square(home: float, start_s: float, reach: float, y: int, size: int, rgb: tuple[int, ...]):
        u = t - start_s
        x = home + reach * np.sin(np.pi * u / 2) if 0 <= u < 2 else home
        x0, y0 = int(x - size / 2), int(y - size / 2)
        image[max(0, y0) : y0 + size, max(0, x0) : x0 + size] = rgb

    square(40, 0, 50, 45, 14, (240, 200, 40))
    square(110, 10, -60, 65, 30, (220, 60, 60))
    return image.astype(np.uint8)


def write_scene(path: Path) -> Path:
    """H.264 (what a browser plays; MPEG-4 part 2 it does not), a keyframe every second."""
    options = {
        "bf": "0",
        "preset": "ultrafast",
        "threads": "1",
        "x264-params": f"keyint={FPS}:min-keyint={FPS}:scenecut=0",
    }
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for index in range(LOOP_S * FPS):
            rgb = av.VideoFrame.from_ndarray(scene(index / FPS), format="rgb24")
            frame = rgb.reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def status(url: str) -> int:
    """The HTTP status of a GET (0 while nothing answers); the body is read and dropped."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            answer.read()
            code: int = answer.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# --- fixtures --------------------------------------------------------------------------------


@dataclass
class Served:
    base: str
    daemon: DaemonProcess

    def api(self, path: str) -> Any:
        status, body = get(self.base + path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def events(self, query: str = "") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.api(f"/api/events?limit=100{query}")["events"]
        return events


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("page")
    clip = write_scene(root / "scene.mp4")
    port = free_port()
    config: dict[str, object] = {
        "model": {"backend": "motion"},
        "mqtt": {"enabled": False},
        "http": {"listen": f"127.0.0.1:{port}"},
        "storage": {"dir": str(root / "store"), "pre_roll_s": 1, "post_roll_s": 1},
        "shutdown_timeout_s": 5,
        "defaults": {
            "sample_fps": 2,
            "window_s": 4,
            "stride_s": 2,
            "min_significance": 3,
            "cooldown_s": 0,
            "motion_gate": 0,
        },
        "streams": [{"name": "cam", "url": str(clip), "live": True}],
    }
    daemon = DaemonProcess(write_config(root / "streamd.yaml", config))
    try:
        base = f"http://127.0.0.1:{port}"
        daemon.wait_for_line(r"event new cam", 20)
        eventually_sync(lambda: status(f"{base}/api/streams/cam/latest.jpg") == 200, 10, "frame")
        yield Served(base, daemon)
        daemon.signal(signal.SIGTERM)
        daemon.wait(15)
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Watched:
    page: Page
    errors: list[str] = field(default_factory=list)


OpenPage = Callable[..., Watched]


@pytest.fixture
def open_page(browser: Browser, served: Served) -> Iterator[OpenPage]:
    """``open_page(size, phone=False)``: a fresh context at the page, its console watched."""
    contexts = []

    def open_(size: tuple[int, int] = DESKTOP, phone: bool = False, path: str = "/") -> Watched:
        context = browser.new_context(
            viewport={"width": size[0], "height": size[1]},
            is_mobile=phone,
            has_touch=phone,
            device_scale_factor=2 if phone else 1,
        )
        contexts.append(context)
        watched = Watched(context.new_page())

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                watched.errors.append(f"{message.text} ({message.location})")

        watched.page.on("console", on_console)
        watched.page.on("pageerror", lambda exc: watched.errors.append(str(exc)))
        watched.page.goto(f"{served.base}{path}")
        watched.page.wait_for_selector('.tile[data-stream="cam"]')
        return watched

    yield open_
    for context in contexts:
        context.close()


def card_ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all("#events .card", "els => els.map(e => e.dataset.id)")
    return ids


def shows_api(page: Page, served: Served, query: str = "") -> Callable[[], bool]:
    """True once the page's cards are the API's events, in its order (newest first)."""

    def check() -> bool:
        expected = [e["id"] for e in served.events(query)]
        return card_ids(page) == expected

    return check


def shows_image(img: Locator) -> Callable[[], bool]:
    """True once the ``<img>`` has a decoded picture."""
    return lambda: bool(img.evaluate("i => i.naturalWidth > 0"))


# --- tests -----------------------------------------------------------------------------------


def test_page_lists_the_stream_and_every_event(open_page: OpenPage, served: Served) -> None:
    watched = open_page()
    page = watched.page
    eventually_sync(shows_api(page, served), 10, "the cards are /api/events")
    assert card_ids(page)
    tile = page.locator('.tile[data-stream="cam"]')
    assert tile.locator(".badge.up").inner_text() == "up"
    assert tile.locator(".badge", has_text="live").count() == 1
    eventually_sync(shows_image(page.locator(".tile img")), 10, "the newest frame shows")
    eventually_sync(lambda: tile.locator(".strip rect").count() > 0, 10, "the strip is drawn")
    newest = served.events()[0]
    card = page.locator(f'.card[data-id="{newest["id"]}"]')
    assert card.locator(".desc").inner_text() == newest["description"]
    assert card.locator(".score").inner_text() == str(newest["peak_significance"])
    assert card.locator(".sname").inner_text() == "cam"
    for event in served.events()[:5]:
        thumb = page.locator(f'.card[data-id="{event["id"]}"] .thumb')
        if event["snapshot"]:
            eventually_sync(shows_image(thumb.locator("img")), 10, "the snapshot shows")
        elif thumb.count():
            assert thumb.locator(".ph").is_visible()
            assert not thumb.locator("img").is_visible()
    assert watched.errors == []


def test_a_click_on_a_card_plays_its_clip(
    open_page: OpenPage, served: Served, tmp_path: Path
) -> None:
    ready: list[dict[str, Any]] = []

    def clip_ready() -> bool:
        for event in served.events():
            if (
                event["type"] == "end"
                and event["clip"]
                and status(served.base + event["clip"]) == 200
            ):
                ready.append(event)
                return True
        return False

    eventually_sync(clip_ready, 30, "an ended event with a clip")
    event = ready[0]
    request = urllib.request.Request(served.base + event["clip"], headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 206
        assert answer.headers["Content-Range"].startswith("bytes 0-99/")

    watched = open_page()
    page = watched.page
    page.locator(f'.card[data-id="{event["id"]}"]').click()
    page.wait_for_selector("dialog#player[open]")
    video = page.locator("#video")
    eventually_sync(lambda: video.evaluate("v => v.readyState") >= 2, 10, "the clip plays")
    duration = video.evaluate("v => v.duration")
    assert duration > 0
    video.evaluate("v => { v.pause(); v.currentTime = v.duration / 2; }")
    eventually_sync(
        lambda: video.evaluate("v => !v.seeking && v.currentTime > 0 && v.readyState >= 2"),
        10,
        "seeking works (Range)",
    )
    at = video.evaluate("v => v.currentTime")
    updated = page.locator("#updated").inner_text()
    eventually_sync(lambda: page.locator("#updated").inner_text() != updated, 10, "a poll")
    assert video.evaluate("v => v.currentTime") == at  # the polling left the player alone
    assert video.evaluate("v => v.getAttribute('src')") == event["clip"]
    page.screenshot(path=tmp_path / "player.png")
    shutil.copyfile(tmp_path / "player.png", "/tmp/streamd-page-player.png")
    page.locator("#p-close").click()
    page.wait_for_selector("dialog#player", state="hidden")
    assert video.evaluate("v => v.getAttribute('src')") is None
    assert watched.errors == []


def test_a_notification_link_opens_the_event_clip(open_page: OpenPage, served: Served) -> None:
    """``/#event=<id>``, the link README's Home Assistant automation sends, plays that clip."""
    ended = [e for e in served.events() if e["type"] == "end" and e["clip"]]
    assert ended, "no ended event with a clip yet"
    event = ended[-1]
    watched = open_page(path=f"/#event={event['id']}")
    page = watched.page
    page.wait_for_selector("dialog#player[open]")
    video = page.locator("#video")
    assert video.evaluate("v => v.getAttribute('src')") == event["clip"]
    eventually_sync(lambda: video.evaluate("v => v.readyState") >= 2, 10, "the clip plays")
    assert watched.errors == []


def test_an_unplayable_or_missing_clip_says_why(open_page: OpenPage) -> None:
    page = open_page().page
    card = page.locator(".card.playable").first
    message = page.locator("#p-msg")
    # Bytes no decoder takes (what an H.265 camera's clip is to this browser): "download it".
    page.route(
        "**/clip.mp4", lambda route: route.fulfill(body=b"\0" * 64, content_type="video/mp4")
    )
    card.click()
    message.wait_for(state="visible")
    assert "cannot play this clip" in message.inner_text()
    assert page.locator("#p-msg a[download]").count() == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#player", state="hidden")
    page.unroute("**/clip.mp4")
    page.route("**/clip.mp4", lambda route: route.fulfill(status=404, body="{}"))
    card.click()
    message.wait_for(state="visible")
    assert "not there yet" in message.inner_text()


def test_a_new_event_shows_without_a_reload(open_page: OpenPage, served: Served) -> None:
    page = open_page().page
    eventually_sync(shows_api(page, served), 10, "the cards are /api/events")
    before = card_ids(page)
    page.evaluate("window.__same_document = true")
    eventually_sync(
        lambda: any(e["id"] not in before for e in served.events()), 30, "the daemon's next event"
    )
    eventually_sync(lambda: len(card_ids(page)) > len(before), 10, "a new card")
    assert set(before) <= set(card_ids(page))
    assert page.evaluate("window.__same_document") is True


def test_filters_and_the_url_hash(open_page: OpenPage, served: Served) -> None:
    page = open_page().page
    eventually_sync(shows_api(page, served), 10, "the cards are /api/events")
    above = max(e["peak_significance"] for e in served.events()) + 1
    assert above <= 10, "the clip's peaks must stay below 10"
    page.select_option("#f-min", str(above))
    eventually_sync(lambda: card_ids(page) == [], 10, "no card above every peak")
    assert served.events(f"&min_significance={above}") == []
    assert "No events match" in page.locator("#events-empty").inner_text()
    assert page.evaluate("location.hash") == f"#min={above}"

    page.select_option("#f-min", "5")
    page.select_option("#f-stream", "cam")
    assert page.evaluate("location.hash") == "#stream=cam&min=5"
    page.reload()
    page.wait_for_selector('.tile[data-stream="cam"]')
    assert page.input_value("#f-stream") == "cam"
    assert page.input_value("#f-min") == "5"
    eventually_sync(shows_api(page, served, "&stream=cam&min_significance=5"), 10, "filtered")
    assert card_ids(page)

    page.evaluate("location.hash = '#stream=nope'")  # typed into the address bar
    eventually_sync(lambda: card_ids(page) == [], 10, "no card for a stream that is not there")
    assert "no stream 'nope'" in page.locator("#events-empty").inner_text()
    assert page.input_value("#f-stream") == "nope"
    assert page.input_value("#f-min") == "0"


def test_a_phone_gets_one_column_without_horizontal_scroll(open_page: OpenPage) -> None:
    page = open_page(PHONE, phone=True).page
    page.wait_for_selector("#events .card")
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= page.evaluate("innerWidth")
    lefts = page.eval_on_selector_all(
        "#events .card, .tile", "els => els.map(e => Math.round(e.getBoundingClientRect().left))"
    )
    assert len(set(lefts)) == 1  # one column: streams, then events
    for control in ("#f-stream", "#f-min"):
        box = page.locator(control).bounding_box()
        assert box is not None
        assert box["height"] >= 44  # a finger's size


def test_the_401_and_server_gone_banners(open_page: OpenPage) -> None:
    page = open_page().page
    banner = page.locator("#banner")
    page.route(
        "**/api/**",
        lambda route: route.fulfill(status=401, content_type="application/json", body="{}"),
    )
    eventually_sync(banner.is_visible, 10, "the token banner")
    assert "/?token=" in banner.inner_text()
    assert page.locator("#updated").inner_text() == "token needed"
    page.unroute("**/api/**")
    page.route("**/api/**", lambda route: route.abort("connectionrefused"))
    eventually_sync(
        lambda: "streamd is not answering" in banner.inner_text(), 10, "the offline banner"
    )
    page.unroute("**/api/**")
    eventually_sync(lambda: not banner.is_visible(), 10, "the banner goes when it answers")


@pytest.mark.parametrize(("name", "size"), [("desktop", DESKTOP), ("phone", PHONE)])
def test_screenshot(open_page: OpenPage, tmp_path: Path, name: str, size: tuple[int, int]) -> None:
    page = open_page(size, phone=name == "phone").page
    page.wait_for_selector("#events .card")
    eventually_sync(shows_image(page.locator(".tile img")), 10, "the newest frame shows")
    page.wait_for_selector(".strip rect")
    shot = tmp_path / f"streamd-page-{name}.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 0
    shutil.copyfile(shot, f"/tmp/streamd-page-{name}.png")
