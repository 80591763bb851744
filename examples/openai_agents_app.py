r"""An OpenAI Agents SDK voice agent.

The SDK's trace export stays off (``from_openai_agents(..., tracing=True)`` turns it on).

Install, run it, then talk to it from another terminal, from the directory holding the
clone (``./layercode-asgi``, as in the README)::

    pip install './layercode-asgi[openai-agents,server]'
    LAYERCODE_WEBHOOK_SECRET=whsec_test OPENAI_API_KEY=sk-… \
        python layercode-asgi/examples/openai_agents_app.py
    layercode-asgi simulate --secret whsec_test "Hello"
"""

import os

from agents import Agent

from layercode_asgi import Settings, create_app
from layercode_asgi.adapters import from_openai_agents

settings = Settings()
if not settings.webhook_secrets:
    raise SystemExit("Set LAYERCODE_WEBHOOK_SECRET to your agent's webhook secret.")
if not settings.openai_api_key:
    raise SystemExit("Set OPENAI_API_KEY (and OPENAI_BASE_URL for another OpenAI-compatible API).")

assistant = Agent(
    name="assistant",
    instructions="You are a friendly voice assistant. Answer in one or two short sentences.",
    model=os.environ.get("OPENAI_MODEL", "gpt-5-nano"),
)
app = create_app(settings, from_openai_agents(assistant, welcome="Hi! What can I do for you?"))

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
