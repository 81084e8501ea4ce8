"""A real headless Chromium for the end-to-end tests (tests/test_browser.py): finding it, or installing it
with apt as the suite installs what else it needs; serving the app over real HTTPS for it, as deployed (a
certificate of a test CA, trustme's); and a browser that
keeps a screenshot of every page it shows and what each page reported (Content-Security-Policy violations,
script errors), and measures whether a page scrolls sideways."""
import base64
import os
import re
import shutil
import ssl
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import trustme
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

PACKAGES = ('chromium', 'chromium-driver')  # Debian's: the browser and a chromedriver of its own version
APT_UPDATE_TIMEOUT, APT_INSTALL_TIMEOUT = 180, 360  # both within the first test's timeout (pytest.ini: 600 s)


def find_chromium():
    """:return: the paths of Chromium and its chromedriver on PATH (None for either that is not there)."""
    return shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')


def can_install():
    """Whether this machine lets the suite install packages itself: root, with apt-get."""
    return os.geteuid() == 0 and shutil.which('apt-get') is not None


def install_chromium():
    """`apt-get update`, then `apt-get install -y chromium chromium-driver`, each with a timeout and its
    output kept.  :return: '' once both succeeded, else what went wrong, with the end of the output."""
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    for command, timeout in ((['apt-get', 'update'], APT_UPDATE_TIMEOUT),
                             (['apt-get', 'install', '-y', *PACKAGES], APT_INSTALL_TIMEOUT)):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b'').decode(errors='replace') + (exc.stderr or b'').decode(errors='replace')
            return f'`{" ".join(command)}` did not finish in {timeout} s:\n{output[-2000:]}'
        if done.returncode != 0:
            return f'`{" ".join(command)}` exited with {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}'
    return ''


@contextmanager
def serving(app, port):
    """The app on a real HTTPS server at 127.0.0.1:`port`, each request on a thread of its own, as long as
    the block lasts. HTTPS, because that is how the app is deployed and a browser holds an https page to
    more rules (Secure cookies; the referrer check of its forms' CSRF protection, which a Referrer-Policy
    of no-referrer failed on every form while the browser tests ran over http)."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert('127.0.0.1').configure_cert(tls)
    server = make_server('127.0.0.1', port, app, threaded=True, ssl_context=tls)
    thread = threading.Thread(target=server.serve_forever, name=f'live-server-{port}', daemon=True)
    thread.start()
    try:
        yield f'https://127.0.0.1:{port}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def start_chromium(chromium, chromedriver):
    """A headless Chromium driven through the given chromedriver (never one Selenium Manager fetches),
    keeping its console for `get_log('browser')`, and trusting any certificate (the live server's CA is
    made anew for each test)."""
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ('--headless=new', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                     '--disable-extensions', '--window-size=1280,900', '--ignore-certificate-errors'):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument('--no-sandbox')  # Chromium's sandbox refuses to start as root
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


# Whether the page scrolls sideways, and if so what sticks out past the window's right edge: elements, and
# runs of text (an unbreakable link in a box of the right width), outside any element that scrolls on its
# own (a wide table at a phone's width).
OVERFLOW_SCRIPT = """
const root = document.documentElement, width = root.clientWidth;
const scrollsItself = (element) => {
  for (let e = element.parentElement; e && e !== root && e !== document.body; e = e.parentElement) {
    if (['auto', 'scroll'].includes(getComputedStyle(e).overflowX)) { return true; }
  }
  return false;
};
const culprits = new Map([...document.body.querySelectorAll('*')]
  .map((e) => [e, e.getBoundingClientRect().right]).filter(([, right]) => right > width + 0.5));
const texts = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = texts.nextNode(); node; node = texts.nextNode()) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const right = range.getBoundingClientRect().right;
  if (right > width + 0.5) { culprits.set(node.parentElement, Math.max(right, culprits.get(node.parentElement) || 0)); }
}
return {scrollWidth: root.scrollWidth, clientWidth: width, innerWidth: window.innerWidth,
        culprits: [...culprits].filter(([e]) => !scrollsItself(e)).slice(0, 5).map(([e, right]) =>
          `<${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}> to ${Math.round(right)} px: `
          + (e.textContent || '').trim().slice(0, 80))};
