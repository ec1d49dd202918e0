"""Start the embedded gproxy with Django's development server (runserver).

``ready()`` runs in every process that sets Django up: in both of runserver's
processes (its autoreloader watches files in the parent and serves from a child it
restarts on each code change), and for every other management command (migrate,
shell, ...).  Only the process that serves starts the proxy; it stops as that
process exits (the handle stops at exit), so a reload stops the old proxy and the
new process starts its own.  Under gunicorn, start it from gunicorn's hooks
instead (hosts/gunicorn.conf.py); for a long-running proxy of its own, see the
``gproxy_serve`` command.
"""

from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relayapp"

    def ready(self):
        from relayapp import embed
        if embed.serving_runserver():
            embed.start()
