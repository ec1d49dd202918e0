"""``manage.py gproxy_serve``: run the embedded gproxy until SIGTERM or Ctrl-C, with
the project's settings and models at hand (to load routes from the database, say)."""

import signal
import threading

from django.core.management.base import BaseCommand

from relayapp import embed


class Command(BaseCommand):
    help = "Run the embedded gproxy until SIGTERM or Ctrl-C."

    def handle(self, *args, **options):
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        with embed.start() as proxy:  # leaving the block stops it (drains, 5 s)
            self.stdout.write("gproxy listening on %s" % (proxy.addresses,), ending="\n")
            self.stdout.flush()
            while not stop.wait(1.0):
                pass
        self.stdout.write("gproxy stopped")
