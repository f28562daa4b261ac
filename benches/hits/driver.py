"""The hit-instructions driver (benches/hit-instructions.sh): a 2 KiB upstream, and a client that
sends an exact number of keep-alive GETs and checks every answer. Loopback only; bounded."""
import http.client
import http.server
import socket
import sys
import threading

BODY = b"x" * 2048


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def serve():
    """Serves the upstream on a free port; prints the port, then runs until stdin closes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


def hit(port, count, conns):
    """`count` GETs of one URL over `conns` keep-alive connections, each answer checked."""
    def run(n, out):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            c.request("GET", "/hit/item?k=1")
            r = c.getresponse()
            body = r.read()
            if r.status != 200 or len(body) != len(BODY):
                out.append(f"{r.status} {len(body)}")
        c.close()

    errors = []
    threads = [threading.Thread(target=run, args=(count // conns, errors)) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"bad answers: {errors[:5]}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        hit(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
