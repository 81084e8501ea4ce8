"""The app's forms filled in as a browser fills them in: with the CSRF token that came with the page."""
import re

from tests.support.jobs import run_due_jobs


def csrf_token(client, url):
    """The CSRF token a browser would get with the form at `url`."""
    page = client.get(url).get_data(as_text=True)
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


def sign_up(client, email):
    """Sign `email` up through the form on the home page.  :return: the response."""
    return client.post('/', data={'email': email, 'csrf_token': csrf_token(client, '/')})


def confirm(client, link):
    """Open a confirmation link and press its button, as its reader does.  :return: the answer to pressing it;
    or the page, when it has no button (a dead link, or an address subscribed already)."""
    page = client.get(link)
    return client.post(link) if 'Confirm my subscription</button>' in page.get_data(as_text=True) else page


def confirm_link(message):
    """The path of the confirmation link in a confirmation email (`message`, as the SMTP sink got it)."""
    return re.search(r'http://newsletter.test(/confirm/\S+)', message.get_body(('plain',)).get_content()).group(1)


def sign_in_link(app, client, smtp, address='admin@example.com'):
    """Ask for a sign-in link as an admin does, and let the worker send it.  :return: the link's path."""
    client.post('/admin/login', data={'email': address, 'csrf_token': csrf_token(client, '/admin/login')})
    run_due_jobs(app)
    body = smtp.messages[-1].get_body(('plain',)).get_content()
    return re.search(r'http://newsletter.test(/admin/sign-in/\S+)', body).group(1)


def sign_in(app, client, smtp, address='admin@example.com'):
    """Ask for a sign-in link as an admin does, let the worker send it, open it and press its button.
    :return: the answer to pressing it."""
    link = sign_in_link(app, client, smtp, address)
    return client.post(link, data={'csrf_token': csrf_token(client, link)})

