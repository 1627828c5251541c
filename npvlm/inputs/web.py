"""Images from the web: an http(s) URL -> the bytes of the image file, as transformers'
`load_image` and pipelines accept URLs.

The fetch has a time limit (for connecting and for each read), a size cap (checked on the
declared Content-Length first, then on what arrives), and the bytes must decode as an image
(checked by `image.load_image`, which names the Content-Type the server sent if they do not).
Every failure is one `InputError` naming the URL and what to do: no network or an unknown host,
a refused connection, no answer in time, an HTTP error status, a body over the cap.
"""

import http.client
import socket
import urllib.error
import urllib.request

from ..errors import InputError

TIMEOUT_S = 20.0              # seconds to connect, and for each read
MAX_BYTES = 64 << 20          # 64 MiB: far more than any photo needs (PaliGemma sees 896 px at most)


def fetch(url, timeout=TIMEOUT_S, max_bytes=MAX_BYTES):
    """GET `url` -> (body bytes, the Content-Type the server declared)."""
    request = urllib.request.Request(url, headers={"User-Agent": "npvlm", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(url, int(declared), max_bytes)
            body = response.read(max_bytes + 1)
            content_type = response.headers.get_content_type()
    except urllib.error.HTTPError as e:
        raise InputError(f"{url}: the server answered HTTP {e.code} {e.reason}; check the address") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _no_answer(url, timeout) from None
        raise InputError(f"{url}: cannot fetch the image ({_reason(e.reason)}); check the address and "
                         "the network, or download the file and pass its path") from None
    except TimeoutError:
        raise _no_answer(url, timeout) from None
    except (OSError, http.client.HTTPException) as e:      # a connection reset, a cut-off body
        raise InputError(f"{url}: the download failed ({_reason(e)}); try again, or download the "
                         "file and pass its path") from None
    if len(body) > max_bytes:
        raise _too_large(url, None, max_bytes)
    return body, content_type


def _reason(e):
    """What went wrong, in a few words: an exception's text folded onto one line (its type if
    empty; socket errors give the resolver's or the OS's words)."""
    if isinstance(e, socket.gaierror):
        return f"the host name cannot be resolved: {e.strerror or e}"
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(text.split()) or type(e).__name__


def _no_answer(url, timeout):
    return InputError(f"{url}: no answer within {timeout:g} s; try again, or download the file and "
                      "pass its path")


def _too_large(url, size, max_bytes):
    what = f"{size} bytes, over" if size is not None else "over"
    limit = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes}-byte"
    return InputError(f"{url}: the file is {what} the {limit} limit for images fetched from URLs; "
                      "download it and pass its path")