"""
CSP_MESSAGE = re.compile(r'Content[ -]Security[ -]Policy', re.I)


class Browser:
    """One Chromium tab on the live server. Every page it opens is screenshotted into `artifacts` (in
    order: 01-…png, 02-…) and its console read, so a test can ask what the pages it saw reported."""

    def __init__(self, driver, base_url, artifacts):
        self.driver, self.base_url, self.artifacts = driver, base_url, artifacts
        self.width = None
        self.shots = 0
        self.console = []  # (page, entry) for every console entry of every page seen

    def at_width(self, width):
        """Lay pages out as a device `width` CSS pixels wide: a phone (touch, its viewport meta obeyed)
        below 600, else a desktop window."""
        self.width = width
        self.driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride', {
            'width': width, 'height': 812 if width < 600 else 900, 'deviceScaleFactor': 1, 'mobile': width < 600})
        return self

    def open(self, path_or_url, name=None):
        """Go to a path on the live server, or a full URL (a link from an email); keep a screenshot."""
        url = path_or_url if '://' in path_or_url else self.base_url + path_or_url
        self.driver.get(url)
        self.seen(name or path_or_url)
        return self

    def submit(self, css, name):
        """Press the button at `css` as a person does, and wait for the page it leads to (a new document: the
        mark left on this one is gone). Questions to the browser while it is between pages may be answered
        with an error, not an answer: asked again."""
        self.driver.execute_script('window.leftBySubmit = true')
        self.find(css).click()
        WebDriverWait(self.driver, 10, ignored_exceptions=(WebDriverException,)).until(
            lambda driver: driver.execute_script("return !window.leftBySubmit && document.readyState === 'complete'"),
            f'pressing {css} led to no new page')
        self.seen(name)

    def seen(self, name):
        """The page now shown is one to keep: its screenshot, and what its console said."""
        self.shots += 1
        slug = re.sub(r'[^A-Za-z0-9]+', '-', name.split('://')[-1]).strip('-')[:60] or 'home'
        width = f'-{self.width}px' if self.width else ''
        self.screenshot(self.artifacts / f'{self.shots:02d}-{slug}{width}.png')
        self.read_console(name)

    def screenshot(self, path):
        """The whole page, not just the window, so a screenshot shows what sticks out sideways too."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.driver.execute_cdp_cmd('Page.getLayoutMetrics', {})['cssContentSize']
        shot = self.driver.execute_cdp_cmd('Page.captureScreenshot', {
            'format': 'png', 'captureBeyondViewport': True,
            'clip': {'x': 0, 'y': 0, 'width': size['width'], 'height': size['height'], 'scale': 1}})
        path.write_bytes(base64.b64decode(shot['data']))

    def read_console(self, page):
        """Keep what the console said since it was last read (ChromeDriver hands each entry out once)."""
        self.console.extend((page, entry) for entry in self.driver.get_log('browser'))

    def csp_violations(self):
        """Every Content-Security-Policy violation the pages seen so far reported: [(page, message)]."""
        self.read_console(self.driver.current_url)
        return [(page, entry['message']) for page, entry in self.console if CSP_MESSAGE.search(entry['message'])]

    def script_errors(self):
        """Every uncaught script error on the pages seen so far: [(page, message)]."""
        self.read_console(self.driver.current_url)
        return [(page, entry['message']) for page, entry in self.console
                if entry['level'] == 'SEVERE' and entry.get('source') == 'javascript']

    def failed_requests(self):
        """Every request of the pages seen so far that the browser logged as failed (a 404 for an icon
        or a script among them): [(page, message)]."""
        self.read_console(self.driver.current_url)
        return [(page, entry['message']) for page, entry in self.console
                if entry['level'] == 'SEVERE' and entry.get('source') == 'network']

    def overflow(self):
        """How wide the page is against the window, and what sticks out (see OVERFLOW_SCRIPT)."""
        return self.driver.execute_script(OVERFLOW_SCRIPT)

    def heading(self):
        """The page's <h1>, as shown."""
        return self.driver.find_element(By.TAG_NAME, 'h1').text

    def text(self):
        """What the page shows, as a reader sees it."""
        return self.driver.find_element(By.TAG_NAME, 'body').text

    def find(self, css):
        """The element at `css` on the page shown.  :raise NoSuchElementException: when there is none."""
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def path(self):
        """Where the browser is on the live server, e.g. '/admin/'."""
        return self.driver.current_url.removeprefix(self.base_url)


def artifacts_folder(root, test_name):
    """test-artifacts/browser/<test>/ at the repository's root, emptied of an earlier run's screenshots."""
    folder = Path(root) / 'test-artifacts' / 'browser' / re.sub(r'[^A-Za-z0-9_.-]+', '-', test_name).strip('-')
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
