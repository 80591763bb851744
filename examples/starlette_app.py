"""A LayerCode backend on Starlette: the signature middleware and a tiny agent.

Install, run it, then talk to it from another terminal, from the directory holding the
clone (``./layercode-asgi``, as in the README)::

    pip install './layercode-asgi[server]'
    LAYERCODE_WEBHOOK_SECRET=whsec_test python layercode-asgi/examples/starlette_app.py
    layercode-asgi simulate --secret whsec_test "Hello"
"""

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import LayercodeSignature, LayercodeWebhook

# Stripped, and split on commas during a rotation ("whsec_new,whsec_old"), as Settings does.
SECRETS = [
    s.strip() for s in os.environ.get("LAYERCODE_WEBHOOK_SECRET", "").split(",") if s.strip()
]
if not SECRETS:
    raise SystemExit("Set LAYERCODE_WEBHOOK_SECRET to your agent's webhook secret.")


async def agent(event):
    yield f"You said: {event.text}" if event.text else "Hello! Say something."


webhook = LayercodeWebhook(agent)  # answers every LayerCode event type


async def agent_route(request: Request) -> Response:
    return await webhook.respond(await request.body())


app = Starlette(
    routes=[Route("/api/agent", agent_route, methods=["POST"])],
    middleware=[Middleware(LayercodeSignature, secret=SECRETS)],
)
# /api/agent/ gets a 404, not Starlette's 307 to an http:// URL built from the Host header
# (a webhook client following it would re-send the signed body in clear text).
app.router.redirect_slashes = False

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
