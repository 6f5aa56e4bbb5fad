"""The web console: server-rendered pages (Jinja2, htmx) under /console, on the signed-in member's session.

Pages read and change everything through the platform's own API, called in-process as the member
(``api/inprocess.py``), so a page can show or do only what that member's API calls could."""
