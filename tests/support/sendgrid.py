"""A local HTTP server standing in for the SendGrid v3 API: it records each request and answers as
SendGrid does (202, 400 for a message with an empty part, or the status a test asks for), or, once it
has the whole request, hangs up, takes longer to answer than the client waits, sends the client
elsewhere (a redirect, by default a 301 to a page of its own that any GET finds, as a web server in front of
the wrong address would; it records each GET that comes), or answers with a line that is no HTTP (a NUL in
it, as a server of another protocol may send)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SendGridStandIn:
    HANG_UP, SLOW, MOVED, GARBLED = 'hang up', 'slow', 'moved', 'garbled'

    def __init__(self):
        self.requests = []
        # recipient address -> what to answer, in turn (then 202): an HTTP status (or a status and the
        # field its error names), HANG_UP, SLOW (202 after `slow_seconds`), MOVED or GARBLED
        self.answers = {}
        self.slow_seconds = 3.0
        self.moved_status, self.moved_to, self.gets = 301, '/moved', []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                stand_in.requests.append({'path': self.path, 'headers': dict(self.headers), 'body': body})
                recipient = body['personalizations'][0]['to'][0]['email']
                planned = stand_in.answers.get(recipient)
                status = planned.pop(0) if planned else 202
                # A 400 names the field it refuses: this recipient's address, unless the test names another.
                status, field = status if isinstance(status, tuple) else (status, 'personalizations.0.to.0.email')
                error = {'message': 'Does not contain a valid address.', 'field': field}
                if empty := [n for n, part in enumerate(body.get('content', [])) if not part['value']]:
                    status, error = 400, {'message': 'The content value must be a string at least one character in '
                                                     'length.', 'field': f'content.{empty[0]}.value'}
                if status == stand_in.HANG_UP:
                    self.close_connection = True
                    return
                if status == stand_in.GARBLED:
                    self.wfile.write(b'\x00\x15\x03 not HTTP\r\n')
                    self.close_connection = True
                    return
                if status == stand_in.SLOW:
                    time.sleep(stand_in.slow_seconds)
                    status = 202
                if status == stand_in.MOVED:
                    self.send_response(stand_in.moved_status)
                    self.send_header('Location', stand_in.moved_to)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                self.send_response(status)
                self.send_header('Content-Type', 'application/json')
                reply = b'' if status == 202 else json.dumps({'errors': [error]}).encode()
                self.send_header('Content-Length', str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self):
                stand_in.gets.append({'path': self.path, 'headers': dict(self.headers)})
                page = b'<html><body>Welcome</body></html>'
                self.send_response(200)
                self.send_header('Content-Type', 'text/html')
                self.send_header('Content-Length', str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
