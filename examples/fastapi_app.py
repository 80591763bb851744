"""A LayerCode backend on FastAPI: the signature middleware and a tiny agent.

Install, run it, then talk to it from another terminal, from the directory holding the
clone (``./layercode-asgi``, as in the README)::

    pip install './layercode-asgi[server]' fastapi
    LAYERCODE_WEBHOOK_SECRET=whsec_test python layercode-asgi/examples/fastapi_app.py
    layercode-asgi simulate --secret whsec_test "Hello"
"""

import os

from fastapi import FastAPI, Request
from starlette.responses import Response

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
app = FastAPI(redirect_slashes=False)  # /api/agent/: a 404, not a 307 to an http:// URL
app.add_middleware(LayercodeSignature, secret=SECRETS, paths=["/api/agent"])


@app.post("/api/agent")
async def agent_route(request: Request) -> Response:
    return await webhook.respond(await request.body())


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
