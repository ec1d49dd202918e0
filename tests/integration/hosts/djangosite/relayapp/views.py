import os

from django.http import JsonResponse

from relayapp import embed


def proxy(request):
    """This server process, its proxy's process (process mode) and live sessions."""
    return JsonResponse({"server": os.getpid(), "proxy_pid": getattr(embed.proxy, "pid", None),
                         "live_sessions": embed.proxy.stats()["live_sessions"]})
