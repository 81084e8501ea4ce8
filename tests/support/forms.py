"""The app's forms filled in as a browser fills them in: with the CSRF token that came with the page."""
import re


def csrf_token(client, url):
    """The CSRF token a browser would get with the form at `url`."""
    page = client.get(url).get_data(as_text=True)
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


def sign_up(client, email):
    """Sign `email` up through the form on the home page.  :return: the response."""
    return client.post('/', data={'email': email, 'csrf_token': csrf_token(client, '/')})
