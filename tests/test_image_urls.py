"""Images from http(s) URLs (npvlm/inputs/web.py): `load_image`, `model.generate`, the command
line and JSONL `image` fields fetch them; every way a fetch fails is one line. A local HTTP
server on 127.0.0.1 plays the web."""

import io
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.errors import InputError
from npvlm.inputs import web
from npvlm.inputs.examples import read_jsonl
from npvlm.inputs.image import load_image
from npvlm.training.data import make_batch

from helpers import ROOT

PNG = SAMPLE_SCENE.read_bytes()
HTML = b"<html><body>a page about a cat</body></html>"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):              # quiet
        pass

    def send(self, status, body, content_type, length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/scene.png":
            self.send(200, PNG, "image/png")
        elif self.path == "/page.html":
            self.send(200, HTML, "text/html")
        elif self.path == "/empty.png":
            self.send(200, b"", "image/png")
        elif self.path == "/huge.png":                      # declares 1 GB
            self.send(200, PNG[:100], "image/png", length=10**9)
        elif self.path == "/unsized.png":                   # no Content-Length: the cap counts bytes
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
            self.close_connection = True
        elif self.path == "/slow.png":
            time.sleep(3)
            self.send(200, PNG, "image/png")
        elif self.path == "/error":
            self.send(500, b"oops", "text/plain")
        else:
            self.send(404, b"not here", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_image_url_gives_the_file_s_pixels(server):
    np.testing.assert_array_equal(np.asarray(load_image(f"{server}/scene.png")), np.asarray(load_image(SAMPLE_SCENE)))


def test_generate_takes_a_url(server):
    model = npvlm.load("demo")
    assert model.generate(f"{server}/scene.png", "caption en").tokens == \
        model.generate(SAMPLE_SCENE, "caption en").tokens


@pytest.mark.parametrize("path, fragments", [
    ("/missing.png", ["the server answered HTTP 404"]),
    ("/error", ["the server answered HTTP 500"]),
    ("/page.html", ["not an image (the server sent text/html, 44 bytes)"]),
    ("/empty.png", ["the server sent an empty body"]),
    ("/huge.png", ["the file is 1000000000 bytes, over the 64 MiB limit"]),
])
def test_a_url_that_is_not_an_image_is_one_line(server, path, fragments):
    with pytest.raises(InputError) as e:
        load_image(server + path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(server + path) and all(f in msg for f in fragments), msg


def test_the_size_cap_counts_bytes_without_a_content_length(server, monkeypatch):
    monkeypatch.setattr(web.fetch, "__defaults__", (web.TIMEOUT_S, 100))       # the PNG is 498 bytes
    with pytest.raises(InputError, match="/unsized.png: the file is over the 100-byte limit"):
        load_image(f"{server}/unsized.png")


def test_no_answer_in_time_is_one_line(server, monkeypatch):
    monkeypatch.setattr(web.fetch, "__defaults__", (0.5, web.MAX_BYTES))
    with pytest.raises(InputError, match=r"/slow.png: no answer within 0.5 s"):
        load_image(f"{server}/slow.png")


def test_unreachable_and_unknown_hosts_are_one_line():
    with pytest.raises(InputError, match=r"cannot fetch the image \(.*refused.*\); check the address and the network"):
        load_image(f"http://127.0.0.1:{closed_port()}/x.png")
    with pytest.raises(InputError, match="the host name cannot be resolved"):
        load_image("http://npvlm-test.invalid/x.png")


def test_other_schemes_are_refused_whole():
    with pytest.raises(InputError, match="^ftp://example.com/cat.jpg: only http:// and https:// URLs are read"):
        load_image("ftp://example.com/cat.jpg")


def test_the_command_reads_a_url_and_reports_a_bad_one_in_one_line(server):
    ok = subprocess.run([sys.executable, str(ROOT / "run.py"), f"{server}/scene.png"], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and ok.stdout == "a green triangle, a yellow circle and a blue square\n", ok.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "run.py"), f"{server}/page.html", "caption en"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert last.startswith(f"error: {server}/page.html: not an image") and "loading" not in bad.stderr, bad.stderr


def test_jsonl_image_fields_may_be_urls(server, tmp_path):
    data = tmp_path / "train.jsonl"
    Image.open(io.BytesIO(PNG)).save(tmp_path / "scene.png")
    data.write_text("\n".join(json.dumps(e) for e in (
        {"image": f"{server}/scene.png", "prefix": "caption en", "suffix": "a b"},
        {"image": "scene.png", "prefix": "caption en", "suffix": "a b"})) + "\n")
    examples = read_jsonl(data)
    batch = make_batch(npvlm.load("demo"), examples)
    np.testing.assert_array_equal(batch["pixel_values"][0], batch["pixel_values"][1])
    data.write_text(json.dumps({"image": f"{server}/missing.png", "prefix": "x", "suffix": "y"}) + "\n")
    with pytest.raises(InputError, match=rf"^{data} line 1: {server}/missing.png: the server answered HTTP 404"):
        read_jsonl(data)
