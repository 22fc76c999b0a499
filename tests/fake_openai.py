"""A local OpenAI-compatible chat server for tests: canned answers, injected failures, usage counts.

Behaviour is scripted per image (sha1 of the image bytes in the request's last data URL): a list of actions
taken on successive requests for that image, then "ok". Actions: "ok", "429", "500", "timeout" (answers after
``timeout_s``), "malformed" (not JSON), "empty", "refuse", "paragraph" (an answer that is not a list), "long" (a list with one description over 16 tokens).
"""
import base64
import hashlib
import http.server
import json
import threading
import time

MODEL = "fake-vlm"


def image_key(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:10]


def canned(key: str, list_prompt: bool) -> str:
    if list_prompt:
        return f"- a part {key[:4]}\n- the region {key[4:8]}\n* {key[8:]} texture on the left\n"
    return f"A picture {key} with a few objects."


class FakeServer:
    def __init__(self, script=None, delay_s: float = 0.0, timeout_s: float = 2.0):
        self.script, self.delay_s, self.timeout_s = dict(script or {}), delay_s, timeout_s
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if payload.get("model") != MODEL:
                    return self._send(404, {"error": {"message": f"The model `{payload.get('model')}` does not exist"}})
                user = payload["messages"][-1]["content"]
                url = next(c["image_url"]["url"] for c in user if c["type"] == "image_url")
                text = next(c["text"] for c in user if c["type"] == "text")
                key = image_key(base64.b64decode(url.split(",", 1)[1]))
                with server.lock:
                    n = server.calls.get(key, 0)
                    server.calls[key] = n + 1
                actions = server.script.get(key, [])
                action = actions[n] if n < len(actions) else "ok"
                time.sleep(server.delay_s)
                if action == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, [("Retry-After", "0")])
                if action == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if action == "timeout":
                    time.sleep(server.timeout_s)
                if action == "malformed":
                    return self._send(200, b'{"choices": [{"mess')
                answer = {"empty": "", "refuse": "I'm sorry, I can't help with that.",
                          "paragraph": "This image shows a dog on a beach.",
                          "long": "- " + "very " * 20 + "long thing\n- a short thing\n"}.get(
                              action, canned(key, text.startswith("List")))
                usage = {"prompt_tokens": 1000 + len(url) // 1000, "completion_tokens": len(answer.split())}
                return self._send(200, {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                    "usage": usage})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
