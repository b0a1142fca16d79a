"""A release mirror on 127.0.0.1 that can fail the ways real ones do, for download tests in this process and in
the CLI processes they start (through GPT2_MODELS_URL)."""
import gzip
import http.server
import os
import re
import threading

import utils


class ReleaseServer(http.server.ThreadingHTTPServer):
    """Serves files[name] at /124M/<name>. Faults, consumed one per request:
    faults[name] = ["503", "cut", "pause", ...]; "cut" sends half of the body and drops the connection; "pause"
    sends half, sets the event `paused`, and sends the rest once `resume` is set (or drops the connection if the
    client went away); "slow" sends one byte every trickle_delay seconds; "length:abc" sends that Content-Length.
    range_support=False makes it ignore Range headers, as some servers do; compress=True gzips every answer
    (Content-Encoding: gzip), whatever the client asked for; chunk_delay slows every 64 KiB sent."""

    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.faults, self.range_support, self.requests = files, {}, True, []
        self.compress, self.chunk_delay, self.accept_encodings, self.trickle_delay = False, 0.0, [], 0.05
        self.paused, self.resume = threading.Event(), threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"

    def names_requested(self):
        return [name for name, _ in self.requests]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.requests.append((name, self.headers.get("Range")))
        server.accept_encodings.append(self.headers.get("Accept-Encoding"))
        fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
        if name not in server.files or not self.path.startswith("/124M/"):
            self.send_error(404)
            return
        if fault == "503":
            self.send_error(503)
            return
        body, start = server.files[name], 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.range_support:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        body = body[start:]
        if server.compress:
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        length = fault.removeprefix("length:") if fault and fault.startswith("length:") else str(len(body))
        self.send_header("Content-Length", length)
        self.end_headers()
        if fault == "slow":  # one byte at a time, trickle_delay apart, until the client goes away
            self.send(body, piece=1, delay=server.trickle_delay)
            return
        if fault in ("cut", "pause"):
            self.send(body[:len(body) // 2])
            if fault == "pause":
                server.paused.set()
            if fault == "cut" or not server.resume.wait(timeout=300):
                self.close_connection = True
                return
            body = body[len(body) // 2:]
        self.send(body)

    def send(self, body, piece=1 << 16, delay=None):
        delay = self.server.chunk_delay if delay is None else delay
        try:
            for i in range(0, len(body), piece):
                if delay:
                    threading.Event().wait(delay)
                self.wfile.write(body[i:i + piece])
                self.wfile.flush()
        except ConnectionError:  # the client was killed: what it does next is the test's business
            self.close_connection = True


def serve_release(model_dir):
    """A started ReleaseServer serving the release files of model_dir; call .shutdown() when done."""
    files = {}
    for name in utils.RELEASE_FILES:
        with open(os.path.join(model_dir, name), "rb") as f:
            files[name] = f.read()
    server = ReleaseServer(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
